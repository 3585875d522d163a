"""Beyond FedAvg: FedProx, SCAFFOLD, the server optimizers and DP-FedAvg.

Each method is checked against its paper's update written out by hand, both engines are
checked equal with it, and each reduces to FedAvg with its neutral setting. Comparisons
run in float64 so that their bounds follow from float precision (as in test_engine.py):
a re-ordered sum of n terms moves a result by at most ~n u relative to the terms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedlib import Dataset, FedAvgConfig, build_model, run
from fedlib.algorithms import ServerOptimizer
from fedlib.client import local_update
from fedlib.privacy import clip, dp_aggregate, epsilon, sample_clients_poisson
from fedlib.server import ServerState, initial_model, run_round
from tests.test_fedavg import sgd_by_hand

U64 = torch.finfo(torch.float64).eps / 2


def data64(n: int = 200, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    x += y.view(-1, 1, 1, 1).double() / 3               # learnable: the label shifts the image
    return Dataset("mnist", x, y, x[:50], y[:50], [str(i) for i in range(10)])


def close(a: dict, b: dict, steps: int = 1, n: int = 784) -> bool:
    """Equal but for re-ordered sums: within steps * n * u * max|w|."""
    return all((a[k] - b[k]).abs().max().item() <= steps * n * U64 * max(b[k].abs().max().item(), 1.0) for k in b)


# --- FedProx ---------------------------------------------------------------------------------

def test_fedprox_adds_mu_times_w_minus_w_t_to_every_gradient():
    data = data64(30)
    torch.manual_seed(0)
    model = build_model("2nn").double()
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    result = local_update(model, data.x_train, data.y_train, weights=w_t, epochs=2, batch_size=10, lr=0.1,
                          mu=0.5, generator=torch.Generator().manual_seed(1))
    # Li et al. 2020: each step follows the gradient of F_k(w) + mu/2 ||w - w_t||^2.
    reference = sgd_by_hand(data.x_train, data.y_train, w_t, epochs=2, batch_size=10, lr=0.1, seed=1,
                            extra=lambda name, p: 0.5 * (p - w_t[name]))
    assert close(result.weights, reference, steps=6)
    assert result.steps == 6
    plain = local_update(model, data.x_train, data.y_train, weights=w_t, epochs=2, batch_size=10, lr=0.1,
                         generator=torch.Generator().manual_seed(1))
    moved = lambda w: sum(((w[k] - w_t[k]) ** 2).sum() for k in w_t).sqrt().item()
    assert moved(result.weights) < moved(plain.weights)                # the proximal term holds w near w_t


# --- SCAFFOLD ----------------------------------------------------------------------------------

def round_setup(**overrides):
    config = FedAvgConfig(num_clients=10, frac=0.3, local_epochs=1, batch_size=10, lr=0.1, seed=4, device="cpu",
                          **overrides).validate()
    data = data64()
    model = initial_model(config, dtype=torch.float64)
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [torch.as_tensor(p) for p in config.split(data.y_train)]
    return config, data, model, w_t, clients


def test_scaffold_with_zero_control_variates_is_fedavg_and_updates_them_as_option_ii():
    config, data, model, w_t, clients = round_setup(scaffold=True)
    selected = np.array([1, 4, 7])
    state = ServerState(config, w_t)
    w_scaffold, _ = run_round(model, w_t, data, clients, selected, config, 1, "sequential", state)
    w_fedavg, _ = run_round(model, w_t, data, clients, selected, FedAvgConfig(**{**config.__dict__,
                                                                                  "scaffold": False}), 1)
    assert all(torch.equal(w_scaffold[k], w_fedavg[k]) for k in w_t)          # round 1: c = c_k = 0
    # Option II with c = c_k = 0 before the round: c_k+ = (w_t - w_k) / (K eta), c = sum_k c_k+ / N.
    results = [local_update(model, data.x_train[clients[k]], data.y_train[clients[k]], weights=w_t, epochs=1,
                            batch_size=10, lr=0.1, generator=__import__("fedlib").shuffle_generator(4, 1, k))
               for k in selected]
    for k, r in zip(selected, results):
        expected = {n: (w_t[n] - r.weights[n]) / (r.steps * 0.1) for n in w_t}
        assert close(state.scaffold.control(k), expected)
    c = {n: sum((w_t[n] - r.weights[n]) / (r.steps * 0.1) for r in results) / 10 for n in w_t}
    assert close(state.scaffold.c, c)
    # Round 2 corrects every step by c - c_k, so it is no longer FedAvg's.
    w2_scaffold, _ = run_round(model, w_scaffold, data, clients, selected, config, 2, "sequential", state)
    w2_fedavg, _ = run_round(model, w_fedavg, data, clients, selected, FedAvgConfig(**{**config.__dict__,
                                                                                     "scaffold": False}), 2)
    assert not close(w2_scaffold, w2_fedavg)


def test_scaffold_correction_is_added_to_every_step():
    data = data64(20)
    torch.manual_seed(0)
    model = build_model("2nn").double()
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    shift = {name: torch.full_like(p, 0.01) for name, p in model.named_parameters()}
    with_shift = local_update(model, data.x_train, data.y_train, weights=w_t, epochs=1, batch_size=None, lr=0.1,
                              correction=shift)
    model.load_state_dict(w_t)
    model.zero_grad()
    F.cross_entropy(model(data.x_train), data.y_train).backward()
    expected = {name: w_t[name] - 0.1 * (p.grad + 0.01) for name, p in model.named_parameters()}
    assert close(with_shift.weights, expected, n=20 * 784)


# --- server optimizers ---------------------------------------------------------------------------

def test_server_sgd_with_rate_1_is_the_average_and_momentum_is_fedavgm():
    torch.manual_seed(0)
    w0 = {"w": torch.randn(5, dtype=torch.float64)}
    avg1, avg2 = {"w": w0["w"] + 0.1}, {"w": w0["w"] + 0.3}
    plain = ServerOptimizer(w0, "sgd", lr=1.0, momentum=0.0)
    assert close(plain.step(w0, avg1), avg1)                 # FedAvg: w_{t+1} = the average
    fedavgm = ServerOptimizer(w0, "sgd", lr=0.5, momentum=0.9)
    w1 = fedavgm.step(w0, avg1)
    v1 = w0["w"] - avg1["w"]                                 # Hsu et al. 2019: v <- beta v + Delta; w <- w - eta v
    assert torch.allclose(w1["w"], w0["w"] - 0.5 * v1, rtol=0, atol=4 * U64)
    avg2 = {"w": w1["w"] + 0.3}
    w2 = fedavgm.step(w1, avg2)
    v2 = 0.9 * v1 + (w1["w"] - avg2["w"])
    assert torch.allclose(w2["w"], w1["w"] - 0.5 * v2, rtol=0, atol=8 * U64)


def test_fedadam_is_adam_on_the_pseudo_gradient():
    w0 = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    avg = {"w": torch.tensor([1.2, -2.1, 0.5], dtype=torch.float64)}
    opt = ServerOptimizer(w0, "adam", lr=0.01, momentum=0.9, beta2=0.99, tau=1e-3)
    w1 = opt.step(w0, avg)
    g = w0["w"] - avg["w"]
    m, v = 0.1 * g, 0.01 * g ** 2                            # first step of Adam, then its bias correction
    expected = w0["w"] - 0.01 * (m / 0.1) / ((v / 0.01).sqrt() + 1e-3)
    assert torch.allclose(w1["w"], expected, rtol=0, atol=8 * U64)


# --- both engines, resuming, and FedAvg as the neutral case ----------------------------------------

@pytest.mark.parametrize("overrides", [dict(mu=0.1), dict(scaffold=True), dict(server_opt="adam", server_lr=0.01,
                                                                               server_momentum=0.9),
                                       dict(server_momentum=0.9), dict(dp_clip=1.0, dp_noise=0.5)],
                         ids=["fedprox", "scaffold", "fedadam", "fedavgm", "dp-fedavg"])
def test_both_engines_run_every_method_alike(overrides):
    data = data64(400)
    settings = dict(num_clients=20, frac=0.2, rounds=3, batch_size=10, seed=5, device="cpu", **overrides)
    runs = {e: run(FedAvgConfig(engine=e, **settings), data, progress=False) for e in ("sequential", "vectorized")}
    seq, vec = runs["sequential"], runs["vectorized"]
    assert [r.clients for r in vec.records] == [r.clients for r in seq.records]
    assert vec.accuracies == seq.accuracies
    assert close(vec.model.state_dict(), seq.model.state_dict(), steps=3 * 20)


def test_neutral_settings_are_fedavg():
    data = data64(400)
    base = dict(num_clients=20, frac=0.2, rounds=3, batch_size=10, seed=5, device="cpu")
    fedavg_run = run(FedAvgConfig(**base), data, progress=False)
    neutral = run(FedAvgConfig(mu=0.0, scaffold=False, server_opt="sgd", server_lr=1.0, server_momentum=0.0,
                               dp_clip=None, **base), data, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(fedavg_run.model.state_dict().values(),
                                                 neutral.model.state_dict().values()))


@pytest.mark.parametrize("overrides", [dict(scaffold=True), dict(server_opt="adam", server_lr=0.01)],
                         ids=["scaffold", "fedadam"])
def test_an_interrupted_run_resumes_with_the_servers_state(tmp_path, overrides):
    data = data64(400)
    config = FedAvgConfig(num_clients=20, frac=0.2, rounds=4, batch_size=10, seed=5, device="cpu", **overrides)
    full = run(config, data, progress=False)

    def stop_in_round_2(record):
        if record.round == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(config, data, progress=False, checkpoint=tmp_path / "run.ckpt", on_round=stop_in_round_2)
    resumed = run(config, data, progress=False, checkpoint=tmp_path / "run.ckpt")
    assert [r.round for r in resumed.records] == [1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))


def test_scaffold_uploads_twice_the_bytes():
    data = data64(400)
    base = dict(num_clients=20, frac=0.2, rounds=1, batch_size=10, seed=5, device="cpu")
    one = run(FedAvgConfig(**base), data, progress=False).records[0].bytes_uploaded
    two = run(FedAvgConfig(scaffold=True, **base), data, progress=False).records[0].bytes_uploaded
    assert two == 2 * one


# --- DP-FedAvg ----------------------------------------------------------------------------------------

def test_clipping_bounds_the_update_and_keeps_small_ones():
    delta = {"a": torch.full((3,), 3.0, dtype=torch.float64), "b": torch.full((1,), 4.0, dtype=torch.float64)}
    norm = math.sqrt(3 * 9 + 16)
    clipped = clip(delta, 1.0)
    assert math.sqrt(sum((v ** 2).sum().item() for v in clipped.values())) == pytest.approx(1.0, rel=1e-12)
    assert torch.allclose(clipped["a"] / clipped["b"][0], delta["a"] / delta["b"][0])      # direction kept
    assert all(torch.equal(v, delta[k]) for k, v in clip(delta, 2 * norm).items())


def test_dp_aggregate_is_the_noisy_clipped_sum_over_q_k():
    w_t = {"w": torch.zeros(20000, dtype=torch.float64)}
    clients = [{"w": torch.full((20000,), 0.001, dtype=torch.float64)}] * 4       # norm 0.14 < S: not clipped
    quiet = dp_aggregate(w_t, clients, clip_norm=1.0, noise_multiplier=0.0, expected_clients=8,
                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(quiet["w"], torch.full((20000,), 4 * 0.001 / 8, dtype=torch.float64))
    noisy = dp_aggregate(w_t, [], clip_norm=2.0, noise_multiplier=1.5, expected_clients=8,
                         generator=torch.Generator().manual_seed(0))
    assert noisy["w"].std().item() == pytest.approx(1.5 * 2.0 / 8, rel=0.03)       # z S / (q K), 20,000 draws


def test_poisson_sampling_takes_each_client_with_probability_q():
    rng = np.random.default_rng(0)
    counts = [len(sample_clients_poisson(100, 0.1, rng)) for _ in range(2000)]
    assert np.mean(counts) == pytest.approx(10, rel=0.03) and min(counts) < 10 < max(counts)


def test_epsilon_comes_from_the_rdp_accountant():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(range(2, 257)))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert epsilon(1.0, 0.1, 100, 1e-4) == accountant.get_epsilon(1e-4)
    assert epsilon(2.0, 0.1, 100, 1e-4) < epsilon(1.0, 0.1, 100, 1e-4) < epsilon(1.0, 0.1, 400, 1e-4)
    assert epsilon(0.0, 0.1, 100, 1e-4) == math.inf


@pytest.mark.parametrize("overrides, message", [
    (dict(dp_noise=1.0), "dp_noise needs a clipping norm"),
    (dict(dp_clip=1.0, frac=0.0), "dp_clip needs frac"),
    (dict(dp_clip=1.0, scaffold=True), "cannot be combined"),
    (dict(mu=-1.0), "mu must be a finite number >= 0"),
    (dict(server_momentum=1.0), r"server_momentum must be a finite number in \[0, 1\)"),
    (dict(server_lr=0.0), "server_lr must be a finite number > 0"),
    (dict(server_opt="yogi"), "server_opt must be one of"),
    (dict(dp_clip=float("inf")), "dp_clip must be a finite number > 0"),
])
def test_bad_settings_of_the_new_methods_are_refused(overrides, message):
    from fedlib.params import InputError

    with pytest.raises(InputError, match=message):
        FedAvgConfig(**overrides).validate()
