"""The vectorised engine gives the weights of the sequential one, batch for batch.

Tolerances: both engines run the same batches in the same order, so they differ
only in float32 rounding (vmap turns a client's matrix products into batched ones,
its convolutions into one grouped convolution, and the average sums in another
order). That is a few ulps per step: at weights of size ~0.1 one ulp is ~1e-8, so
``atol=1e-6, rtol=1e-5`` leaves room for ~10 steps of drift and still catches any
real difference (one SGD step of eta=0.1 moves weights by ~1e-3). The CNN cases
are kept to at most 10 local steps per client: over many steps a max-pool argmax
or a ReLU sitting at a near-tie can flip between the two roundings and the
trajectories then part by much more than rounding.
"""

import numpy as np
import pytest
import torch
from torch import nn

from fedlib import Dataset, FedAvgConfig, build_model, run
from fedlib.engine import batch_schedule, vectorized_local_updates
from fedlib.partition import make_partition
from fedlib.runtime import derive_seed
from fedlib.server import resolve_engine, run_round, sample_clients

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def small(mnist) -> Dataset:
    """2,000 training and 1,000 test images of real MNIST: enough for a few clients."""
    return Dataset("mnist", mnist.x_train[:2000], mnist.y_train[:2000], mnist.x_test[:1000],
                   mnist.y_test[:1000], mnist.classes)


def one_round(data: Dataset, engine: str, **overrides) -> tuple[dict, float]:
    """Round t=1 of FedAvg from the same initial weights with the given engine."""
    settings = dict(model="2nn", partition="iid", num_clients=20, frac=0.2, local_epochs=1,
                    batch_size=10, lr=0.1, seed=3, shard_size=50, min_size=20)
    config = FedAvgConfig(**{**settings, **overrides}).validate()
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    w_0 = {k: v.clone() for k, v in model.state_dict().items()}
    partition = make_partition(config.partition, data.y_train, config.num_clients, config.seed,
                               shard_size=config.shard_size, alpha=config.alpha,
                               min_size=config.min_size, sigma=config.sigma)
    client_indices = [torch.as_tensor(p) for p in partition]
    selected = sample_clients(config.num_clients, config.frac, np.random.default_rng(derive_seed(config.seed, 1, 1)))
    return run_round(model, w_0, data, client_indices, selected, config, 1, engine)


def assert_same_round(data: Dataset, **overrides) -> None:
    w_seq, loss_seq = one_round(data, "sequential", **overrides)
    w_vec, loss_vec = one_round(data, "vectorized", **overrides)
    assert w_seq.keys() == w_vec.keys()
    for name in w_seq:
        torch.testing.assert_close(w_vec[name], w_seq[name], **TOL, msg=f"{name} differs")
    assert loss_vec == pytest.approx(loss_seq, rel=1e-5)


@pytest.mark.parametrize("partition", ["iid", "shards"])
@pytest.mark.parametrize("batch_size", [10, None])
@pytest.mark.parametrize("model", ["2nn", "cnn"])
def test_vectorized_round_equals_sequential(small, model, partition, batch_size):
    # 100 examples per client: the CNN takes 10 steps (B=10, E=1) or 2 (B=inf, E=2).
    epochs = 1 if batch_size else 2
    assert_same_round(small, model=model, partition=partition, batch_size=batch_size, local_epochs=epochs)


@pytest.mark.parametrize("partition", ["dirichlet", "unbalanced"])
@pytest.mark.parametrize("batch_size", [7, None])
def test_unequal_client_sizes_are_masked_exactly(small, partition, batch_size):
    # n_k differ and B=7 divides none of them: padded steps and short last batches.
    assert_same_round(small, partition=partition, batch_size=batch_size, local_epochs=2, frac=0.3)


def test_momentum_and_weight_decay_match_torch_sgd(small):
    # eta=0.01: with momentum 0.9, eta=0.1 diverges and any rounding difference explodes.
    assert_same_round(small, partition="unbalanced", batch_size=10, local_epochs=2,
                      lr=0.01, momentum=0.9, weight_decay=1e-3, frac=0.3)


def test_clients_in_groups_equal_clients_at_once(small):
    model = build_model("2nn")
    clients = [torch.arange(100 * i, 100 * i + 30 + 10 * i) for i in range(5)]

    def train(max_examples_per_step):
        shuffles = [torch.Generator().manual_seed(i) for i in range(5)]
        return vectorized_local_updates(model, small.x_train, small.y_train, clients, shuffles, epochs=2,
                                        batch_size=10, lr=0.1, weights=model.state_dict(),
                                        max_examples_per_step=max_examples_per_step)
    together, in_groups = train(None), train(20)            # groups of 2 clients
    for name in together.weights:
        torch.testing.assert_close(in_groups.weights[name], together.weights[name], **TOL)
    torch.testing.assert_close(in_groups.train_loss, together.train_loss)


def test_batch_schedule_is_each_clients_shuffle_padded():
    clients = [torch.arange(0, 23), torch.arange(100, 105)]
    index, mask = batch_schedule(clients, [torch.Generator().manual_seed(k) for k in range(2)],
                                 epochs=2, batch_size=10)
    assert index.shape == mask.shape == (6, 2, 10)          # S = 2 epochs * ceil(23 / 10)
    for k, idx in enumerate(clients):
        real = index[:, k][mask[:, k].bool()]
        assert len(real) == 2 * len(idx)                     # every example once per epoch
        half = len(idx)
        assert sorted(real[:half].tolist()) == sorted(real[half:].tolist()) == idx.tolist()
    assert mask[:, 1].sum(1).tolist() == [5, 5, 0, 0, 0, 0]  # 1 step per epoch, then masked off
    assert mask[:, 0].sum(1).tolist() == [10, 10, 3, 10, 10, 3]


@pytest.mark.parametrize("model_name", ["mlp", "cnn-small"])
def test_dropout_draws_independent_masks_per_client(small, model_name):
    torch.manual_seed(0)
    model = build_model(model_name)
    same = [torch.arange(40)] * 2                            # two clients, same data, same batches
    result = vectorized_local_updates(model, small.x_train, small.y_train, same,
                                      [torch.Generator().manual_seed(1) for _ in range(2)],
                                      epochs=1, batch_size=10, lr=0.1)
    first, second = result.client(0), result.client(1)
    assert all(torch.isfinite(w).all() for w in first.values())
    assert any(not torch.equal(first[name], second[name]) for name in first)
    # Without dropout the same data and batches give the same weights.
    twin = vectorized_local_updates(build_model("2nn"), small.x_train, small.y_train, same,
                                    [torch.Generator().manual_seed(1) for _ in range(2)],
                                    epochs=1, batch_size=10, lr=0.1)
    assert all(torch.equal(twin.client(0)[n], twin.client(1)[n]) for n in twin.weights)


def test_run_histories_match_between_engines(small):
    settings = dict(model="2nn", num_clients=20, frac=0.2, rounds=2, batch_size=10, seed=5, device="cpu")
    histories = {engine: run(FedAvgConfig(engine=engine, **settings), small, progress=False)
                 for engine in ("sequential", "vectorized")}
    seq, vec = histories["sequential"], histories["vectorized"]
    assert vec.config["engine_used"] == "vectorized" and seq.config["engine_used"] == "sequential"
    assert [r.clients for r in vec.records] == [r.clients for r in seq.records]
    assert vec.accuracies == seq.accuracies
    for a, b in zip(vec.records, seq.records):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.test_loss == pytest.approx(b.test_loss, rel=1e-5)


def test_dropout_model_runs_end_to_end(small):
    history = run(FedAvgConfig(model="cnn-small", num_clients=20, frac=0.1, rounds=1, batch_size=10,
                               engine="vectorized", device="cpu"), small, progress=False)
    assert history.config["engine_used"] == "vectorized"
    assert 0 <= history.final_accuracy <= 1


def test_engine_names_and_fallback():
    model = build_model("2nn")
    assert resolve_engine("auto", model) == "vectorized"
    assert resolve_engine("auto", build_model("cnn-small")) == "vectorized"
    assert resolve_engine("auto", build_model("cnn")) == "sequential"      # measured faster on a CPU
    assert resolve_engine("vectorized", build_model("cnn")) == "vectorized"
    assert resolve_engine("sequential", model) == "sequential"
    with pytest.raises(ValueError, match="engine"):
        resolve_engine("fast", model)
    with pytest.raises(ValueError, match="engine"):
        FedAvgConfig(engine="parallel").validate()
    with_buffers = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10))
    with pytest.raises(ValueError, match="buffers"):
        resolve_engine("vectorized", with_buffers)
    with pytest.warns(UserWarning, match="falls back to 'sequential'"):
        assert resolve_engine("auto", with_buffers) == "sequential"
