"""Both engines on the character LSTM: the batched network's clients get ``local_update``'s weights.

The bounds follow ``tests/test_engine.py`` (its docstring derives them), with the LSTM's
longest chain of sums in place of a layer's: re-ordering a sum of n terms moves it by at
most about n u relative to its terms (u = 2^-53 for float64). In one step of the LSTM the
gradient that reaches a position has passed back through up to T = 80 positions, each a
sum of 4 hidden terms (dz_t W_hh), and each weight gradient sums over the T x W positions
of the batch; so n = T x max(4 hidden, W), and after S steps the engines' weights may
differ by S n u max|w| (``float64_bound``). The batched LSTM has the same equations as
``nn.LSTM``, in another grouping of its sums (the two biases added first, the gates of
all positions' inputs in one product, the backward pass written out). Its nonlinearities
are smooth, so float32 has no near-ties to resolve differently (unlike a ReLU's kink or a
max-pool): the float32 check is the relative size of the difference of each tensor's
update, bounded by 1 / (10 S) as there, while rounding makes it about sqrt(S n) u.

Clients are roles of random words of very unequal length (``synthetic``), so rounds have
padded steps, short last batches and padded last sequences (targets ``IGNORE_INDEX``).
Deliberately wrong engines (padding counted in the loss, a batch left out, another shuffle,
one of the two biases dropped) must fail both checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fedlib.engine.batched
import fedlib.engine.local
import fedlib.engine.schedule
from fedlib.client import local_update
from fedlib.data import IGNORE_INDEX
from fedlib.engine import BatchedModel, LocalSGD, batch_schedule, program_for, sequential_is_faster, \
    vectorized_local_updates
from fedlib.engine.batched import BatchedLSTMLayer
from fedlib.engine.graphs import GraphedSteps
from fedlib.engine.local import StepTrainer, examples_per_input, stage
from fedlib.models import CharLSTM, build_model

from tests.helpers import synthetic

U = {torch.float64: torch.finfo(torch.float64).eps / 2, torch.float32: torch.finfo(torch.float32).eps / 2}
T = 80
HIDDEN = {"lstm": 256, "lstm-small": 64}

CASES = {   # local training of one round; clients: indices into synthetic()'s clients
    "small-B7-E2": dict(model="lstm-small", clients=(0, 3, 5, 9), epochs=2, batch_size=7, lr=1.0),
    "small-Binf-E2": dict(model="lstm-small", clients=(0, 3, 5, 9), epochs=2, batch_size=None, lr=1.0),
    "small-momentum-wd-mu": dict(model="lstm-small", clients=(1, 3, 9), epochs=1, batch_size=10, lr=0.3,
                                 momentum=0.9, weight_decay=1e-3, mu=0.1),
    "paper-B10-E1": dict(model="lstm", clients=(2, 7), epochs=1, batch_size=10, lr=1.0),
}


@pytest.fixture(scope="module")
def data():
    return synthetic()


class Round:
    """One round of a case: w_t, the clients' data, their shuffles and the most local steps S."""

    def __init__(self, data, case: str, dtype: torch.dtype):
        c = dict(CASES[case])
        self.name, picks = c.pop("model"), c.pop("clients")
        self.settings, self.dtype, self.data = c, dtype, data
        torch.manual_seed(1)
        self.model = build_model(self.name, data.num_classes).to(dtype)
        self.w_t = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.clients = [torch.as_tensor(data.clients[k]) for k in picks]
        b, e = c["batch_size"], c["epochs"]
        self.steps = max(e * (math.ceil(len(idx) / b) if b else 1) for idx in self.clients)
        self.width = max(len(idx) for idx in self.clients) if b is None else b
        self.longest_sum = T * max(4 * HIDDEN[self.name], self.width)

    def shuffles(self) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(100 + k) for k in range(len(self.clients))]

    def sequential(self) -> list[dict]:
        return [local_update(self.model, self.data.x_train[idx], self.data.y_train[idx], weights=self.w_t,
                             generator=g, **self.settings).weights
                for idx, g in zip(self.clients, self.shuffles())]

    def no_dropout(self) -> list[torch.Generator]:
        """The LSTM has no dropout: one unused generator per client."""
        return [torch.Generator() for _ in self.clients]

    def vectorized(self) -> list[dict]:
        result = vectorized_local_updates(self.model, self.data.x_train, self.data.y_train, self.clients,
                                          self.shuffles(), weights=self.w_t, dropout_generators=self.no_dropout(),
                                          **self.settings)
        return [result.client(i) for i in range(len(self.clients))]


def assert_same_float64(r: Round, vec: list[dict], seq: list[dict]) -> None:
    for k, (a, b) in enumerate(zip(vec, seq)):
        for name in b:
            bound = r.steps * r.longest_sum * U[torch.float64] * b[name].abs().max().item()
            diff = (a[name] - b[name]).abs().max().item()
            assert diff <= bound, f"client {k} {name} differs by {diff:.2e} > {bound:.1e} (S={r.steps})"


def assert_same_float32(r: Round, vec: list[dict], seq: list[dict]) -> None:
    bound = 1 / (10 * r.steps)
    for k, (a, b) in enumerate(zip(vec, seq)):
        for name in b:
            relative = (a[name] - b[name]).norm().item() / (b[name] - r.w_t[name]).norm().item()
            assert relative <= bound, f"client {k} {name}: {relative:.2e} of the update > {bound:.1e} (S={r.steps})"


CHECKS = {torch.float64: assert_same_float64, torch.float32: assert_same_float32}
PAIRS = [pytest.param(case, dtype, id=f"{case}-{str(dtype)[6:]}") for case in CASES
         for dtype in (torch.float64, torch.float32)]
_cache: dict = {}


def both_engines(data, case: str, dtype: torch.dtype) -> tuple[Round, list[dict], list[dict]]:
    if (case, dtype) not in _cache:
        r = Round(data, case, dtype)
        _cache[case, dtype] = r, r.sequential(), r.vectorized()
    return _cache[case, dtype]


@pytest.mark.parametrize("case, dtype", PAIRS)
def test_batched_lstm_round_equals_local_update(data, case, dtype):
    r, seq, vec = both_engines(data, case, dtype)
    assert all(w.dtype == dtype for client in vec for w in client.values())
    CHECKS[dtype](r, vec, seq)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_bound_separates_rounding_from_real_differences(data, case):
    r = Round(data, case, torch.float32)
    assert math.sqrt(r.steps * r.longest_sum) * U[torch.float32] < 1 / (10 * r.steps) / 10
    assert 1 / (10 * r.steps) < 1 / r.steps


# --- deliberately wrong engines -------------------------------------------------------------------

def padding_counted(monkeypatch):
    """Average each model's loss over every position of its batch, padding included."""
    def mean(losses, target, weight):
        real = (weight > 0).to(losses.dtype).unsqueeze(2).expand_as(losses)
        return (losses * real).sum((1, 2)) / real.sum((1, 2)).clamp(min=1)
    monkeypatch.setattr(fedlib.engine.local, "mean_loss_per_model", mean)


def last_batch_skipped(monkeypatch):
    original = fedlib.engine.schedule.batch_schedule

    def schedule(*args, **kwargs):
        index, mask = original(*args, **kwargs)
        for i in range(mask.shape[1]):
            mask[mask[:, i].sum(1).nonzero().max(), i] = 0
        return index, mask
    monkeypatch.setattr(fedlib.engine.schedule, "batch_schedule", schedule)


def one_client_reshuffled(monkeypatch):
    original = fedlib.engine.local.sched.batch_schedule

    def schedule(client_indices, generators, *args):
        return original(client_indices, [torch.Generator().manual_seed(12345)] + list(generators[1:]), *args)
    monkeypatch.setattr(fedlib.engine.local.sched, "batch_schedule", schedule)


def one_bias_dropped(monkeypatch):
    """Leave out b_hh, as an LSTM with TensorFlow's single bias per gate would."""
    original = BatchedLSTMLayer.apply
    monkeypatch.setattr(fedlib.engine.batched.BatchedLSTMLayer, "apply",
                        lambda x, w_ih, w_hh, b_ih, b_hh: original(x, w_ih, w_hh, b_ih, 0 * b_hh))


WRONG = {"padding-counted": padding_counted, "last-batch-skipped": last_batch_skipped,
         "one-client-reshuffled": one_client_reshuffled, "one-bias-dropped": one_bias_dropped}


@pytest.mark.parametrize("wrong", list(WRONG))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_wrong_engine_fails_the_check(data, monkeypatch, wrong, dtype):
    r, seq, _ = both_engines(data, "small-B7-E2", dtype)
    WRONG[wrong](monkeypatch)
    with pytest.raises(AssertionError):
        CHECKS[dtype](r, r.vectorized(), seq)


# --- the pieces ---------------------------------------------------------------------------------

def test_the_program_is_the_models_forward():
    """M models' logits through the batched network, each its own model's (float64)."""
    m, w = 3, 4
    models = []
    for seed in range(m):
        torch.manual_seed(seed)
        models.append(build_model("lstm-small", 98).double())
    batched = BatchedModel(models[0], program_for(models[0]), channels_last=True)
    x = torch.randint(0, 98, (m * w, T), generator=torch.Generator().manual_seed(0))
    index = torch.arange(m * w).view(m, w)
    params = {k: torch.stack([dict(model.named_parameters())[k].detach() for model in models])
              for k, _ in models[0].named_parameters()}
    logits = batched.forward(params, batched.gather(x, index))
    assert logits.shape == (m, w, T, 98)
    for i, model in enumerate(models):
        expected = model(x[index[i]]).transpose(1, 2)                     # (W, T, V)
        bound = T * (8 + 64) * U[torch.float64] * expected.abs().max().item()
        assert (logits[i] - expected).abs().max().item() <= bound


def test_the_batched_layers_gradients_are_nn_lstms():
    """BatchedLSTMLayer's hand-written backward against autograd through nn.LSTM (float64)."""
    m, w, hidden = 3, 5, 16
    lstms = []
    for seed in range(m):
        torch.manual_seed(seed)
        lstms.append(nn.LSTM(8, hidden, batch_first=True).double())
    x = torch.randn(m, w, T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    probe = torch.randn(m, w, T, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    stacked = [torch.stack([getattr(l, n).detach() for l in lstms]).requires_grad_() for n in names]
    xs = x.clone().requires_grad_()
    out = BatchedLSTMLayer.apply(xs.permute(2, 0, 1, 3), *stacked).permute(1, 2, 0, 3)
    (out * probe).sum().backward()
    for i, lstm in enumerate(lstms):
        xi = x[i].clone().requires_grad_()
        expected, _ = lstm(xi)
        (expected * probe[i]).sum().backward()
        bound = T * 4 * hidden * U[torch.float64]
        assert (out[i] - expected).abs().max().item() <= bound * expected.abs().max().item()
        for n, s in zip(names, stacked):
            ref = getattr(lstm, n).grad
            assert (s.grad[i] - ref).abs().max().item() <= bound * T * w * ref.abs().max().item(), n
        assert (xs.grad[i] - xi.grad).abs().max().item() <= bound * xi.grad.abs().max().item()


def test_lstms_a_program_does_not_describe_fall_back_to_vmap(data):
    """An LSTM layer the program cannot run (dropout between layers, a subclass) has no
    program; such a model trains through vmap with local_update's weights."""
    odd = build_model("lstm-small", 98)
    odd.lstm = nn.LSTM(8, 64, num_layers=2, batch_first=True, dropout=0.5)
    assert program_for(odd) is None

    class Renamed(CharLSTM):
        pass
    model = Renamed(98, hidden=16).double()
    assert program_for(model) is None and program_for(build_model("lstm", 98)) is not None
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [torch.as_tensor(data.clients[k]) for k in (0, 3)]
    settings = dict(epochs=1, batch_size=10, lr=0.5)
    result = vectorized_local_updates(model, data.x_train, data.y_train, clients,     # vmap: a loop over the
                                      [torch.Generator().manual_seed(k) for k in range(2)], weights=w0,   # models
                                      dropout_generators=[torch.Generator() for _ in range(2)], **settings)
    for k, idx in enumerate(clients):
        ref = local_update(model, data.x_train[idx], data.y_train[idx], weights=w0,
                           generator=torch.Generator().manual_seed(k), **settings)
        steps = math.ceil(len(idx) / 10)
        for name, w in ref.weights.items():
            bound = steps * T * 4 * 16 * U[torch.float64] * w.abs().max().item()
            assert (result.client(k)[name] - w).abs().max().item() <= bound


def test_graph_steps_equal_eager_steps_for_the_lstm(data):
    """The steps a CUDA graph records, run eagerly from static buffers on the CPU, give the
    eager round's weights; the static buffers take the model's dtype, not the ids'."""
    torch.manual_seed(0)
    model = build_model("lstm-small", 98).double()
    batched = BatchedModel(model, program_for(model), channels_last=True)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    clients = [torch.as_tensor(data.clients[k]) for k in (0, 3, 9)]
    start = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in w0.items()}
    sgd = LocalSGD(epochs=1, batch_size=7)
    index, mask = batch_schedule(clients, [torch.Generator().manual_seed(k) for k in range(3)], 1, 7)
    count = mask.sum(2)
    staged = stage(index, mask, count, [], torch.full((3,), 0.5, dtype=torch.float64), batched, torch.device("cpu"),
                   torch.float64)
    eager = StepTrainer(batched, start, sgd, False, False)
    eager.reset(start, None)
    eager_loss = eager.run(data.x_train, data.y_train, staged)
    graphed = GraphedSteps(StepTrainer(batched, start, sgd, False, False), data.x_train, data.y_train, 3,
                           staged.index.shape[2], {}, chunk=4, capture=False)
    assert graphed.weight.dtype == torch.float64
    graphed.trainer.reset(start, None)
    loss = graphed.run(staged.index, staged.weight, staged.scale, staged.count, staged.masks)
    steps = index.shape[0]
    for name, p in eager.params.items():
        bound = steps * T * 4 * 64 * U[torch.float64] * p.abs().max().item()
        assert (graphed.trainer.params[name] - p).abs().max().item() <= bound
    torch.testing.assert_close(loss, eager_loss, rtol=steps * T * 4 * 64 * U[torch.float64], atol=0)


def test_the_step_loss_is_the_mean_over_real_characters(data):
    """A round's training loss per client is local_update's: the mean over the characters
    of each batch (padding targets left out), averaged over the steps by examples."""
    r = Round(data, "small-B7-E2", torch.float64)
    result = vectorized_local_updates(r.model, data.x_train, data.y_train, r.clients, r.shuffles(),
                                      weights=r.w_t, dropout_generators=r.no_dropout(), **r.settings)
    for k, (idx, g) in enumerate(zip(r.clients, r.shuffles())):
        ref = local_update(r.model, data.x_train[idx], data.y_train[idx], weights=r.w_t, generator=g, **r.settings)
        assert result.train_loss[k].item() == pytest.approx(ref.train_loss, rel=r.steps * r.longest_sum * U[torch.float64])
    assert (data.y_train[r.clients[0]] == IGNORE_INDEX).any()             # the case has padding to leave out


def test_sequences_count_as_several_examples_when_clients_are_grouped(data):
    """A sequence of 80 counts as 7 examples of MAX_EXAMPLES_PER_STEP (its activation memory);
    clients trained in groups get the weights of clients trained at once."""
    assert examples_per_input(data.x_train) == 7 and examples_per_input(torch.zeros(3, 1, 28, 28)) == 1
    r = Round(data, "small-B7-E2", torch.float64)

    def train(max_examples_per_step):
        result = vectorized_local_updates(r.model, data.x_train, data.y_train, r.clients, r.shuffles(),
                                          weights=r.w_t, max_examples_per_step=max_examples_per_step,
                                          dropout_generators=r.no_dropout(), **r.settings)
        return [result.client(i) for i in range(len(r.clients))]
    assert_same_float64(r, train(2 * 7 * 7), train(None))                  # groups of 2 clients, then all 4


def test_auto_trains_lstms_one_client_at_a_time_on_the_cpu():
    assert "LSTM" in sequential_is_faster(build_model("lstm-small", 98))
    assert sequential_is_faster(build_model("2nn")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_lstm_rounds_equal_local_update(data, monkeypatch):
    """On a GPU: the batched LSTM replayed from a CUDA graph (the third round of a shape) and
    run eagerly, against local_update with cuDNN's LSTM, in float64 with the bound above."""
    from fedlib.engine import graphs
    gpu = data.to("cuda")
    r = Round(gpu, "small-B7-E2", torch.float64)
    r.model.to("cuda")
    r.w_t = {k: v.to("cuda") for k, v in r.w_t.items()}
    r.clients = [c.to("cuda") for c in r.clients]
    seq = r.sequential()
    graphs.clear()
    for enabled, rounds in (("0", 1), ("1", 3)):
        monkeypatch.setenv("FEDLIB_CUDA_GRAPHS", enabled)
        for _ in range(rounds):
            vec = r.vectorized()
        assert_same_float64(r, vec, seq)
    assert graphs._cache, "no graph was captured"
