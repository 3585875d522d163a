"""The FedAvg algorithm: the weighted average, client sampling, ClientUpdate, FedSGD."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedlib.client import epoch_batches, local_update
from fedlib.data import Dataset
from fedlib.models import build_model
from fedlib.config import FedAvgConfig
from fedlib.runner import run
from fedlib.server import fedavg, num_selected, sample_clients
from tests.helpers import U64, assert_within_rounding, run_round, sgd_by_hand, small_data


def test_fedavg_matches_a_hand_computation():
    w1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    w2 = {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor(-1.0)}
    avg = fedavg([w1, w2], [1, 3])          # weights n_k / m_t = 1/4 and 3/4
    assert torch.allclose(avg["a"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(avg["b"], torch.tensor(0.0))


def test_fedavg_equal_sizes_is_the_plain_mean_and_single_client_is_identity():
    ws = [{"w": torch.randn(3, 4)} for _ in range(5)]
    assert torch.allclose(fedavg(ws, [7] * 5)["w"], torch.stack([w["w"] for w in ws]).mean(0), atol=1e-6)
    assert torch.equal(fedavg(ws[:1], [42])["w"], ws[0]["w"])


def test_fedavg_unequal_sizes_weigh_by_n_k():
    ws = [{"w": torch.full((2,), float(i))} for i in range(3)]
    n = [100, 300, 600]
    expected = (0 * 100 + 1 * 300 + 2 * 600) / 1000
    assert torch.allclose(fedavg(ws, n)["w"], torch.full((2,), expected))


@pytest.mark.parametrize("weights, n, message", [
    ([], [], "at least one client"),
    ([{"w": torch.ones(1)}], [1, 2], "one n_k per client"),
    ([{"w": torch.ones(1)}], [0], "positive sum"),
    ([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [-1, 3], ">= 0"),
])
def test_fedavg_bad_input(weights, n, message):
    with pytest.raises(ValueError, match=message):
        fedavg(weights, n)


@pytest.mark.parametrize("K, C, m", [(100, 0.1, 10), (100, 0.0, 1), (100, 1.0, 100), (100, 0.05, 5), (10, 0.01, 1)])
def test_sample_clients_takes_max_CK_1_distinct_clients(K, C, m):
    selected = sample_clients(K, C, np.random.default_rng(0))
    assert num_selected(K, C) == m and len(selected) == m
    assert len(set(selected.tolist())) == m and selected.min() >= 0 and selected.max() < K


def test_sample_clients_bad_fraction():
    with pytest.raises(ValueError, match=r"frac \(C\) must be a finite number in \[0, 1\]"):
        sample_clients(100, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_clients"):
        sample_clients(0, 0.1, np.random.default_rng(0))


def test_epoch_batches_cover_the_client_once_per_epoch():
    batches = epoch_batches(25, 10, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert sorted(torch.cat(batches).tolist()) == list(range(25))
    assert len(epoch_batches(25, None)) == 1        # B = infinity: one batch


def test_local_update_is_E_epochs_of_minibatch_sgd():
    data = small_data(30, dtype=torch.float64)
    torch.manual_seed(0)
    model = build_model("2nn").double()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    result = local_update(model, data.x_train, data.y_train, weights=w0, epochs=2, batch_size=10, lr=0.05,
                          generator=torch.Generator().manual_seed(1))
    # The same steps written out by hand: 2 epochs x 3 batches of plain SGD.
    reference = sgd_by_hand(data.x_train, data.y_train, w0, epochs=2, batch_size=10, lr=0.05, seed=1)
    assert_within_rounding(result.weights, reference, steps=6)
    assert result.num_examples == 30 and result.train_loss > 0
    assert not torch.equal(result.weights["fc1.weight"], w0["fc1.weight"])


def test_local_update_momentum_and_weight_decay_change_the_result():
    data = small_data(30)
    runs = []
    for options in ({}, {"momentum": 0.9}, {"weight_decay": 0.1}):
        torch.manual_seed(0)
        model = build_model("2nn")
        runs.append(local_update(model, data.x_train, data.y_train, epochs=2, batch_size=10, lr=0.05,
                                 generator=torch.Generator().manual_seed(1), **options).weights["fc1.weight"])
    assert not torch.allclose(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("options, message", [
    ({"epochs": 0}, r"epochs \(E\) must be an integer >= 1"),
    ({"batch_size": 0}, r"batch_size \(B\) must be an integer >= 1"),
    ({"lr": 0.0}, r"lr \(eta\) must be a finite number > 0"),
    ({"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\)"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
])
def test_local_update_bad_hyperparameters(options, message):
    data = small_data(10)
    kwargs = {"epochs": 1, "batch_size": 5, "lr": 0.1} | options
    with pytest.raises(ValueError, match=message):
        local_update(build_model("2nn"), data.x_train, data.y_train, **kwargs)


def test_fedsgd_with_all_clients_is_one_full_batch_gradient_step():
    """E=1, B=infinity, C=1: the n_k-weighted average of the clients' one-step updates
    equals one gradient step on the union of their data (the paper's FedSGD)."""
    data = small_data(120, dtype=torch.float64)
    client_indices = [torch.arange(0, 17), torch.arange(17, 60), torch.arange(60, 61), torch.arange(61, 120)]
    config = FedAvgConfig(num_clients=4, frac=1.0, local_epochs=1, batch_size=None, lr=0.3, engine="sequential")
    torch.manual_seed(0)
    model = build_model("2nn").double()
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    w_next, _ = run_round(model, w_t, data, client_indices, np.arange(4), config, t=1)

    model.load_state_dict(w_t)
    model.zero_grad()
    F.cross_entropy(model(data.x_train), data.y_train).backward()
    big_step = {name: w_t[name] - 0.3 * p.grad for name, p in model.named_parameters()}
    assert_within_rounding(w_next, big_step, steps=1, longest_sum=120 * 784)   # sums over 120 examples


@pytest.mark.parametrize("field, value, message", [
    ("num_clients", 0, r"num_clients \(K\) must be an integer >= 1"),
    ("frac", -0.1, r"frac \(C\) must be a finite number in \[0, 1\]"),
    ("rounds", 0, "rounds must be an integer >= 1"),
    ("local_epochs", 0, r"epochs \(E\) must be an integer >= 1"),
    ("batch_size", -2, r"batch_size \(B\)"),
    ("lr", -1.0, r"lr \(eta\) must be a finite number > 0"),
    ("eval_every", 0, "eval_every must be an integer >= 1"),
    ("model", "vgg", "model must be one of"),
    ("partition", "x", "partition must be one of"),
    ("dataset", "svhn", "dataset must be one of"),
    ("engine", "fast", "engine must be one of"),
    ("target", 1.5, r"target must be a finite number in \(0, 1\]"),
    ("seed", -1, r"seed must be an integer in \[0, 9223372036854775807\]"),
])
def test_config_rejects_out_of_range_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        FedAvgConfig(**{field: value}).validate()


def test_run_with_all_clients_every_round():
    data = small_data(120)
    config = FedAvgConfig(num_clients=4, frac=1.0, rounds=2, batch_size=None, lr=0.1, device="cpu")
    history = run(config, data, progress=False)
    assert [r.clients for r in history.records] == [[0, 1, 2, 3]] * 2
    assert history.records[-1].bytes_uploaded == 2 * 4 * 4 * 199_210


def test_a_diverging_run_stops_with_a_warning():
    data = small_data(120)
    config = FedAvgConfig(num_clients=4, frac=1.0, rounds=20, batch_size=None, lr=1e12, device="cpu")
    with pytest.warns(UserWarning, match="diverged"):
        history = run(config, data, progress=False)
    assert 1 <= len(history.records) < 20 and history.diverged
    last = history.records[-1]
    assert not np.isfinite(last.train_loss) or not np.isfinite(last.test_loss)   # the clients' loss, or w_{t+1}
    assert all(np.isfinite(r.train_loss) and np.isfinite(r.test_loss) for r in history.records[:-1])


def test_rounds_is_algorithm_1_for_rounds_1_to_T():
    """fedlib.server.rounds against Algorithm 1 written out: rounds t = 1..T (or first..T), each S_t drawn
    by the strategy, each client's update made from w_t, and w_{t+1} = sum_k (n_k / m_t) w_k fed to the
    next round. The clients here are a fake whose update k is w_t + k + 1 with n_k = k + 1, so the
    average is computed by hand."""
    from fedlib.client import ClientResult
    from fedlib.seeds import sampling_rng
    from fedlib.server import rounds
    from fedlib.strategies import FedAvg

    class Shift:
        def update(self, w_t, S_t, t, strategy):
            return {int(k): ClientResult({"w": w_t["w"] + k + 1}, int(k) + 1, 0.0, 1) for k in S_t}

    K, C, T = 10, 0.3, 4
    got = list(rounds({"w": torch.zeros(2, dtype=torch.float64)}, Shift(), FedAvg({}, K, seed=3), K, C, T))
    w = torch.zeros(2, dtype=torch.float64)
    assert [r.t for r in got] == [1, 2, 3, 4]
    for r in got:
        S_t = sorted(int(k) for k in sampling_rng(3, r.t).choice(K, size=3, replace=False))
        assert list(r.S_t) == S_t
        w = w + sum((k + 1) * (k + 1) for k in S_t) / sum(k + 1 for k in S_t)
        assert torch.allclose(r.weights["w"], w, rtol=8 * U64, atol=0)
    assert [r.t for r in rounds({"w": torch.zeros(2)}, Shift(), FedAvg({}, K), K, C, T, first=3)] == [3, 4]


def test_initial_model_draws_w_0_as_the_config_says():
    """init = truncated-normal: every bias 0.1 and every weight in [-0.2, 0.2] (two standard deviations),
    which PyTorch's default (uniform in +-1/sqrt(fan_in), so biases not all equal) is not."""
    from fedlib.server import initial_model

    w_0 = initial_model(FedAvgConfig(model="2nn", init="truncated-normal")).state_dict()
    assert all(torch.equal(v, torch.full_like(v, 0.1)) for k, v in w_0.items() if k.endswith("bias"))
    assert all(v.abs().max() <= 0.2 for k, v in w_0.items() if k.endswith("weight"))
    default = initial_model(FedAvgConfig(model="2nn")).state_dict()
    assert not torch.equal(default["fc1.bias"], torch.full_like(default["fc1.bias"], 0.1))
    colour = initial_model(FedAvgConfig(model="2nn"), num_classes=7, input_shape=(3, 32, 32)).state_dict()
    assert colour["fc1.weight"].shape == (200, 3 * 32 * 32) and colour["fc3.bias"].shape == (7,)
    assert all(v.device.type == "meta" and v.dtype == torch.float64
               for v in initial_model(FedAvgConfig(), device="meta", dtype=torch.float64).state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_local_update_on_a_gpu_is_the_sgd_written_out_on_the_cpu():
    """Client data and model on the GPU: the same E epochs of SGD as written out on the CPU (float64, the
    rounding bound of test_local_update_is_E_epochs_of_minibatch_sgd), and a finite mean training loss."""
    data = small_data(30, dtype=torch.float64)
    torch.manual_seed(0)
    model = build_model("2nn").double()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    result = local_update(model.cuda(), data.x_train.cuda(), data.y_train.cuda(),
                          weights={k: v.cuda() for k, v in w0.items()}, epochs=2, batch_size=10, lr=0.05,
                          generator=torch.Generator().manual_seed(1))
    reference = sgd_by_hand(data.x_train, data.y_train, w0, epochs=2, batch_size=10, lr=0.05, seed=1)
    assert all(v.device.type == "cuda" for v in result.weights.values())
    assert_within_rounding({k: v.cpu() for k, v in result.weights.items()}, reference, steps=6)
    assert 0 < result.train_loss < float("inf")
