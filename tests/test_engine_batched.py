"""The parts of the vectorised engine: the batched model, the dropout masks, the graph steps.

``tests/test_engine.py`` checks whole rounds of both engines equal; this file checks each
piece on its own, in float64, with bounds from the float format as there: a sum of n
terms re-ordered moves by at most ~n u relative to its terms (u = 2^-53), so a quantity
built from S steps of sums of at most n terms may move by S n u times its size.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import fedlib.engine.schedule
import fedlib.server
from fedlib import Dataset, FedAvgConfig, build_model
from fedlib.client import local_update
from fedlib.engine import (BatchedModel, LocalSGD, batch_schedule, dropout_masks, program_for, train_models,
                           vectorized_local_updates)
from fedlib.engine.graphs import GraphedSteps
from fedlib.engine.local import StepTrainer, stage
from fedlib.models import LANGUAGE_MODELS, MODELS, TwoNN
from fedlib.seeds import sampling_rng
from fedlib.server import initial_model, sample_clients
from tests.helpers import run_round

U64 = torch.finfo(torch.float64).eps / 2
# Longer than any sum in one forward pass of fedlib's models (the CNN's fc1 sums 3,136 terms).
FORWARD_SUM = 4096
# Longer than any sum in one training step here (the CNN's conv1 weight gradient: 28 * 28 * W, W <= 10).
STEP_SUM = 28 * 28 * 10


@pytest.fixture(scope="module")
def small(mnist) -> Dataset:
    return Dataset("mnist", mnist.x_train[:2000], mnist.y_train[:2000], mnist.x_test[:1000],
                   mnist.y_test[:1000], mnist.classes).to(dtype=torch.float64)


def models_of(name: str, m: int) -> list[nn.Module]:
    """m copies of a model, each with its own weights (float64)."""
    out = []
    for seed in range(m):
        torch.manual_seed(seed)
        out.append(build_model(name).double())
    return out


def assert_within(a: dict, b: dict, steps: int, n: int = STEP_SUM) -> None:
    for name in b:
        bound = steps * n * U64 * max(b[name].abs().max().item(), 1.0)
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= bound, f"{name} differs by {diff:.2e} > {bound:.1e}"


# --- the batched model -----------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in MODELS if n not in LANGUAGE_MODELS])   # LSTMs: test_engine_lstm.py
def test_every_program_is_its_models_forward(name):
    """The batched network of M models gives each model's own logits (dropout off: masks of 1)."""
    m, w = 3, 4
    models = models_of(name, m)
    program = program_for(models[0])
    assert program is not None
    batched = BatchedModel(models[0], program, channels_last=True)
    shape = (3, 32, 32) if name == "cifar-cnn" else (1, 28, 28)
    x = torch.randn(m * w, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    index = torch.arange(m * w).view(m, w)
    params = {k: torch.stack([dict(model.named_parameters())[k].detach() for model in models])
              for k, _ in models[0].named_parameters()}
    ones = dropout_masks(batched.dropouts, torch.full((1, m), float(w)), [torch.Generator()] * m, torch.float64)
    masks = {k: v[0] for k, v in batched.layout_masks([torch.ones_like(o) for o in ones], x.device).items()}
    logits = batched.forward(params, batched.gather(x, index), masks)
    assert logits.shape == (m, w, 10)
    for i, model in enumerate(models):
        expected = model.eval()(x[index[i]])
        bound = FORWARD_SUM * U64 * expected.abs().max().item()
        assert (logits[i] - expected).abs().max().item() <= bound


def test_a_model_a_program_does_not_describe_falls_back():
    class Wider(TwoNN):                                   # a subclass may change forward: not batched
        pass
    changed = build_model("cnn-small")
    changed.conv1 = nn.Conv2d(1, 10, kernel_size=5, stride=2)
    assert program_for(Wider()) is None
    assert program_for(changed) is None
    assert program_for(nn.Sequential(nn.Flatten(), nn.Linear(784, 10))) is None
    assert all(program_for(build_model(name)) is not None for name in MODELS)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10)),
                                   TwoNN()], ids=["sequential-module", "2nn"])
def test_vmap_fallback_and_programs_equal_local_update(small, model):
    """A model without a program trains through vmap, with the same update; both give
    local_update's weights, with momentum, weight decay and FedProx's mu."""
    model = model.double()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [torch.arange(100 * i, 100 * i + 30 + 5 * i) for i in range(3)]
    settings = dict(epochs=2, batch_size=10, lr=0.05, momentum=0.9, weight_decay=1e-3, mu=0.1)
    result = vectorized_local_updates(model, small.x_train, small.y_train, clients,
                                      [torch.Generator().manual_seed(k) for k in range(3)], weights=w0,
                                      dropout_generators=[torch.Generator() for _ in range(3)], **settings)
    for k, idx in enumerate(clients):
        ref = local_update(model, small.x_train[idx], small.y_train[idx], weights=w0,
                           generator=torch.Generator().manual_seed(k), **settings)
        assert_within(result.client(k), ref.weights, steps=2 * math.ceil(len(idx) / 10))


# --- dropout masks ---------------------------------------------------------------------------

@pytest.mark.parametrize("counts", [[[10.0, 10.0], [10.0, 3.0], [4.0, 0.0], [10.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]],
                         ids=["short-and-empty-steps", "B=1"])
@pytest.mark.parametrize("one_draw", [True, False], ids=["one-draw", "a-draw-per-step"])
@pytest.mark.parametrize("name", ["cnn-small", "mlp", "small-conv-two-rates", "mlp-rate-0.25"])
def test_dropout_masks_are_the_ones_nn_dropout_draws(monkeypatch, name, one_draw, counts):
    """Each model's masks, step by step, are what the model's own nn.Dropout layers draw
    after torch.manual_seed of the same seed (padding steps draw nothing), also when no step
    holds more than one example (B = 1); also where the layers' rates p differ (cnn-small with
    one rate changed by hand: a draw per step and layer) and for a rate other than 0.5 (the
    mlp's changed by hand)."""
    monkeypatch.setattr(fedlib.engine.schedule, "_draws_concatenate", lambda dtype: one_draw)
    built = {"small-conv-two-rates": "cnn-small", "mlp-rate-0.25": "mlp"}.get(name, name)
    model = build_model(built).double().train()
    if name == "small-conv-two-rates":
        model.fc1_drop.p = 0.25
    if name == "mlp-rate-0.25":
        model.dropout.p = 0.25
    batched = BatchedModel(model, program_for(model), channels_last=False)
    counts = torch.tensor(counts)                                                     # (S, M) examples per step
    masks = dropout_masks(batched.dropouts, counts, [torch.Generator().manual_seed(7 + i) for i in range(2)],
                          torch.float64)
    layers = [dict(model.named_modules())[layer.name] for layer in batched.dropouts]
    for i in range(2):
        torch.manual_seed(7 + i)
        for s in range(counts.shape[0]):
            b = int(counts[s, i])
            for layer, spec, mask in zip(layers, batched.dropouts, masks):
                if b == 0:
                    assert not mask[s, i].any()
                    continue
                shape = (b,) + ((spec.shape[0], 2, 2) if isinstance(layer, nn.Dropout2d) else spec.shape)
                drawn = layer(torch.ones(shape, dtype=torch.float64))
                expected = drawn[..., :1, :1] if isinstance(layer, nn.Dropout2d) else drawn
                assert torch.equal(mask[s, i, :b], expected)
                assert not mask[s, i, b:].any()


def test_a_dropout_round_equals_sequential_with_each_clients_stream(small):
    """cnn-small through run_round's vectorized path: fedlib/server.py passes each client's
    dropout stream (dropout_seed(seed, t, k)) to the engine, so run_round itself gives the
    sequential engine's weights, masks included (on a CPU; see fedlib.seeds)."""
    config = FedAvgConfig(model="cnn-small", num_clients=20, frac=0.2, batch_size=10, lr=0.1, seed=3).validate()
    model = initial_model(config, dtype=torch.float64)
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [torch.as_tensor(p) for p in config.split(small.y_train)]
    selected = sample_clients(20, 0.2, sampling_rng(3, 1))
    w_seq, _ = run_round(model, w_t, small, clients, selected, config, 1, "sequential")
    w_vec, _ = run_round(model, w_t, small, clients, selected, config, 1, "vectorized")
    assert_within(w_vec, w_seq, steps=10)


# --- per-model learning rates, FedProx and SCAFFOLD on the batched path ---------------------------

@pytest.mark.parametrize("name", ["2nn", "cnn-small"])
def test_each_model_its_own_learning_rate(small, name):
    """train_models with one rate per model gives local_update's weights at that rate
    (the 2NN's hand-written step and the batched network, dropout included)."""
    torch.manual_seed(0)
    model = build_model(name).double()
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    clients = [torch.arange(100 * i, 100 * i + 40 + 3 * i) for i in range(3)]
    rates = [0.02, 0.1, 0.3]
    start = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in w0.items()}
    result = train_models(model, small.x_train, small.y_train, start, torch.tensor(rates, dtype=torch.float64),
                          clients, [torch.Generator().manual_seed(k) for k in range(3)],
                          [torch.Generator().manual_seed(50 + k) for k in range(3)], LocalSGD(2, 10))
    for k, idx in enumerate(clients):
        torch.manual_seed(50 + k)
        ref = local_update(model, small.x_train[idx], small.y_train[idx], weights=w0, epochs=2, batch_size=10,
                           lr=rates[k], generator=torch.Generator().manual_seed(k))
        assert_within(result.client(k), ref.weights, steps=2 * math.ceil(len(idx) / 10))


def test_fedprox_and_scaffold_on_the_batched_network(small):
    torch.manual_seed(0)
    model = build_model("cnn-small").double()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    corrections = [{k: 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in w0.items()}
                   for _ in range(2)]
    clients = [torch.arange(0, 35), torch.arange(500, 520)]
    result = vectorized_local_updates(model, small.x_train, small.y_train, clients,
                                      [torch.Generator().manual_seed(k) for k in range(2)], weights=w0, epochs=2,
                                      batch_size=10, lr=0.1, mu=0.5, corrections=corrections,
                                      dropout_generators=[torch.Generator().manual_seed(9 + k) for k in range(2)])
    for k, idx in enumerate(clients):
        torch.manual_seed(9 + k)
        ref = local_update(model, small.x_train[idx], small.y_train[idx], weights=w0, epochs=2, batch_size=10,
                           lr=0.1, mu=0.5, correction=corrections[k], generator=torch.Generator().manual_seed(k))
        assert_within(result.client(k), ref.weights, steps=8)
        assert result.steps[k] == ref.steps


# --- the steps a CUDA graph replays, run on the CPU -------------------------------------------------

@pytest.mark.parametrize("name, sgd", [("cnn-small", LocalSGD(2, 7)), ("2nn", LocalSGD(2, 7)),
                                       ("cnn-small", LocalSGD(1, 7, momentum=0.9, weight_decay=1e-3, mu=0.1))],
                         ids=["cnn-small", "2nn-by-hand", "cnn-small-momentum-mu"])
def test_graph_steps_equal_eager_steps(small, name, sgd):
    """GraphedSteps reads each chunk of a round from static buffers (the last chunk padded
    with steps that change nothing) and runs the very steps a CUDA graph records; on the
    CPU it runs them eagerly. It gives the eager round's weights and losses, and a second
    round on the same buffers starts afresh from its own weights."""
    torch.manual_seed(0)
    model = build_model(name).double()
    batched = BatchedModel(model, program_for(model), channels_last=True)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    clients = [torch.arange(0, 30), torch.arange(300, 323), torch.arange(600, 610)]     # S = 2 * 5 = 10 steps
    start = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in w0.items()}
    lr = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)
    by_hand = name == "2nn" and sgd.plain

    def schedule():
        index, mask = batch_schedule(clients, [torch.Generator().manual_seed(k) for k in range(3)], sgd.epochs,
                                     sgd.batch_size)
        count = mask.sum(2)
        masks = dropout_masks(batched.dropouts, count, [torch.Generator().manual_seed(5 + k) for k in range(3)],
                              torch.float64)
        return stage(index, mask, count, masks, lr, batched, small.x_train.device, torch.float64)

    eager = StepTrainer(batched, start, sgd, False, by_hand)
    eager.reset(start, None)
    staged = schedule()
    eager_loss = eager.run(small.x_train, small.y_train, staged)
    graphed = GraphedSteps(StepTrainer(batched, start, sgd, False, by_hand), small.x_train, small.y_train, 3,
                           staged.index.shape[2], {k: tuple(v.shape[1:]) for k, v in staged.masks.items()},
                           chunk=4, capture=False)
    for _ in range(2):                                    # the second round reuses the buffers
        graphed.trainer.reset(start, None)
        loss = graphed.run(staged.index, staged.weight, staged.scale, staged.count, staged.masks)
        assert_within({k: v.detach() for k, v in graphed.trainer.params.items()},
                      {k: v.detach() for k, v in eager.params.items()}, steps=10)
        torch.testing.assert_close(loss, eager_loss, rtol=10 * STEP_SUM * U64, atol=0)


@pytest.mark.parametrize("capture", ["replayed", "capture-fails"])
def test_the_graph_path_of_a_round_on_the_cpu(small, monkeypatch, capture):
    """The engine's graph path end to end, with the capture itself left out (CPU): rounds of
    a shape seen before run from cached static buffers (``replayed``: GraphedSteps without a
    graph), or, when the capture raises, warn once and run eagerly (``capture-fails``: on
    the CPU, torch.cuda.Stream() raises). Every round gives the eager round's weights."""
    from fedlib.engine import graphs
    torch.manual_seed(0)
    model = build_model("cnn-small").double()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [torch.arange(0, 30), torch.arange(300, 323)]

    def round_():
        return vectorized_local_updates(model, small.x_train, small.y_train, clients,
                                        [torch.Generator().manual_seed(k) for k in range(2)], weights=w0, epochs=2,
                                        batch_size=7, lr=0.1,
                                        dropout_generators=[torch.Generator().manual_seed(3 + k) for k in range(2)])
    eager = round_()
    graphs.clear()
    monkeypatch.setattr(graphs, "graphs_enabled", lambda device: True)
    if capture == "replayed":
        real = graphs.GraphedSteps
        monkeypatch.setattr(graphs, "GraphedSteps", lambda *args, **kwargs: real(*args, **kwargs, chunk=4,
                                                                                 capture=False))
    rounds = []
    with pytest.warns(UserWarning, match="capture failed") if capture == "capture-fails" else nullcontext():
        for _ in range(3):
            rounds.append(round_())
    assert bool(graphs._cache) == (capture == "replayed") and bool(graphs._failed) == (capture == "capture-fails")
    graphs.clear()
    for result in rounds:
        assert_within(result.weights, eager.weights, steps=10)
        torch.testing.assert_close(result.train_loss, eager.train_loss, rtol=10 * STEP_SUM * U64, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_rounds_equal_eager_rounds(mnist, monkeypatch):
    """On a GPU: the third round of a shape replays a captured graph; its weights equal an
    eager round's (float64, so that the bound is the float format's, not a tie's flip)."""
    from fedlib.engine import graphs
    data = mnist.to("cuda", dtype=torch.float64)
    model = build_model("cnn-small").to("cuda", torch.float64)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    clients = [torch.arange(600 * i, 600 * i + 600, device="cuda") for i in range(10)]

    def round_(enabled: str):
        monkeypatch.setenv("FEDLIB_CUDA_GRAPHS", enabled)
        return vectorized_local_updates(model, data.x_train, data.y_train, clients,
                                        [torch.Generator().manual_seed(k) for k in range(10)], weights=w0, epochs=1,
                                        batch_size=50, lr=0.05,
                                        dropout_generators=[torch.Generator().manual_seed(k) for k in range(10)])
    graphs.clear()
    eager = round_("0")
    for _ in range(3):
        replayed = round_("1")
    assert graphs._cache, "no graph was captured"
    assert_within(replayed.weights, eager.weights, steps=12, n=24 * 24 * 50)
