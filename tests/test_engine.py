"""The vectorised engine gives the weights of the sequential one, batch for batch.

Both engines train the same clients on the same batches in the same order; they differ
only in how they group their sums (the batched network turns a client's matrix products
into batched ones and its convolutions into one grouped convolution; the average sums
over a client axis). How far apart that may leave them follows from the float format, so each check
states its bound and where it comes from, and none depends on the machine's kernels.

**float64, the exact check.** Re-ordering a sum of n terms changes it by at most about
n * u relative to the terms (u = 2^-53 = 1.1e-16 for float64; Higham, *Accuracy and
Stability of Numerical Algorithms*, 2002, section 4.2). A round takes S local steps,
each made of sums of at most n terms, so the engines' weights may differ by about
S * n * u * max|w| (``float64_bound``): at most ~1e-11 in every case below, while a real
difference (a batch left out, another shuffle, an unweighted average) moves weights by
1e-4 or more. (Measured on an AVX-512 Xeon: at most 4e-16.)

**float32, what runs in practice.** With u = 2^-24 = 6e-8 the same bound is ~1e-5, but
float32 has a second effect: a near-tie can resolve differently in the two engines. MNIST's
blank borders make them common in the CNN: a max-pool window where a patch of zeros (value:
the bias, exactly) sits beside a patch that sums to within rounding of it. The two engines
may then route an example's gradient to different positions: at the step of the flip the
conv weights' update differs by ~0.4%, and at eta = 0.1 that difference grows ~2.3x per
later step (measured over 10 steps under another CPU's kernels: 8% at the end, while both
engines sat within 6e-6 of the float64 result until the flip). So the float32 check is on
each tensor's update as a whole, || w_vec - w_seq || / || w_seq - w_t || (L2 norms), and
the CNN is checked in float32 only over S <= 2 steps (B = 50, or B = infinity with E = 2),
where a flip stays under ~1%; its longer rounds are checked in float64. Rounding alone
makes the relative difference about sqrt(S * n) * u (independent per-step errors adding
up while the steps partly cancel), <= 1e-4 here; a real difference makes it at least about
1/S (one of S steps missing). The bound 1/(10 S) sits between the two, and
``test_float32_bound_separates_rounding_from_real_differences`` checks that it does.

A ReLU's kink is such a near-tie too: a pre-activation within rounding of 0 lets the
unit's gradient through in one engine and not in the other. Each one is rare, so over
hundreds of steps one becomes likely: the dropout MLP's round of S = 258 steps (B = 7,
E = 2) differed by 7% of its update under the default CPU kernels
(``ATEN_CPU_CAPABILITY=default``), while the float64 check held. So that round is checked
in float64, and the dropout MLP in float32 over S = 2 steps. (The 2NN's rounds of up to
S = 258 steps pass the float32 check under both kernel sets, but are exposed to the same
flips.)

**Dropout models** (``mlp``, ``cnn-small``) are checked the same way: the vectorised
engine draws client k's masks from its own generator seeded with ``dropout_seed(seed, t, k)``,
with the call ``nn.Dropout`` makes, so on a CPU it trains on exactly the masks the
sequential engine draws after ``torch.manual_seed(dropout_seed(seed, t, k))``
(``fedlib.engine.schedule``). The small CNN max-pools before its ReLU, so its float32
check, like the CNN's, is over S <= 2 steps.

``WRONG_ENGINES`` are four deliberately broken engines; both checks must catch each.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedlib.engine
import fedlib.backends
from fedlib import Dataset, FedAvgConfig, build_model, run
from fedlib.engine import StackedResult, batch_schedule, vectorized_local_updates
from fedlib.seeds import sampling_rng
from fedlib.backends import resolve_engine
from fedlib.server import initial_model, sample_clients
from tests.helpers import run_round

U = {torch.float64: torch.finfo(torch.float64).eps / 2, torch.float32: torch.finfo(torch.float32).eps / 2}

# The longest sum in one training step of each model (terms added into one number):
# the 2NN's fc1 (784 inputs); the CNN's conv1 weight gradient, summed over every position
# of every image of a batch (28 * 28 * W, W = the batch width, up to 100 here).
# The small CNN's conv1 sums over its 24 * 24 output positions; the dropout MLP's fc1 over 784 inputs.
LONGEST_SUM = {"2nn": 784, "cnn": 28 * 28 * 100, "cnn-small": 24 * 24 * 100, "mlp": 784}

CASES = {   # name -> one round's settings (frac 0.2 of 20 clients: 4 clients of 100 examples)
    "2nn-iid-B10": dict(model="2nn", partition="iid", batch_size=10, local_epochs=1),
    "2nn-iid-Binf": dict(model="2nn", partition="iid", batch_size=None, local_epochs=2),
    "2nn-shards-B10": dict(model="2nn", partition="shards", batch_size=10, local_epochs=1),
    "2nn-shards-Binf": dict(model="2nn", partition="shards", batch_size=None, local_epochs=2),
    "cnn-iid-B10": dict(model="cnn", partition="iid", batch_size=10, local_epochs=1),
    "cnn-iid-Binf": dict(model="cnn", partition="iid", batch_size=None, local_epochs=2),
    "cnn-shards-B10": dict(model="cnn", partition="shards", batch_size=10, local_epochs=1),
    "cnn-shards-Binf": dict(model="cnn", partition="shards", batch_size=None, local_epochs=2),
    "cnn-iid-B50": dict(model="cnn", partition="iid", batch_size=50, local_epochs=1),
    "cnn-shards-B50": dict(model="cnn", partition="shards", batch_size=50, local_epochs=1),
    # Unequal n_k, and B = 7 divides none of them: padded steps and short last batches.
    "2nn-dirichlet-B7": dict(partition="dirichlet", batch_size=7, local_epochs=2, frac=0.3),
    "2nn-dirichlet-Binf": dict(partition="dirichlet", batch_size=None, local_epochs=2, frac=0.3),
    "2nn-unbalanced-B7": dict(partition="unbalanced", batch_size=7, local_epochs=2, frac=0.3),
    "2nn-unbalanced-Binf": dict(partition="unbalanced", batch_size=None, local_epochs=2, frac=0.3),
    # eta = 0.01: with momentum 0.9, eta = 0.1 diverges.
    "2nn-momentum-wd": dict(partition="unbalanced", batch_size=10, local_epochs=2, lr=0.01, momentum=0.9,
                            weight_decay=1e-3, frac=0.3),
    "cnn-momentum-wd": dict(model="cnn", partition="shards", batch_size=50, local_epochs=2, lr=0.01, momentum=0.9,
                            weight_decay=1e-3),
    # Dropout models: each client's masks from its own stream (see the module docstring).
    "cnn-small-iid-B10": dict(model="cnn-small", partition="iid", batch_size=10, local_epochs=1),
    "cnn-small-shards-B50": dict(model="cnn-small", partition="shards", batch_size=50, local_epochs=1),
    "cnn-small-shards-Binf": dict(model="cnn-small", partition="shards", batch_size=None, local_epochs=2),
    "mlp-unbalanced-B7": dict(model="mlp", partition="unbalanced", batch_size=7, local_epochs=2, frac=0.3),
    "mlp-iid-B50": dict(model="mlp", partition="iid", batch_size=50, local_epochs=1),
}


@pytest.fixture(scope="module")
def small(mnist) -> Dataset:
    """2,000 training and 1,000 test images of real MNIST: enough for a few clients."""
    return Dataset("mnist", mnist.x_train[:2000], mnist.y_train[:2000], mnist.x_test[:1000],
                   mnist.y_test[:1000], mnist.classes)


class Round:
    """Round t = 1 of one case: w_t, the clients' data and the most local steps S."""

    def __init__(self, data: Dataset, dtype: torch.dtype, **overrides):
        settings = dict(model="2nn", partition="iid", num_clients=20, frac=0.2, local_epochs=1,
                        batch_size=10, lr=0.1, seed=3, shard_size=50, min_size=20)
        self.config = FedAvgConfig(**{**settings, **overrides}).validate()
        self.data = data.to(dtype=dtype)
        self.dtype = dtype
        self.model = initial_model(self.config, dtype=dtype)
        self.w_t = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.client_indices = [torch.as_tensor(p) for p in self.config.split(data.y_train)]
        self.selected = sample_clients(self.config.num_clients, self.config.frac,
                                       sampling_rng(self.config.seed, 1))
        sizes = [len(self.client_indices[k]) for k in self.selected]
        b, e = self.config.batch_size, self.config.local_epochs
        self.steps = max(e * (math.ceil(n_k / b) if b else 1) for n_k in sizes)      # S

    def train(self, engine: str) -> tuple[dict, float]:
        return run_round(self.model, self.w_t, self.data, self.client_indices, self.selected, self.config, 1,
                         engine)


def float64_bound(r: Round, w_next: dict) -> float:
    """S * n * u * max|w|: how far re-ordered sums can move float64 weights in one round."""
    w_max = max(w.abs().max().item() for w in w_next.values())
    return r.steps * LONGEST_SUM[r.config.model] * U[torch.float64] * w_max


def float32_bound(r: Round) -> float:
    """1 / (10 S): the largest relative difference of an update that float32 may explain."""
    return 1 / (10 * r.steps)


def float32_rounding_estimate(r: Round) -> float:
    """sqrt(S * n) * u: the relative size of float32 rounding in a round's update after S steps."""
    return math.sqrt(r.steps * LONGEST_SUM[r.config.model]) * U[torch.float32]


def assert_same_float64(r: Round, w_vec: dict, w_seq: dict) -> None:
    bound = float64_bound(r, w_seq)
    for name in w_seq:
        diff = (w_vec[name] - w_seq[name]).abs().max().item()
        assert diff <= bound, f"{name} differs by {diff:.2e} > {bound:.1e} (S={r.steps})"


def assert_same_float32(r: Round, w_vec: dict, w_seq: dict) -> None:
    bound = float32_bound(r)
    for name in w_seq:
        update = (w_seq[name] - r.w_t[name]).norm().item()
        relative = (w_vec[name] - w_seq[name]).norm().item() / update
        assert relative <= bound, f"{name}: engines differ by {relative:.2e} of the update > {bound:.1e} (S={r.steps})"


CHECKS = {torch.float64: assert_same_float64, torch.float32: assert_same_float32}
FLOAT64_ONLY = {"cnn-iid-B10", "cnn-shards-B10", "cnn-small-iid-B10",   # S = 10 CNN steps: see the docstring
                "cnn-momentum-wd",                                       # S = 4 (E = 2, B = 50)
                "mlp-unbalanced-B7"}                                     # S = 258 ReLU steps: see the docstring
PAIRS = [pytest.param(case, dtype, id=f"{case}-{str(dtype)[6:]}") for case in CASES
         for dtype in (torch.float64, torch.float32) if dtype == torch.float64 or case not in FLOAT64_ONLY]
_cache: dict = {}


@pytest.fixture(scope="module", autouse=True)
def fresh_rounds():
    """Every pytest session computes its rounds anew. ``make mutation`` runs one session per mutant
    in a fork of the process that ran the clean tests: a round cached there would be the unmutated
    code's, and the comparisons below would pass whatever the mutant does."""
    _cache.clear()


def both_engines(data: Dataset, case: str, dtype: torch.dtype) -> tuple[Round, tuple, tuple]:
    """The case's round with each engine (cached: the float32 and float64 tests share them)."""
    key = (case, dtype)
    if key not in _cache:
        r = Round(data, dtype, **CASES[case])
        _cache[key] = r, r.train("sequential"), r.train("vectorized")
    return _cache[key]


@pytest.mark.parametrize("case, dtype", PAIRS)
def test_vectorized_round_equals_sequential(small, case, dtype):
    r, (w_seq, loss_seq), (w_vec, loss_vec) = both_engines(small, case, dtype)
    assert w_seq.keys() == w_vec.keys()
    assert all(w.dtype == dtype for w in w_vec.values())
    CHECKS[dtype](r, w_vec, w_seq)
    # The round's mean training loss sums E * m_t per-example losses: relative error <= that count * u.
    examples = r.config.local_epochs * sum(len(r.client_indices[k]) for k in r.selected)
    assert loss_vec == pytest.approx(loss_seq, rel=examples * U[dtype])


@pytest.mark.parametrize("case", [c for c in CASES if c not in FLOAT64_ONLY])
def test_float32_bound_separates_rounding_from_real_differences(small, case):
    r = Round(small, torch.float32, **CASES[case])
    assert float32_rounding_estimate(r) < float32_bound(r) / 10, "rounding could reach the bound"
    assert float32_bound(r) < 1 / r.steps, "one missing step would pass"


# --- deliberately wrong engines: each must fail both checks ---------------------------------

def unweighted_average(monkeypatch):
    """Report n_k = 1 for every client, so the server averages with 1/m instead of n_k / m_t."""
    original = fedlib.backends.vectorized_local_updates

    def updates(*args, **kwargs):
        result = original(*args, **kwargs)
        return StackedResult(result.weights, torch.ones_like(result.num_examples), result.train_loss, result.steps)
    monkeypatch.setattr(fedlib.backends, "vectorized_local_updates", updates)


def last_batch_skipped(monkeypatch):
    """Drop each client's last minibatch of the round."""
    original = fedlib.engine.schedule.batch_schedule

    def schedule(*args, **kwargs):
        index, mask = original(*args, **kwargs)
        for i in range(mask.shape[1]):
            last = mask[:, i].sum(1).nonzero().max()
            mask[last, i] = 0
        return index, mask
    monkeypatch.setattr(fedlib.engine.schedule, "batch_schedule", schedule)


def one_client_reshuffled(monkeypatch):
    """Give the round's first client another shuffle than the sequential engine's."""
    original = fedlib.backends.vectorized_local_updates

    def updates(model, x, y, client_indices, generators, **kwargs):
        generators = [torch.Generator().manual_seed(12345)] + list(generators[1:])
        return original(model, x, y, client_indices, generators, **kwargs)
    monkeypatch.setattr(fedlib.backends, "vectorized_local_updates", updates)


def dropout_masks_swapped(monkeypatch):
    """Give the round's first two clients each other's dropout streams."""
    original = fedlib.backends.vectorized_local_updates

    def updates(*args, dropout_generators=None, **kwargs):
        if dropout_generators is not None and len(dropout_generators) > 1:
            dropout_generators = [dropout_generators[1], dropout_generators[0]] + list(dropout_generators[2:])
        return original(*args, dropout_generators=dropout_generators, **kwargs)
    monkeypatch.setattr(fedlib.backends, "vectorized_local_updates", updates)


WRONG_ENGINES = {"unweighted-average": unweighted_average, "last-batch-skipped": last_batch_skipped,
                 "one-client-reshuffled": one_client_reshuffled, "dropout-masks-swapped": dropout_masks_swapped}


def wrong_engine_cases():
    """(wrong engine, case, dtype) where the wrong engine computes something really different:
    an unweighted average only differs with unequal n_k, a reshuffle only with B < n_k."""
    for wrong in WRONG_ENGINES:
        for p in PAIRS:
            case, dtype = p.values
            if case not in ("2nn-unbalanced-B7", "2nn-dirichlet-Binf", "cnn-shards-B10", "cnn-shards-B50",
                            "cnn-small-shards-B50", "mlp-unbalanced-B7", "mlp-iid-B50"):
                continue
            if wrong == "unweighted-average" and CASES[case]["partition"] in ("iid", "shards"):
                continue
            if wrong == "one-client-reshuffled" and CASES[case]["batch_size"] is None:
                continue
            if wrong == "dropout-masks-swapped" and CASES[case].get("model") not in ("mlp", "cnn-small"):
                continue
            yield pytest.param(wrong, case, dtype, id=f"{wrong}-{p.id}")


@pytest.mark.parametrize("wrong, case, dtype", list(wrong_engine_cases()))
def test_a_wrong_engine_fails_the_check(small, monkeypatch, wrong, case, dtype):
    r, (w_seq, _), _ = both_engines(small, case, dtype)
    WRONG_ENGINES[wrong](monkeypatch)
    w_wrong, _ = r.train("vectorized")
    with pytest.raises(AssertionError):
        CHECKS[dtype](r, w_wrong, w_seq)


# --- the rest of the engine ----------------------------------------------------------------

def test_clients_in_groups_equal_clients_at_once(small):
    data = small.to(dtype=torch.float64)
    model = build_model("2nn").double()
    clients = [torch.arange(100 * i, 100 * i + 30 + 10 * i) for i in range(5)]

    def train(max_examples_per_step):
        shuffles = [torch.Generator().manual_seed(i) for i in range(5)]
        return vectorized_local_updates(model, data.x_train, data.y_train, clients, shuffles, epochs=2,
                                        batch_size=10, lr=0.1, weights=model.state_dict(),
                                        dropout_generators=[torch.Generator() for _ in range(5)],
                                        max_examples_per_step=max_examples_per_step)
    together, in_groups = train(None), train(20)            # groups of 2 clients
    steps = 2 * math.ceil(70 / 10)
    for name, w in together.weights.items():
        bound = steps * LONGEST_SUM["2nn"] * U[torch.float64] * w.abs().max().item()
        assert (in_groups.weights[name] - w).abs().max().item() <= bound
    torch.testing.assert_close(in_groups.train_loss, together.train_loss, rtol=steps * 70 * U[torch.float64], atol=0)


def test_batch_schedule_is_each_clients_shuffle_padded():
    clients = [torch.arange(0, 23), torch.arange(100, 105)]
    index, mask = batch_schedule(clients, [torch.Generator().manual_seed(k) for k in range(2)],
                                 epochs=2, batch_size=10)
    assert index.shape == mask.shape == (6, 2, 10)          # S = 2 epochs * ceil(23 / 10)
    assert index.dtype == torch.int64 and mask.dtype == torch.float32     # as its docstring says
    for k, idx in enumerate(clients):
        real = index[:, k][mask[:, k].bool()]
        assert len(real) == 2 * len(idx)                     # every example once per epoch
        half = len(idx)
        assert sorted(real[:half].tolist()) == sorted(real[half:].tolist()) == idx.tolist()
    assert mask[:, 1].sum(1).tolist() == [5, 5, 0, 0, 0, 0]  # 1 step per epoch, then masked off
    assert mask[:, 0].sum(1).tolist() == [10, 10, 3, 10, 10, 3]


def test_a_batch_larger_than_every_client_is_b_infinity():
    clients = [torch.arange(0, 23), torch.arange(100, 105)]
    huge = batch_schedule(clients, [torch.Generator().manual_seed(k) for k in range(2)], epochs=2,
                          batch_size=10**9)
    inf = batch_schedule(clients, [torch.Generator().manual_seed(k) for k in range(2)], epochs=2,
                         batch_size=None)
    assert huge[0].shape == (2, 2, 23)                        # width capped at the largest n_k
    assert torch.equal(huge[0], inf[0]) and torch.equal(huge[1], inf[1])


@pytest.mark.parametrize("model_name", ["mlp", "cnn-small"])
def test_dropout_draws_independent_masks_per_client(small, model_name):
    torch.manual_seed(0)
    model = build_model(model_name)
    same = [torch.arange(40)] * 2                            # two clients, same data, same batches
    result = vectorized_local_updates(model, small.x_train, small.y_train, same,
                                      [torch.Generator().manual_seed(1) for _ in range(2)],
                                      epochs=1, batch_size=10, lr=0.1,
                                      dropout_generators=[torch.Generator().manual_seed(k) for k in (7, 8)])
    first, second = result.client(0), result.client(1)
    assert all(torch.isfinite(w).all() for w in first.values())
    assert any(not torch.equal(first[name], second[name]) for name in first)
    # Without dropout the same data and batches give the same weights.
    twin = vectorized_local_updates(build_model("2nn"), small.x_train, small.y_train, same,
                                    [torch.Generator().manual_seed(1) for _ in range(2)],
                                    epochs=1, batch_size=10, lr=0.1,
                                    dropout_generators=[torch.Generator().manual_seed(k) for k in (7, 8)])
    assert all(torch.equal(twin.client(0)[n], twin.client(1)[n]) for n in twin.weights)


def test_run_histories_match_between_engines(small):
    """Two whole rounds through ``run`` in float64: the same clients, and the same accuracy
    (a prediction could only flip for a test image whose two best logits are within ~1e-13)."""
    data = small.to(dtype=torch.float64)
    settings = dict(model="2nn", num_clients=20, frac=0.2, rounds=2, batch_size=10, seed=5, device="cpu")
    histories = {engine: run(FedAvgConfig(engine=engine, **settings), data, progress=False)
                 for engine in ("sequential", "vectorized")}
    seq, vec = histories["sequential"], histories["vectorized"]
    assert vec.config["engine_used"] == "vectorized" and seq.config["engine_used"] == "sequential"
    assert [r.clients for r in vec.records] == [r.clients for r in seq.records]
    assert vec.accuracies == seq.accuracies
    for a, b in zip(vec.records, seq.records):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-10)
        assert a.test_loss == pytest.approx(b.test_loss, rel=1e-10)


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


def test_the_engine_fallback_warning_points_at_the_line_that_asked_for_auto(monkeypatch):
    """resolve_engine's one caller is fedlib.Job, which a lesson or a script builds (or run() does):
    the warning names the line that built the Job (stacklevel 3), not a line inside fedlib.

    Checked twice: the warning Python records (its file and line), and the frame the stacklevel
    picks out of the calls that led to it, counted without mutmut's trampoline. Under make mutation
    (its clean run included) the trampoline's frames sit between Job and resolve_engine, so there
    only the second check can tell the right stacklevel from a wrong one."""
    with_buffers = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10))
    chosen = {}
    warn = fedlib.backends.warnings.warn

    def recording_warn(message, category=None, stacklevel=1, **kwargs):
        stack = inspect.stack()[1:]
        calls = [f for f in stack if not f.filename.endswith(os.path.join("mutation", "trampoline.py"))]
        chosen["frame"] = calls[stacklevel - 1]          # stacklevel 1 is the function that calls warn
        chosen["trampolined"] = len(calls) < len(stack)
        warn(message, category, stacklevel=stacklevel + 1, **kwargs)

    def job():                                   # stands for fedlib.Job.__init__
        return resolve_engine("auto", with_buffers)

    monkeypatch.setattr(fedlib.backends.warnings, "warn", recording_warn)
    with pytest.warns(UserWarning, match="falls back to 'sequential'") as caught:
        built = inspect.currentframe().f_lineno + 1
        job()
    assert len(caught) == 1
    assert (Path(chosen["frame"].filename).name, chosen["frame"].lineno) == (Path(__file__).name, built)
    if not chosen["trampolined"]:
        assert (Path(caught[0].filename).name, caught[0].lineno) == (Path(__file__).name, built)


def test_activation_bytes_counts_every_layers_output_four_times():
    """The memory estimate's activations, by hand for the 2NN and one float32 image: the outputs of fc1, fc2
    and fc3 (200 + 200 + 10 numbers of 4 bytes), times 4 (their gradients and the backward's temporaries)."""
    from fedlib.backends import activation_bytes

    model = build_model("2nn")
    assert activation_bytes(model, torch.zeros(1, 1, 28, 28)) == 4 * (200 + 200 + 10) * 4
    assert model.training                                         # left in the mode it was in
    # The small character LSTM (embedding 8, 2 layers of 64, build_model's 10 classes) on one sequence of T = 5: the
    # LSTM's output (T x 64) and its final states h and c (2 x 64 each) count 4 (1 + 4 x 2) times.
    lstm = activation_bytes(build_model("lstm-small"), torch.zeros(1, 5, dtype=torch.long))
    assert lstm == 4 * (5 * 8) * 4 + 4 * (1 + 4 * 2) * (5 * 64 + 2 * 64 + 2 * 64) * 4 + 4 * (5 * 10) * 4


def test_the_vectorized_backend_trains_a_round_of_one_client_and_of_none():
    """m = 1 (C K < 1 picks one client) is a round too: with B = infinity and E = 1 the client's update is
    one full-batch gradient step, written out by hand (float64, one step: rounding only); no client, no update."""
    from fedlib.backends import Vectorized
    from fedlib.strategies import build
    from tests.helpers import assert_within_rounding, sgd_by_hand, small_data

    data = small_data(60, dtype=torch.float64)
    clients = [torch.arange(0, 25), torch.arange(25, 60)]
    config = FedAvgConfig(num_clients=2, frac=0.0, batch_size=None, lr=0.1)
    model = build_model("2nn").double()
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    backend = Vectorized(model, data, clients, config)
    updates = backend.update(w_t, np.array([1]), 1, build(config, w_t))
    assert list(updates) == [1] and updates[1].num_examples == 35
    by_hand = sgd_by_hand(data.x_train[25:60], data.y_train[25:60], w_t, epochs=1, batch_size=None, lr=0.1, seed=0)
    assert_within_rounding(updates[1].weights, by_hand, steps=1)
    assert backend.update(w_t, np.array([], dtype=int), 1, build(config, w_t)) == {}


def test_a_sequence_round_is_sgd_on_the_mean_over_real_characters():
    """The character LSTM through the engine (the one sequence test of make mutation's subset): two roles of
    unequal length, B = infinity, E = 1, so each client's update is one step of eta times the gradient of its
    mean cross-entropy over its real characters (padding targets IGNORE_INDEX; the shorter client's padded
    examples not at all), written out with torch's own nn.LSTM and autograd on a copy of the model. float64,
    one step: rounding only, at most n u max|w| with n = T x max(4 x 64 hidden, W) (tests/test_engine_lstm.py)."""
    from fedlib.data import IGNORE_INDEX
    from tests.helpers import synthetic

    data = synthetic()
    clients = [torch.as_tensor(data.clients[k]) for k in (0, 3)]
    assert len(clients[0]) != len(clients[1]) and (data.y_train == IGNORE_INDEX).any()
    torch.manual_seed(1)
    model = build_model("lstm-small", data.num_classes).double()
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    result = vectorized_local_updates(model, data.x_train, data.y_train, clients,
                                      [torch.Generator().manual_seed(k) for k in range(2)], epochs=1, batch_size=None,
                                      lr=1.0, weights=w_t, dropout_generators=[torch.Generator() for _ in range(2)])
    n = data.x_train.shape[1] * max(4 * 64, max(len(idx) for idx in clients))
    for i, idx in enumerate(clients):
        reference = build_model("lstm-small", data.num_classes).double()
        reference.load_state_dict(w_t)
        loss = F.cross_entropy(reference(data.x_train[idx]), data.y_train[idx], ignore_index=IGNORE_INDEX)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        for (name, p), g in zip(reference.named_parameters(), grads):
            expected = p.detach() - 1.0 * g
            assert (result.client(i)[name] - expected).abs().max().item() <= n * U[torch.float64] * expected.abs().max()
        assert result.train_loss[i].item() == pytest.approx(loss.item(), rel=n * U[torch.float64])
        assert (result.num_examples[i].item(), result.steps[i].item()) == (len(idx), 1)


def test_clients_beyond_max_examples_per_step_are_trained_in_groups(monkeypatch):
    """Groups of max(1, limit // W) clients (W = min(B, the largest n_k) = 10 here), one after another, and
    every client still gets its own SGD written out by hand (sgd_by_hand: the same shuffles), the last
    client's second step on a batch of one example."""
    from tests.helpers import assert_within_rounding, sgd_by_hand, small_data

    data = small_data(71, dtype=torch.float64)
    clients = [torch.arange(0, 10), torch.arange(10, 30), torch.arange(30, 60), torch.arange(60, 71)]
    model = build_model("2nn").double()
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    groups = []
    train_group = fedlib.engine.local._train_group
    monkeypatch.setattr(fedlib.engine.local, "_train_group",
                        lambda *args: groups.append(len(args[5])) or train_group(*args))
    for limit, expected_groups in ((20, [2, 2]), (15, [1, 1, 1, 1])):
        groups.clear()
        result = vectorized_local_updates(model, data.x_train, data.y_train, clients,
                                          [torch.Generator().manual_seed(100 + k) for k in range(4)], epochs=1,
                                          batch_size=10, lr=0.1, weights=w_t, max_examples_per_step=limit,
                                          dropout_generators=[torch.Generator() for _ in range(4)])
        assert groups == expected_groups
        assert result.num_examples.tolist() == [10, 20, 30, 11] and result.steps.tolist() == [1, 2, 3, 2]
        for i, idx in enumerate(clients):
            by_hand = sgd_by_hand(data.x_train[idx], data.y_train[idx], w_t, 1, 10, 0.1, seed=100 + i)
            assert_within_rounding(result.client(i), by_hand, steps=3)


def test_a_sequence_steps_loss_is_the_mean_over_its_real_characters():
    """mean_loss_per_model for sequences, summed out by hand: model 0 has three examples, one ending in padding
    targets (IGNORE_INDEX); model 1 one real example with a single real character and two padding rows (weight
    0); model 2 sits the step out (every weight 0) and has loss 0. Sums of at most 12 float64 terms."""
    from fedlib.data import IGNORE_INDEX
    from fedlib.engine.local import mean_loss_per_model

    g = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 3, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 3, 4), generator=g)
    target[0, 1, 2:] = IGNORE_INDEX
    target[1, 0, 1:] = IGNORE_INDEX
    weight = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    expected = []
    for m in range(3):
        real = [losses[m, w, t].item() for w in range(3) for t in range(4)
                if weight[m, w] > 0 and target[m, w, t] != IGNORE_INDEX]
        expected.append(sum(real) / len(real) if real else 0.0)
    assert expected[1] == losses[1, 0, 0].item() and expected[2] == 0.0
    got = mean_loss_per_model(losses, target, weight)
    assert got.tolist() == pytest.approx(expected, rel=12 * U[torch.float64], abs=0)


def test_only_the_papers_2nn_itself_takes_the_backpropagation_written_out():
    """relu_mlp_sgd_step computes the 2NN's ReLU layers by hand: a subclass that changes the forward pass, or
    a 2NN with a layer added, must go through autograd instead."""
    from fedlib.engine.local import is_paper_2nn
    from fedlib.models import TwoNN

    class Tanh2NN(TwoNN):
        def forward(self, x):
            return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x.flatten(1))))))

    extended = TwoNN()
    extended.scale = nn.Identity()
    assert is_paper_2nn(TwoNN()) and is_paper_2nn(build_model("2nn"))
    assert not is_paper_2nn(Tanh2NN()) and not is_paper_2nn(extended) and not is_paper_2nn(build_model("mlp"))


def sgd_with_correction_by_hand(model: nn.Module, x, y, w0: dict, batch_size, lr, seed, correction=None):
    """One epoch of minibatch SGD written out, w <- w - lr (g + (c - c_k)), on a copy of ``model`` (batches
    from epoch_batches with the client's generator, a fact); returns its weights and the examples-weighted
    mean of its batch losses (the ClientUpdate's training loss for E = 1)."""
    import copy
    from fedlib.client import epoch_batches

    reference = copy.deepcopy(model)
    reference.load_state_dict(w0)
    total = 0.0
    for batch in epoch_batches(len(y), batch_size, torch.Generator().manual_seed(seed)):
        loss = F.cross_entropy(reference(x[batch]), y[batch])
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for (name, p), g in zip(reference.named_parameters(), grads):
                p -= lr * (g + (correction[name] if correction is not None else 0.0))
        total += loss.item() * len(batch)
    return reference.state_dict(), total / len(y)


def test_a_model_without_a_program_trains_through_vmap_as_sgd_by_hand():
    """The fallback for a model the batched network does not describe (vmap over autograd): SCAFFOLD's
    correction c - c_k included, a client whose second step has one example, and each client's training
    loss; against SGD written out on a copy of the model. float64: rounding only (2 steps of sums of at
    most 784 terms)."""
    from fedlib.engine.batched import program_for
    from tests.helpers import assert_within_rounding, small_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    assert program_for(model) is None
    data = small_data(31, dtype=torch.float64)
    clients = [torch.arange(0, 11), torch.arange(11, 31)]
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    corrections = [{k: 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in w0.items()}
                   for _ in clients]
    result = vectorized_local_updates(model, data.x_train, data.y_train, clients,
                                      [torch.Generator().manual_seed(k) for k in range(2)], epochs=1, batch_size=10,
                                      lr=0.1, weights=w0, corrections=corrections,
                                      dropout_generators=[torch.Generator() for _ in clients])
    for i, idx in enumerate(clients):
        by_hand, loss = sgd_with_correction_by_hand(model, data.x_train[idx], data.y_train[idx], w0, 10, 0.1, i,
                                                    corrections[i])
        assert_within_rounding(result.client(i), by_hand, steps=2)
        assert result.train_loss[i].item() == pytest.approx(loss, rel=2 * 784 * U[torch.float64])
        assert result.steps[i].item() == 2


def test_a_sequence_model_without_a_program_trains_through_vmap_on_its_real_characters():
    """The vmap fallback with a sequence model of its own (embedding, linear; no program): with B = infinity
    and E = 1, one step on the mean cross-entropy over the real characters (padding IGNORE_INDEX)."""
    from fedlib.data import IGNORE_INDEX
    from fedlib.engine.batched import program_for
    from tests.helpers import assert_within_rounding, synthetic

    class TinyCharModel(nn.Module):
        def __init__(self, vocabulary: int):
            super().__init__()
            self.embed, self.fc = nn.Embedding(vocabulary, 4), nn.Linear(4, vocabulary)

        def forward(self, x):                                   # (B, T) -> (B, V, T)
            return self.fc(self.embed(x)).transpose(1, 2)

    data = synthetic()
    torch.manual_seed(0)
    model = TinyCharModel(data.num_classes).double()
    assert program_for(model) is None
    clients = [torch.as_tensor(data.clients[k]) for k in (0, 3)]
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    result = vectorized_local_updates(model, data.x_train, data.y_train, clients,
                                      [torch.Generator().manual_seed(k) for k in range(2)], epochs=1, batch_size=None,
                                      lr=1.0, weights=w0, dropout_generators=[torch.Generator() for _ in clients])
    for i, idx in enumerate(clients):
        by_hand, loss = sgd_with_correction_by_hand(model, data.x_train[idx], data.y_train[idx], w0, None, 1.0, i)
        assert_within_rounding(result.client(i), by_hand, steps=1, longest_sum=80 * len(idx))
        assert result.train_loss[i].item() == pytest.approx(loss, rel=80 * len(idx) * U[torch.float64])
    assert (data.y_train[clients[0]] == IGNORE_INDEX).any() or (data.y_train[clients[1]] == IGNORE_INDEX).any()


META_CASES = {     # ids avoid "cnn": make mutation's subset runs with -k "not cnn"
    "2nn-by-hand": dict(model="2nn"),
    "2nn-momentum-prox": dict(model="2nn", momentum=0.5, weight_decay=1e-3, mu=0.1),
    "small-conv-dropout": dict(model="cnn-small"),
    "mlp-dropout-scaffold": dict(model="mlp", scaffold=True),
    "2nn-in-groups": dict(model="2nn", max_examples_per_step=10),
    "vmap-scaffold-prox": dict(model="vmap", scaffold=True, mu=0.1),
}


@pytest.mark.parametrize("case", META_CASES)
def test_the_engine_makes_every_tensor_on_the_datas_device(case, monkeypatch):
    """On a GPU the engine must make each tensor (counts, weights, rates, losses, buffers) on x's device;
    a ``device=`` left out would put it on the CPU, which on this CPU-only machine is also where x is, so
    no other test can tell. PyTorch's "meta" device (shapes and dtypes, no data) plays the GPU here: with
    the model and the data on it, a tensor made on the CPU meets a meta tensor and PyTorch refuses the
    mix, or comes back on the CPU. The schedule is drawn on the CPU (the clients' generators are CPU ones) and
    staged on the device once per round, where each step reads it (an index left on the CPU would still
    work, copied to the device at every step: so the staged schedule is checked too)."""
    import fedlib.engine.local as local

    staged = []                                          # every round's schedule as stage() made it
    real_stage = local.stage

    def recording_stage(*args):
        staged.append(real_stage(*args))
        return staged[-1]
    monkeypatch.setattr(local, "stage", recording_stage)
    kw = dict(META_CASES[case])
    name, scaffold = kw.pop("model"), kw.pop("scaffold", False)
    torch.manual_seed(0)
    if name == "vmap":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))
    else:
        model = build_model(name)
    model = model.to("meta")
    x, y = torch.empty(31, 1, 28, 28, device="meta"), torch.empty(31, dtype=torch.int64, device="meta")
    clients = [torch.arange(0, 11), torch.arange(11, 31)]
    corrections = [{k: torch.empty_like(v) for k, v in model.state_dict().items()} for _ in clients] \
        if scaffold else None
    result = vectorized_local_updates(model, x, y, clients, [torch.Generator().manual_seed(k) for k in range(2)],
                                      epochs=2, batch_size=10, lr=0.1, corrections=corrections,
                                      dropout_generators=[torch.Generator().manual_seed(9 + k) for k in range(2)],
                                      **kw)
    for tensor_name, w in model.state_dict().items():
        assert result.weights[tensor_name].device.type == "meta", tensor_name
        assert result.weights[tensor_name].shape == (2,) + w.shape, tensor_name
    for field in ("num_examples", "train_loss", "steps"):
        assert getattr(result, field).device.type == "meta", field
        assert getattr(result, field).shape == (2,), field
    assert len(staged) == (0 if name == "vmap" else 2 if "max_examples_per_step" in kw else 1)   # groups of 1
    for s in staged:
        tensors = {"index": s.index, "weight": s.weight, "scale": s.scale, "count": s.count, **s.masks}
        assert {k: t.device.type for k, t in tensors.items()} == {k: "meta" for k in tensors}


def test_models_trained_at_their_own_rates_stay_on_the_datas_device():
    """The lockstep path (one rate per model, several runs at once) on the meta device, as above."""
    from fedlib.engine import LocalSGD, train_models

    model = build_model("2nn").to("meta")
    x, y = torch.empty(31, 1, 28, 28, device="meta"), torch.empty(31, dtype=torch.int64, device="meta")
    start = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in model.state_dict().items()}
    result = train_models(model, x, y, start, torch.tensor([0.1, 0.05, 0.02]),
                          [torch.arange(0, 11), torch.arange(11, 31), torch.arange(31)],
                          [torch.Generator().manual_seed(k) for k in range(3)],
                          [torch.Generator() for _ in range(3)], LocalSGD(2, 10, momentum=0.5))
    assert {w.device.type for w in result.weights.values()} == {"meta"}
    assert result.train_loss.device.type == result.steps.device.type == "meta"


def test_each_model_without_a_program_draws_its_own_dropout_masks():
    """vmap with randomness="different": two clients with the same examples and the same shuffle still train
    apart, each on its own dropout masks (with the same masks they would end equal)."""
    from tests.helpers import small_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)).double()
    data = small_data(20, dtype=torch.float64)
    same = torch.arange(0, 20)
    result = vectorized_local_updates(model, data.x_train, data.y_train, [same, same],
                                      [torch.Generator().manual_seed(1) for _ in range(2)], epochs=1, batch_size=10,
                                      lr=0.1, dropout_generators=[torch.Generator() for _ in range(2)])
    assert not torch.equal(result.client(0)["1.weight"], result.client(1)["1.weight"])


def round_bytes_by_hand(engine: str, P: int, per_input: int, sizes: list[int], C: float, E: int, B: int | None,
                        copies: int, inputs_per_example: int = 1, state_copies: int = 0, limit: int = 1024) -> int:
    """round_bytes's docstring written out: m = max(C K, 1) clients, the m largest n_k, b = 4 P bytes
    (float32), W = min(B, largest n_k); vectorized: groups of g = min(m, max(1, limit // (W x inputs)))
    models with copies models' worth each, S = E ceil(n_max / B) steps x W slots of 21 bytes and the
    activations of W inputs, and 2 m b of updates; sequential: 4 b, the activations of W inputs and
    m b of updates; all times the measured slack 1.6."""
    b, m = 4 * P, max(int(C * len(sizes)), 1)
    largest = sorted(sizes)[::-1][:m]
    W = largest[0] if B is None else min(B, largest[0])
    if engine == "vectorized":
        g = min(m, max(1, limit // (W * inputs_per_example)))
        S = E * (1 if B is None else -(-largest[0] // B))
        working, updates = g * (copies * b + S * W * 21 + W * per_input), 2 * m * b
    else:
        working, updates = 4 * b + W * per_input, m * b
    return int(1.6 * (updates + working + state_copies * b))


def test_round_bytes_is_its_docstrings_count(monkeypatch):
    """The memory estimate, exactly, against its docstring's count written out above (the bounds in
    test_hostile_input.py only check that it covers what was measured). Each case makes one term
    matter: unequal n_k (the m largest), B below n_max, E = 2, momentum, mu and SCAFFOLD's copies,
    groups limited by W (600, 300), a sequence model (ceil(T / 12) = 3 inputs per example of T = 25), and a
    device of its own limit (the meta device stands in for CUDA, whose limit differs from the CPU's)."""
    from fedlib.backends import round_bytes

    mlp, lstm = build_model("2nn"), build_model("lstm-small")
    images, sequences = torch.zeros(3, 1, 28, 28), torch.zeros(3, 25, dtype=torch.long)
    P_mlp, P_lstm = (sum(p.numel() for p in model.parameters()) for model in (mlp, lstm))
    A_mlp = 4 * (200 + 200 + 10) * 4                # activation_bytes of one image (see the test above)
    A_lstm = 4 * (25 * 8) * 4 + 4 * (1 + 4 * 2) * (25 * 64 + 2 * 64 + 2 * 64) * 4 + 4 * (25 * 10) * 4
    unequal = [30, 70, 10, 50, 20, 60, 40, 5]       # K = 8; C = 0.5: the 4 largest are 70, 60, 50, 40
    cases = [  # engine, model, x, sizes, config, copies, inputs per example, state copies
        ("vectorized", mlp, images, unequal, dict(frac=0.5, local_epochs=2, batch_size=16, momentum=0.5), 4, 1, 0),
        ("vectorized", mlp, images, unequal, dict(frac=0.5, batch_size=16, strategy="fedprox", mu=0.1), 4, 1, 0),
        ("vectorized", mlp, images, [600, 30, 20, 10], dict(frac=0.5, local_epochs=2, batch_size=None,
                                                            strategy="scaffold"), 4, 1, 5),
        ("vectorized", mlp, images, [600, 30, 20, 10], dict(frac=0.5, batch_size=None), 3, 1, 0),
        ("vectorized", mlp, images, [300, 300, 300, 10], dict(frac=0.75, batch_size=None), 3, 1, 0),
        ("vectorized", lstm, sequences, [50] * 16, dict(frac=0.5, batch_size=None), 3, 3, 0),
        ("sequential", mlp, images, unequal, dict(frac=0.5, batch_size=16), 0, 1, 2),
        ("sequential", mlp, images, [600, 30, 20, 10], dict(frac=0.5, batch_size=None), 0, 1, 0),
    ]
    for engine, model, x, sizes, overrides, copies, inputs, state in cases:
        config = FedAvgConfig(num_clients=len(sizes), **overrides)
        P, A = (P_mlp, A_mlp) if model is mlp else (P_lstm, A_lstm)
        expected = round_bytes_by_hand(engine, P, A, sizes, config.frac, config.local_epochs, config.batch_size,
                                       copies, inputs, state)
        assert round_bytes(engine, model, x, sizes, config, state) == expected, (engine, sizes, overrides)
    # A device without a limit of its own takes the CPU's (1024 inputs a step); one with its own, that one.
    config = FedAvgConfig(num_clients=4, frac=0.5, batch_size=None)
    meta_mlp, meta_x = build_model("2nn").to("meta"), torch.zeros(3, 1, 28, 28, device="meta")
    assert round_bytes("vectorized", meta_mlp, meta_x, [600, 30, 20, 10], config) == \
        round_bytes_by_hand("vectorized", P_mlp, A_mlp, [600, 30, 20, 10], 0.5, 1, None, 3)
    monkeypatch.setitem(fedlib.engine.local.MAX_EXAMPLES_PER_STEP, "meta", 2048)
    assert round_bytes("vectorized", meta_mlp, meta_x, [600, 30, 20, 10], config) == \
        round_bytes_by_hand("vectorized", P_mlp, A_mlp, [600, 30, 20, 10], 0.5, 1, None, 3, limit=2048)
