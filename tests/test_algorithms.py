"""Beyond FedAvg: every method against its paper's equations, written out here independently.

:class:`Reference` implements FedAvg, FedProx, SCAFFOLD (option II), FedAvgM, FedAdam, FedYogi
and DP-FedAvg from the papers' update rules, sharing nothing with fedlib's training code: its
2NN forward pass, its SGD steps, its averages, control variates, server moments, clipping and
noise are all written below. What it takes from fedlib are facts, not computations: the
initial weights w_0, the partition P_k and the random streams (``fedlib.seeds``), so that both
draw the same clients, batches and noise. Each method then runs for several rounds (SCAFFOLD
with clients that return, so its control variates are non-zero; FedProx with mu > 0; the
server optimizers with momentum), through ``fedlib.run`` with each engine separately, and the
final weights must match the reference.

Comparisons run in float64, so the bound follows from float precision (as in test_engine.py):
T rounds of S local steps, each made of sums of at most n = 784 terms, re-ordered, move a
weight by about T S n u max|w| (u = 2^-53, about 1e-16). A wrong sign, a missing term or a
method switched off moves the weights by 1e-4 or more, which the bound cannot hide (each test
also checks that its method's result differs from FedAvg's by far more than the bound).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedlib import Dataset, FedAvgConfig, run
from fedlib.client import local_update
from fedlib.metrics import History
from fedlib.params import InputError
from fedlib.privacy import clip, dp_aggregate, epsilon, poisson_sample, secret_normal, secret_uniform, seeded_normal
from fedlib.seeds import noise_generator, sampling_rng, shuffle_generator
from fedlib.server import initial_model
from tests.helpers import U64, sgd_by_hand

ROUNDS = 5


def data64(n: int = 200, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    x += y.view(-1, 1, 1, 1).double() / 3               # learnable: the label shifts the image
    return Dataset("mnist", x, y, x[:50], y[:50], [str(i) for i in range(10)])


def close(a: dict, b: dict, steps: int, n: int = 784) -> bool:
    """Equal but for re-ordered sums: within steps * n * u * max|w|."""
    return all((a[k] - b[k]).abs().max().item() <= steps * n * U64 * max(b[k].abs().max().item(), 1.0) for k in b)


def distance(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


# --- the methods, written from their papers -------------------------------------------------------

def forward(w: dict, x: torch.Tensor) -> torch.Tensor:
    """The paper's 2NN: two hidden layers of 200 ReLU units, then 10 logits."""
    h = x.flatten(1)
    h = torch.relu(h @ w["fc1.weight"].T + w["fc1.bias"])
    h = torch.relu(h @ w["fc2.weight"].T + w["fc2.bias"])
    return h @ w["fc3.weight"].T + w["fc3.bias"]


class Reference:
    """Algorithm 1 of each paper, one round at a time, with the method's hooks written inline."""

    def __init__(self, config: FedAvgConfig, data: Dataset):
        self.c, self.data = config, data
        self.x = {k: v.clone() for k, v in initial_model(config, dtype=torch.float64).state_dict().items()}
        self.P = [torch.as_tensor(p) for p in config.split(data.y_train)]
        self.zero = lambda: {k: torch.zeros_like(v) for k, v in self.x.items()}
        self.control = self.zero()                               # SCAFFOLD's c
        self.client_control = {k: self.zero() for k in range(config.num_clients)}      # c_k, 0 at first
        self.m = self.zero()                                     # server momentum / first moment
        tau = config.server_tau if config.server_tau is not None else 1e-3
        self.v = {k: torch.full_like(v, tau ** 2) for k, v in self.x.items()}         # v_{-1} = tau^2
        self.rounds_clients: list[list[int]] = []

    def select(self, t: int) -> list[int]:
        c = self.c
        rng = sampling_rng(c.seed, t)
        if c.strategy == "dp-fedavg":                            # Poisson: each client with probability q
            return [k for k, u in enumerate(rng.random(c.num_clients)) if u < c.frac]
        m = max(int(c.frac * c.num_clients), 1)
        return sorted(int(k) for k in rng.choice(c.num_clients, size=m, replace=False))

    def client(self, k: int, t: int) -> tuple[dict, int]:
        """E epochs of minibatch SGD from x_t; returns y_k and the number of steps."""
        c = self.c
        x_k, y_k = self.data.x_train[self.P[k]], self.data.y_train[self.P[k]]
        w = {name: v.clone().requires_grad_(True) for name, v in self.x.items()}
        g = shuffle_generator(c.seed, t, k)
        mu = c.mu if c.strategy == "fedprox" else 0.0
        steps = 0
        for _ in range(c.local_epochs):
            order = torch.randperm(len(y_k), generator=g)
            for batch in order.split(c.batch_size) if c.batch_size else [order]:
                loss = F.cross_entropy(forward(w, x_k[batch]), y_k[batch])
                grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()))))
                with torch.no_grad():
                    for name, p in w.items():
                        d = grads[name]
                        if mu:                                   # FedProx: grad of mu/2 ||w - x_t||^2
                            d = d + mu * (p - self.x[name])
                        if c.strategy == "scaffold":             # SCAFFOLD: y <- y - eta (g - c_k + c)
                            d = d - self.client_control[k][name] + self.control[name]
                        p -= c.lr * d
                steps += 1
        return {name: p.detach() for name, p in w.items()}, steps

    def round(self, t: int) -> None:
        c, S = self.c, self.select(t)
        self.rounds_clients.append(S)
        results = {k: self.client(k, t) for k in S}
        n = {k: len(self.P[k]) for k in S}
        total = sum(n.values())
        if c.strategy == "dp-fedavg":
            self.x = self.dp_step(results, t)
            return
        average = {name: sum(n[k] * results[k][0][name] for k in S) / total for name in self.x}
        delta = {name: average[name] - self.x[name] for name in self.x}
        if c.strategy == "scaffold":                             # option II, then c += (1/N) sum (c_k+ - c_k)
            change = self.zero()
            for k in S:
                y, steps = results[k]
                new = {name: self.client_control[k][name] - self.control[name]
                       + (self.x[name] - y[name]) / (steps * c.lr) for name in self.x}
                for name in self.x:
                    change[name] += new[name] - self.client_control[k][name]
                self.client_control[k] = new
            for name in self.x:
                self.control[name] = self.control[name] + change[name] / c.num_clients
        if c.strategy == "fedavgm":                              # Hsu et al.: v <- beta v + Delta, x <- x + eta_g v
            for name in self.x:
                self.m[name] = c.server_momentum * self.m[name] + delta[name]
                self.x[name] = self.x[name] + c.server_lr * self.m[name]
        elif c.strategy in ("fedadam", "fedyogi"):              # Reddi et al., Algorithm 2
            b1, b2, tau = c.server_beta1 or 0.9, c.server_beta2 or 0.99, c.server_tau or 1e-3
            for name in self.x:
                d2 = delta[name] ** 2
                self.m[name] = b1 * self.m[name] + (1 - b1) * delta[name]
                if c.strategy == "fedadam":
                    self.v[name] = b2 * self.v[name] + (1 - b2) * d2
                else:
                    self.v[name] = self.v[name] - (1 - b2) * d2 * torch.sign(self.v[name] - d2)
                self.x[name] = self.x[name] + c.server_lr * self.m[name] / (self.v[name].sqrt() + tau)
        else:                                                    # FedAvg, FedProx, SCAFFOLD (global rate 1)
            self.x = average

    def dp_step(self, results: dict, t: int) -> dict:
        """McMahan et al. 2018: clip each Delta_k to S, add N(0, z^2 S^2) to the sum, divide by qK."""
        c = self.c
        total = self.zero()
        for y, _ in results.values():
            delta = {name: y[name] - self.x[name] for name in self.x}
            norm = math.sqrt(sum((d ** 2).sum().item() for d in delta.values()))
            factor = min(1.0, c.dp_clip / norm)
            for name in self.x:
                total[name] += factor * delta[name]
        g = noise_generator(c.seed, t)
        noise = {name: torch.randn(v.shape, generator=g, dtype=torch.float64) for name, v in self.x.items()}
        eta_g = c.server_lr if c.server_lr is not None else 1.0
        return {name: self.x[name] + eta_g * (total[name] + c.dp_noise * c.dp_clip * noise[name])
                / (c.frac * c.num_clients) for name in self.x}

    def train(self) -> dict:
        for t in range(1, self.c.rounds + 1):
            self.round(t)
        return self.x


BASE = dict(num_clients=10, frac=0.5, local_epochs=2, batch_size=10, lr=0.1, rounds=ROUNDS, seed=4, device="cpu")
METHODS = {
    "fedavg": dict(partition="unbalanced", min_size=8),         # unequal n_k: the weights n_k / m_t matter
    "fedprox": dict(strategy="fedprox", mu=0.5),
    "scaffold": dict(strategy="scaffold"),
    "fedavgm": dict(strategy="fedavgm", server_lr=1.0, server_momentum=0.9),
    "fedadam": dict(strategy="fedadam", server_lr=0.01),
    "fedyogi": dict(strategy="fedyogi", server_lr=0.01, server_beta1=0.5, server_tau=1e-2),
    "dp-fedavg": dict(strategy="dp-fedavg", dp_clip=0.5, dp_noise=0.3, dp_reproducible=True, server_lr=2.0),
}


@pytest.fixture(scope="module")
def data() -> Dataset:
    return data64()


@pytest.fixture(scope="module")
def references(data) -> dict:
    return {name: Reference(FedAvgConfig(**BASE | overrides).validate(), data) for name, overrides in METHODS.items()}


class Trained(dict):
    """The references, each trained on first use: a test of one method (as ``make mutation`` runs
    them, a few tests per mutant) trains only that method's."""

    def __init__(self, references: dict):
        super().__init__()
        self.references = references

    def __missing__(self, method: str) -> Reference:
        self.references[method].train()
        self[method] = self.references[method]
        return self[method]


@pytest.fixture(scope="module")
def trained(references) -> dict:
    return Trained(references)


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_equals_its_papers_equations_over_several_rounds(data, trained, method, engine):
    reference = trained[method]
    history = run(FedAvgConfig(**BASE | METHODS[method] | dict(engine=engine)), data, progress=False)
    assert [r.clients for r in history.records] == reference.rounds_clients
    steps_per_round = BASE["local_epochs"] * max(math.ceil(len(p) / BASE["batch_size"]) for p in reference.P)
    assert close(history.model.state_dict(), reference.x, steps=ROUNDS * steps_per_round), \
        f"{method} ({engine}) differs from its equations by {distance(history.model.state_dict(), reference.x):.2e}"


@pytest.mark.parametrize("method", [m for m in METHODS if m != "fedavg"])
def test_each_method_changes_what_fedavg_computes(data, trained, method):
    """The method's reference is not FedAvg's, by far more than the bound: a method switched off fails."""
    fedavg = Reference(FedAvgConfig(**BASE | {k: v for k, v in METHODS[method].items()
                                              if k in ("partition", "min_size")}).validate(), data).train()
    assert distance(trained[method].x, fedavg) > 1e-4


def test_scaffold_control_variates_are_non_zero_and_clients_return(trained):
    """The comparison above covers c and c_k: clients come back in later rounds, with c_k != 0."""
    reference = trained["scaffold"]
    seen = [k for S in reference.rounds_clients[:-1] for k in S]
    assert set(reference.rounds_clients[-1]) & set(seen)
    assert max(v.abs().max().item() for v in reference.control.values()) > 1e-3


def test_fedadam_has_no_bias_correction_at_its_first_step():
    """Reddi et al.'s first step is eta m_0 / (sqrt(v_0) + tau) with m_0 = (1 - beta_1) Delta and
    v_0 = beta_2 tau^2 + (1 - beta_2) Delta^2: about eta Delta / (|Delta| + 10 tau), where Adam with bias
    correction steps eta Delta / (|Delta| + tau)."""
    from fedlib.client import ClientResult
    from fedlib.strategies import FedAdam

    w_t = {"w": torch.zeros(3, dtype=torch.float64)}
    delta = torch.tensor([1e-3, -2e-3, 5e-4], dtype=torch.float64)
    strategy = FedAdam(w_t, 10, server_lr=0.1)
    w_next = strategy.aggregate(w_t, {0: ClientResult({"w": delta}, 1, 0.0, 1)}, 1)
    v0 = 0.99 * 1e-6 + 0.01 * delta ** 2
    assert torch.allclose(w_next["w"], 0.1 * 0.1 * delta / (v0.sqrt() + 1e-3), rtol=1e-12, atol=0)
    bias_corrected = 0.1 * delta / (delta.abs() + 1e-3)
    assert (w_next["w"] - bias_corrected).abs().max() > 0.5 * bias_corrected.abs().max()


def test_fedprox_adds_mu_times_w_minus_w_t_to_every_gradient():
    data = data64(30)
    torch.manual_seed(0)
    from fedlib.models import build_model
    model = build_model("2nn").double()
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    result = local_update(model, data.x_train, data.y_train, weights=w_t, epochs=2, batch_size=10, lr=0.1,
                          mu=0.5, generator=torch.Generator().manual_seed(1))
    reference = sgd_by_hand(data.x_train, data.y_train, w_t, epochs=2, batch_size=10, lr=0.1, seed=1,
                            extra=lambda name, p: 0.5 * (p - w_t[name]))
    assert close(result.weights, reference, steps=6)
    plain = local_update(model, data.x_train, data.y_train, weights=w_t, epochs=2, batch_size=10, lr=0.1,
                         generator=torch.Generator().manual_seed(1))
    moved = lambda w: sum(((w[k] - w_t[k]) ** 2).sum() for k in w_t).sqrt().item()
    assert moved(result.weights) < moved(plain.weights)                # the proximal term holds w near w_t


# --- resuming, and what the methods upload ------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(strategy="scaffold"), dict(strategy="fedadam"),
                                       dict(strategy="fedavgm"), dict(strategy="fedyogi"),
                                       dict(strategy="dp-fedavg", dp_reproducible=True)],
                         ids=["fedavg", "scaffold", "fedadam", "fedavgm", "fedyogi", "dp-fedavg"])
def test_an_interrupted_run_resumes_with_the_servers_state(tmp_path, overrides):
    """In process, Ctrl-C in round 2 then the same call again: the History and the final weights equal
    an uninterrupted run's, bit for bit (tests/test_bad_input.py sends the real signal to the CLI)."""
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
    same = lambda h: [(r.round, r.clients, r.test_accuracy, r.test_loss, r.train_loss, r.bytes_uploaded)
                      for r in h.records]
    assert same(resumed) == same(full)
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))


def test_scaffold_uploads_twice_the_bytes():
    data = data64(400)
    base = dict(num_clients=20, frac=0.2, rounds=1, batch_size=10, seed=5, device="cpu")
    one = run(FedAvgConfig(**base), data, progress=False).records[0].bytes_uploaded
    two = run(FedAvgConfig(strategy="scaffold", **base), data, progress=False).records[0].bytes_uploaded
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
                         noise=seeded_normal(torch.Generator().manual_seed(0)))
    assert torch.allclose(quiet["w"], torch.full((20000,), 4 * 0.001 / 8, dtype=torch.float64))
    for noise in (seeded_normal(torch.Generator().manual_seed(0)), secret_normal):
        noisy = dp_aggregate(w_t, [], clip_norm=2.0, noise_multiplier=1.5, expected_clients=8, noise=noise)
        assert noisy["w"].mean().item() == pytest.approx(0, abs=4 * 1.5 * 2.0 / 8 / math.sqrt(20000))
        assert noisy["w"].std().item() == pytest.approx(1.5 * 2.0 / 8, rel=0.03)   # z S / (q K), 20,000 draws


def test_the_secret_streams_are_uniform_and_normal():
    u = secret_uniform(100_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / 100_000)
    z = secret_normal((100_000,))
    assert abs(z.mean().item()) < 4 / math.sqrt(100_000) and z.std().item() == pytest.approx(1, rel=0.02)
    assert abs(((z ** 4).mean() - 3).item()) < 0.1                 # a Gaussian's fourth moment
    assert not np.array_equal(secret_uniform(8), secret_uniform(8))


def test_poisson_sampling_takes_each_client_with_probability_q():
    rng = np.random.default_rng(0)
    counts = [len(poisson_sample(rng.random(100), 0.1)) for _ in range(2000)]
    assert np.mean(counts) == pytest.approx(10, rel=0.03) and min(counts) < 10 < max(counts)


def test_a_default_dp_run_cannot_be_regenerated_from_its_files():
    """Without dp_reproducible the sample and the noise come from the operating system: the same
    config (the seed included, which every History stores) gives another run, and the seeded noise
    of the history's seed is not the noise that was added."""
    data = data64(400)
    config = FedAvgConfig(num_clients=20, frac=0.3, rounds=1, batch_size=10, seed=5, device="cpu",
                          strategy="dp-fedavg", dp_clip=0.5, dp_noise=1.0)
    first, second = run(config, data, progress=False), run(config, data, progress=False)
    w1, w2 = first.model.state_dict(), second.model.state_dict()
    assert distance(w1, w2) > 1e-3
    seeded = FedAvgConfig.from_dict(first.config)
    assert seeded.seed == 5 and not seeded.dp_reproducible
    replay = run(FedAvgConfig(**vars(seeded) | dict(dp_reproducible=True)), data, progress=False).model.state_dict()
    assert distance(replay, w1) > 1e-3 and distance(replay, w2) > 1e-3
    again = run(FedAvgConfig(**vars(seeded) | dict(dp_reproducible=True)), data, progress=False).model.state_dict()
    assert distance(replay, again) == 0.0                           # the teaching switch is reproducible


def test_a_default_dp_runs_history_does_not_say_who_took_part():
    """Epsilon's amplification by sampling needs S_t secret: a default DP run's History (and its
    JSON) records no clients, no training loss and the expected uploads q K t model sizes; the
    seeded teaching run records S_t as FedAvg does, every client of which took part."""
    data = data64(400)
    config = FedAvgConfig(num_clients=20, frac=0.3, rounds=3, batch_size=10, seed=5, device="cpu",
                          strategy="dp-fedavg", dp_clip=0.5, dp_noise=1.0)
    model_size = 4 * sum(p.numel() for p in initial_model(config).parameters())      # float32 bytes
    secret = run(config, data, progress=False)
    saved = json.loads(json.dumps(secret.to_dict()))
    for t, record in enumerate(saved["records"], start=1):
        assert record["clients"] == [] and record["train_loss"] is None
        assert record["bytes_uploaded"] == round(0.3 * 20 * t * model_size)
    assert History.from_dict(saved).records[-1].test_accuracy == secret.final_accuracy
    seeded = run(FedAvgConfig(**vars(config) | dict(dp_reproducible=True)), data, progress=False)
    assert any(r.clients for r in seeded.records) and all(math.isfinite(r.train_loss) for r in seeded.records if r.clients)
    assert seeded.records[-1].bytes_uploaded == sum(len(r.clients) for r in seeded.records) * model_size


# --- epsilon ------------------------------------------------------------------------------------------

def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism with mu = sensitivity / std (Balle and Wang 2018,
    Theorem 8): the epsilon at which Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta, by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    gap = lambda eps: phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2) - delta
    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if gap(middle) > 0 else (low, middle)
    return high


@pytest.mark.parametrize("z, rounds", [(1.0, 10), (2.0, 50), (0.7, 4)])
def test_epsilon_without_sampling_is_the_gaussian_mechanisms(z, rounds):
    """With q = 1 every round is the Gaussian mechanism, and T of them compose to one with
    mu = sqrt(T) / z (Dong, Roth and Su 2019, Corollary 3.3): an independent, exact epsilon. The PLD
    accountant must find it (up to its discretisation, 1e-4 per round in the privacy loss); the RDP
    accountant may only be above it."""
    pytest.importorskip("dp_accounting")
    exact = gaussian_epsilon(math.sqrt(rounds) / z, 1e-5)
    pld, rdp = epsilon(z, 1.0, rounds, 1e-5, accountant="pld"), epsilon(z, 1.0, rounds, 1e-5)
    assert exact - 1e-6 <= pld <= exact + rounds * 1e-4 + 1e-3
    assert rdp >= pld


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0])
def test_pld_is_at_most_rdp_and_epsilon_grows_with_rounds(z):
    pytest.importorskip("dp_accounting")
    rdp, pld = epsilon(z, 0.1, 50, 1e-4), epsilon(z, 0.1, 50, 1e-4, accountant="pld")
    assert 0 < pld <= rdp
    assert epsilon(z, 0.1, 100, 1e-4) > rdp > epsilon(z * 1.5, 0.1, 50, 1e-4)
    assert epsilon(0.0, 0.1, 100, 1e-4) == math.inf


def test_epsilon_uses_the_accountants_default_orders_not_integers_only():
    """The integer orders 2..256 alone gave about 2.8 times the epsilon at z = 0.3."""
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant

    integers = rdp_privacy_accountant.RdpAccountant(orders=list(range(2, 257)))
    integers.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(0.3)), 20)
    assert epsilon(0.3, 0.1, 20, 1e-4) < integers.get_epsilon(1e-4) / 2


# --- what the methods refuse ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(dp_noise=1.0), "dp_noise is a parameter of dp-fedavg, not of strategy 'fedavg'"),
    (dict(mu=0.1, strategy="scaffold"), "mu is a parameter of fedprox"),
    (dict(server_lr=0.5), "server_lr is a parameter of fedavgm and fedadam and fedyogi and dp-fedavg"),
    (dict(strategy="dp-fedavg", frac=0.0), "dp-fedavg needs frac"),
    (dict(strategy="scaffold", momentum=0.9), "scaffold .* needs momentum = 0 and weight_decay = 0"),
    (dict(strategy="scaffold", weight_decay=1e-4), "scaffold .* needs momentum = 0"),
    (dict(strategy="fedprox", mu=-1.0), "mu .* must be a finite number >= 0"),
    (dict(strategy="fedavgm", server_momentum=1.0), r"server_momentum .* must be a finite number in \[0, 1\)"),
    (dict(strategy="fedadam", server_lr=0.0), "server_lr .* must be a finite number > 0"),
    (dict(strategy="fedavgm", server_beta1=0.5), "server_beta1 is a parameter of fedadam and fedyogi"),
    (dict(strategy="yogi"), "strategy must be one of"),
    (dict(strategy="dp-fedavg", dp_clip=float("inf")), "dp_clip .* must be a finite number > 0"),
    (dict(strategy="dp-fedavg", dp_reproducible=1), "dp_reproducible must be True or False"),
])
def test_bad_settings_of_the_methods_are_refused(overrides, message):
    with pytest.raises(InputError, match=message):
        FedAvgConfig(**overrides).validate()


def test_configs_saved_before_methods_were_strategies_read_as_strategies():
    from fedlib.config import upgrade

    old = dict(FedAvgConfig().to_dict(), mu=0.0, scaffold=True, server_opt="sgd", server_lr=1.0,
               server_momentum=0.0, server_beta2=0.99, server_tau=1e-3, dp_clip=None, dp_noise=0.0)
    for key in ("strategy", "server_beta1", "dp_reproducible"):
        old.pop(key)
    assert FedAvgConfig.from_dict(old).strategy == "scaffold"
    assert FedAvgConfig.from_dict(old | dict(scaffold=False, server_momentum=0.5)).server_momentum == 0.5
    assert upgrade(old | dict(scaffold=False, mu=0.1))["strategy"] == "fedprox"
    with pytest.raises(InputError, match="bias correction"):
        FedAvgConfig.from_dict(old | dict(scaffold=False, server_opt="adam"))


# --- found by mutation testing (make mutation; benchmarks/mutation.md lists each mutant and its test) -------

def test_fedyogi_keeps_v_where_it_equals_delta_squared():
    """Yogi's v_t = v_{t-1} - (1 - beta_2) Delta^2 sign(v_{t-1} - Delta^2) leaves v alone where v_{t-1} = Delta^2
    exactly (sign 0): with v_{-1} = tau^2 and Delta = tau (a power of two, so Delta^2 = tau^2 exactly) the first
    step is eta_g (1 - beta_1) Delta / (tau + tau), by hand from Reddi et al.'s Algorithm 2."""
    from fedlib.client import ClientResult
    from fedlib.strategies import FedYogi

    tau = 2.0 ** -10
    w_t = {"w": torch.zeros(2, dtype=torch.float64)}
    delta = torch.tensor([tau, -tau], dtype=torch.float64)
    strategy = FedYogi(w_t, 10, server_lr=0.5, server_beta1=0.9, server_beta2=0.99, server_tau=tau)
    w_next = strategy.aggregate(w_t, {0: ClientResult({"w": delta}, 1, 0.0, 1)}, 1)
    assert torch.equal(strategy.v["w"], torch.full((2,), tau ** 2, dtype=torch.float64))
    assert torch.allclose(w_next["w"], 0.5 * 0.1 * delta / (2 * tau), rtol=4 * U64, atol=0)


def test_dp_fedavg_draws_its_sample_and_noise_from_the_os_unless_told_otherwise():
    """Built without dp_reproducible (the class's own default, as fedlib.run builds it from a config), the
    sample is not the seeded Poisson sample of the run's seed (the chance of equal samples of 100 clients with
    q = 1/2 is 2^-100), and the same round aggregated twice gets two different noises."""
    from fedlib.client import ClientResult
    from fedlib.strategies import DPFedAvg

    w_t = {"w": torch.zeros(50, dtype=torch.float64)}
    strategy = DPFedAvg(w_t, 100, seed=5, frac=0.5, dp_clip=1.0, dp_noise=1.0)
    seeded = [k for k, u in enumerate(sampling_rng(5, 1).random(100)) if u < 0.5]
    assert list(strategy.select(100, 0.5, 1)) != seeded
    updates = {0: ClientResult({"w": torch.full((50,), 0.01, dtype=torch.float64)}, 1, 0.0, 1)}
    assert distance(strategy.aggregate(w_t, updates, 1), strategy.aggregate(w_t, updates, 1)) > 0
    teaching = DPFedAvg(w_t, 100, seed=5, frac=0.5, dp_reproducible=True)
    assert list(teaching.select(100, 0.5, 1)) == seeded


def test_a_method_built_without_a_seed_or_knobs_takes_the_documented_defaults():
    """A strategy class's defaults are what a config leaves unset gets (fedlib.config: "the method's
    default"): seed 0 as FedAvgConfig's; FedProx mu = 0.01; FedAvgM eta_g = 1, beta = 0.9 (Hsu et al.'s);
    DP-FedAvg q = 0.1, S = 1, z = 1, eta_g = 1 ("1 by default"). S_t of seed 0 is drawn here by hand."""
    from fedlib.strategies import DPFedAvg, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Scaffold

    w_0 = {"w": torch.zeros(3, dtype=torch.float64)}
    config = FedAvgConfig()
    assert config.seed == 0
    by_hand = sorted(int(k) for k in sampling_rng(0, 3).choice(20, size=5, replace=False))
    for cls in (FedAvg, FedProx, Scaffold, FedAvgM, FedAdam, FedYogi):
        assert list(cls(w_0, 20).select(20, 0.25, 3)) == by_hand, cls.name
    assert list(DPFedAvg(w_0, 20, dp_reproducible=True).select(20, 0.1, 3)) == \
        [k for k, u in enumerate(sampling_rng(0, 3).random(20)) if u < 0.1]
    assert FedProx(w_0, 20).mu == 0.01
    assert Scaffold(w_0, 20).lr == config.lr                       # eta_l, the clients' default rate
    assert (FedAvgM(w_0, 20).eta_g, FedAvgM(w_0, 20).beta) == (1.0, 0.9)
    assert FedAdam(w_0, 20).eta_g == 0.01
    dp = DPFedAvg(w_0, 20)
    assert (dp.q, dp.clip_norm, dp.z, dp.eta_g, dp.reproducible) == (config.frac, 1.0, 1.0, 1.0, False)


@pytest.mark.parametrize("knob", ["server_lr", "server_beta1", "server_beta2", "server_tau"])
def test_fedadam_refuses_a_knob_out_of_range_by_its_name(knob):
    from fedlib.strategies import FedAdam

    with pytest.raises(InputError, match=f"^{knob} "):
        FedAdam({"w": torch.zeros(3)}, 4, **{knob: -1.0})


def test_the_training_loss_is_averaged_with_the_weights_n_k_over_m_t():
    """fedlib.strategies.weighted_mean: sum_k (n_k / m_t) loss_k, by hand; nan for a round without clients."""
    from fedlib.strategies import weighted_mean

    assert weighted_mean([1.0, 4.0, 0.5], [1, 3, 4]) == pytest.approx((1 * 1.0 + 3 * 4.0 + 4 * 0.5) / 8, rel=4 * U64)
    assert math.isnan(weighted_mean([], []))


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi"])
def test_a_round_where_every_client_failed_keeps_w_t(method):
    from fedlib.strategies import STRATEGIES

    w_t = {"w": torch.ones(3, dtype=torch.float64)}
    strategy = STRATEGIES[method](w_t, 4)
    assert strategy.aggregate(w_t, {}, 1) is w_t


@pytest.mark.parametrize("method, state, message", [
    ("fedavg", {"m": 1}, r"fedavg's saved state must hold exactly \[\], got \['m'\]"),
    ("scaffold", [1], r"scaffold's saved state must hold exactly \['c', 'c_k'\], got list"),
    ("scaffold", {"c": {"w": "x"}, "c_k": {}}, r"the saved state c\[w\] must be a dense float tensor .*, got str$"),
    ("scaffold", {"c": {"w": torch.zeros(2)}, "c_k": {}},
     r"c\[w\] must be a dense float tensor of shape \(3,\), got a torch.strided torch.float32 tensor of shape \(2,\) on cpu"),
    ("scaffold", {"c": {"w": torch.zeros(3)}, "c_k": {1: {"w": "x"}}}, r"the saved state c_k\[1\]\[w\] must"),
    ("fedavgm", {"m": {"w": "x"}}, r"the saved state m\[w\] must be a dense float tensor"),
    ("fedavgm", {}, r"fedavgm's saved state must hold exactly \['m'\], got \[\]"),
    ("fedadam", {"m": {}}, r"fedadam's saved state must hold exactly \['m', 'v'\], got \['m'\]"),
    ("fedadam", {"m": {"w": "x"}, "v": {"w": torch.zeros(3)}}, r"the saved state m\[w\] must be"),
    ("fedadam", {"m": {"w": torch.zeros(3)}, "v": {"w": "x"}}, r"the saved state v\[w\] must be"),
])
def test_a_corrupted_saved_state_is_refused_naming_the_method_and_the_tensor(method, state, message):
    from fedlib.strategies import STRATEGIES

    strategy = STRATEGIES[method]({"w": torch.zeros(3, dtype=torch.float64)}, 4)
    with pytest.raises(InputError, match=message):
        strategy.load_state_dict(state)


def test_a_saved_state_is_loaded_on_the_strategys_device_and_dtype():
    """A state saved in float32 on the CPU, loaded by a strategy whose weights are float64 on another device
    (here the meta device, which needs no accelerator): the tensors come back as the strategy keeps them."""
    from fedlib.strategies import FedAvgM

    strategy = FedAvgM({"w": torch.zeros(3, dtype=torch.float64, device="meta")}, 4)
    strategy.load_state_dict({"m": {"w": torch.ones(3, dtype=torch.float32)}})
    assert (strategy.m["w"].device.type, strategy.m["w"].dtype) == ("meta", torch.float64)


def test_a_client_that_did_not_move_is_clipped_to_itself():
    """clip(0, S) = 0: a zero update has norm 0 and is not scaled (no division by its norm)."""
    zero = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    assert all(torch.equal(v, zero[k]) for k, v in clip(zero, 1.0).items())


def test_dp_noise_is_added_on_the_models_device_and_dtype():
    """The noise is drawn in float64 on the CPU and added in w_t's dtype on w_t's device (here float32 on the
    meta device, which needs no accelerator)."""
    w_t = {"w": torch.zeros(4, dtype=torch.float32, device="meta")}
    w_next = dp_aggregate(w_t, [], clip_norm=1.0, noise_multiplier=1.0, expected_clients=2.0,
                          noise=seeded_normal(torch.Generator().manual_seed(0)))
    assert (w_next["w"].device.type, w_next["w"].dtype) == ("meta", torch.float32)


def test_epsilon_keeps_the_accountants_convergence_warnings_quiet(caplog):
    """At z = 0.3 the RDP accountant skips the orders near 1 that do not converge and logs a warning for
    each on the "absl" logger; epsilon() silences them for its call only and restores the level."""
    pytest.importorskip("dp_accounting")
    import logging

    caplog.set_level(logging.WARNING, logger="absl")
    assert epsilon(0.3, 0.1, 20, 1e-4) > 0
    assert not [r for r in caplog.records if r.name == "absl"]
    assert logging.getLogger("absl").level == logging.WARNING
