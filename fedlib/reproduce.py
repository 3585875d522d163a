"""Reproducing the paper's tables with this library's own runs.

The published numbers live in ``fedlib/paper_tables.json`` (with the citation): Table 1
(MNIST), and Table 2's two halves, the MNIST CNN and the Shakespeare character LSTM.
Every cell of a table is a :class:`Setting` (dataset, model, partition, C, E, B, target).
Like the paper, each setting is run over a small learning-rate grid and the best
rate is reported. Each run stops as soon as it reaches the target, or at a round
cap of twice the paper's rounds (for the paper's "--" cells, twice the largest
number of its column), and is written to its own JSON file: a sweep that is
interrupted resumes where it stopped, and a finished run is never redone.
On a GPU the runs that share the model and C, E, B are trained as one batch
(``fedlib.engine.sweep.run_many``): each still gets its own clients and History,
equal to training it alone up to float rounding (``sweep(together=...)``).

The *ablation* ("table" ``ablation``, results in ``results/ablation``) asks why our
2NN needs fewer rounds than the paper's: it reruns two cells of Table 1 with one
training choice at a time changed from fedlib's toward what the paper's 2016
TensorFlow setup plausibly did (:data:`VARIANTS`), each over its own grid of rates.

*Beyond* ("table" ``beyond``, results in ``results/beyond``) is lesson 8's comparison of
FedAvg with the methods that came after it, each tuned (:func:`beyond_plan`): one cell, the
2NN on pathological non-IID MNIST with E = 5, B = 50, every method over its own grid with
two tuning seeds, then its best point again with two fresh seeds.

Table 2's *Shakespeare rows* (the paper's LSTM, K = the number of speaking roles, target 54%) run
like the CNN's, on a GPU (``python -m fedlib reproduce --table 2 --model lstm --device cuda``), and are
saved in their own folder, ``results/shakespeare`` (:func:`default_out`). *2-reduced* ("table"
``2-reduced``, results in ``results/shakespeare-reduced``) is the same rows at a size a CPU can run,
stated in :data:`REDUCED`: three plays, at most 32 sequences per role and split, the small LSTM, a lower
target (the two rows with B = 50 are left out: at this size B = 50 is B = infinity); its numbers are
never mixed with the paper-scale ones.

Every table is a *plan* of runs (setting, eta, seed) (:func:`plan`), run by one runner
(:func:`sweep`) into one file format (:func:`save_result`), and read back with one rule for
the best run (:func:`score`).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from fedlib.client import local_steps
from fedlib import shakespeare
from fedlib.config import FedAvgConfig, saved_config
from fedlib.data import Dataset, load_dataset
from fedlib.engine.lockstep import batch_key, refusal
from fedlib import params as P
from fedlib.files import atomic_write_text, load_json, to_json
from fedlib.metrics import History, rounds_to_target
from fedlib.params import InputError
from fedlib.runner import run, run_many
from fedlib.runtime import get_device

NUM_CLIENTS = 100
EXAMPLES_PER_CLIENT = 600

# The learning rates each setting is tried with, by (model, B). The paper tuned
# eta per setting over a grid too ("typically 11-13 values for eta on a multiplicative
# grid of resolution 10^(1/3) or 10^(1/6)", Section 3) but does not list its values.
LR_GRID: dict[tuple[str, int | None], tuple[float, ...]] = {
    ("2nn", 10): (0.05, 0.1, 0.2),
    ("2nn", None): (0.1, 0.3, 1.0),
    ("cnn", 10): (0.02, 0.05, 0.1),
    ("cnn", 50): (0.05, 0.1, 0.2),
    ("cnn", None): (0.1, 0.2, 0.5),
}


TABLES = ("1", "2", "2-reduced", "ablation", "beyond")
# Where each table's runs are saved by default (one JSON file per run); Table 2's Shakespeare rows
# go to SHAKESPEARE_OUT (default_out), so that each folder holds the runs of one dataset.
DEFAULT_OUT = {"1": "results/reproduce", "2": "results/reproduce", "2-reduced": "results/shakespeare-reduced",
               "ablation": "results/ablation", "beyond": "results/beyond"}
SHAKESPEARE_OUT = "results/shakespeare"
# The datasets of the models a table runs (the MNIST models, the character LSTMs).
DATASET_OF = {"2nn": "mnist", "cnn": "mnist", "lstm": "shakespeare", "lstm-small": "shakespeare"}


def default_out(table: str, dataset: str = "mnist") -> str:
    """Where a table's runs on ``dataset`` are saved by default."""
    if table not in TABLES:
        raise InputError(f"table must be one of {TABLES}, got {table!r}")
    return SHAKESPEARE_OUT if table == "2" and dataset == "shakespeare" else DEFAULT_OUT[table]


def paper_table(table: str, model: str | None = None) -> dict:
    """The published table as stored in ``paper_tables.json``: "1" (MNIST), "2" (the MNIST CNN
    half of Table 2), or "2" with ``model="lstm"`` (its Shakespeare LSTM half)."""
    if table not in ("1", "2"):
        raise InputError(f"table must be '1' or '2', got {table!r}")
    if model not in (None, "2nn", "cnn", "lstm") or (model == "lstm" and table != "2"):
        raise InputError(f"model must be None, '2nn' or 'cnn' (or 'lstm' with table '2'), got {model!r}")
    data = json.loads(resources.files("fedlib").joinpath("paper_tables.json").read_text())
    key = "table2_lstm" if model == "lstm" else f"table{table}"
    return data[key] | {"citation": data["citation"]}


@dataclass(frozen=True)
class Setting:
    """One cell of a paper table: what to run and how many rounds the paper needed."""

    table: str
    model: str
    partition: str            # "iid" or "shards" (the paper's pathological non-IID)
    frac: float               # C
    local_epochs: int         # E
    batch_size: int | None    # B (None = infinity)
    target: float
    paper_rounds: int | None  # None: the paper reports "--"
    round_cap: int
    variant: str = ""         # the ablation's variant, or lesson 8's method and knobs ("" in the paper's tables)
    input_scaling: str = "standardize"
    init: str = "pytorch"
    strategy: str = "fedavg"  # the method (fedlib.strategies) and its knobs, as (name, value) pairs
    knobs: tuple = ()
    lrs: tuple = ()           # the learning-rate grid, where the table gives it per setting (beyond, 2-reduced)
    dataset: str = "mnist"    # "mnist" or "shakespeare" (whose partitions are "natural", by role, and "iid")
    data: tuple = ()          # fedlib.shakespeare.load's options as (name, value) pairs (2-reduced's smaller task)
    paper_u: float | None = None   # the paper's u column where it differs from ours (the Shakespeare rows)

    @property
    def name(self) -> str:
        """The configuration, without the table: a cell that two tables share is run once."""
        b = "inf" if self.batch_size is None else self.batch_size
        name = f"{self.model}-{self.partition}-C{self.frac:g}-E{self.local_epochs}-B{b}"
        return f"{name}-{self.variant}" if self.variant else name

    @property
    def updates_per_round(self) -> float:
        """u: local SGD steps per client per round. MNIST: E ceil(n_k / B) with n_k = 600.
        Shakespeare: the paper's expected u = E n / (K B) (E for B = infinity), with n / K the mean
        number of training sequences per client of this setting's data (:func:`data_of`)."""
        if self.dataset == "mnist":
            return local_steps(EXAMPLES_PER_CLIENT, self.local_epochs, self.batch_size)
        data = data_of(self)
        mean_n = len(data.x_train) / len(data.clients)
        return self.local_epochs * (1 if self.batch_size is None else mean_n / self.batch_size)

    @property
    def cell(self) -> str:
        """The name of the paper's cell this setting runs (its name without the variant)."""
        return self.name.removesuffix(f"-{self.variant}") if self.variant else self.name

    def learning_rates(self) -> tuple[float, ...]:
        if self.lrs:
            return self.lrs
        if self.variant:
            return ABLATION_GRID[(self.variant, self.cell)]
        if self.dataset == "shakespeare":
            return LSTM_GRID[self.batch_size]
        return LR_GRID[(self.model, self.batch_size)]

    def seeds(self) -> tuple[int, ...]:
        """The seeds this setting is planned with (``--list`` shows them, a sweep runs them)."""
        if self.table == "beyond":
            return BEYOND_SEEDS
        if self.table == "2-reduced":
            return REDUCED.seeds
        if self.variant:
            return ABLATION_SEEDS
        return EXTRA_SEEDS.get(self.name, (0,))


def _cap(paper_rounds: int | None, column: Iterable[int | None]) -> int:
    reported = [r for r in column if r is not None]
    return 2 * (paper_rounds if paper_rounds is not None else max(reported))


def paper_settings(table: str) -> list[Setting]:
    """Every cell of Table 1 or Table 2 as a Setting, in the paper's order."""
    t = paper_table(table)
    rows = [dict(zip(t["columns"], row)) for row in t["rows"]]
    settings = []
    if table == "1":
        for key, partition, b in [("iid_B_inf", "iid", None), ("iid_B_10", "iid", 10),
                                  ("noniid_B_inf", "shards", None), ("noniid_B_10", "shards", 10)]:
            for r in rows:
                column = [x[key] for x in rows if x["model"] == r["model"]]
                settings.append(Setting("1", r["model"], partition, r["C"], r["E"], b, r["target"],
                                        r[key], _cap(r[key], column)))
    else:
        for key, partition in [("iid", "iid"), ("noniid", "shards")]:
            for r in rows:
                column = [x[key] for x in rows]
                settings.append(Setting("2", r["model"], partition, r["C"], r["E"], r["B"], r["target"],
                                        r[key], _cap(r[key], column)))
        settings += shakespeare_settings()
    return settings


def shakespeare_settings() -> list[Setting]:
    """Table 2's Shakespeare half: the character LSTM on the split by role ("natural", the paper's
    non-IID) and on the IID split with as many clients, C = 0.1, each to 54% or twice the paper's rounds."""
    t = paper_table("2", model="lstm")
    rows = [dict(zip(t["columns"], row)) for row in t["rows"]]
    return [Setting("2", r["model"], partition, r["C"], r["E"], r["B"], r["target"], r[key], 2 * r[key],
                    dataset="shakespeare", paper_u=r["u"])
            for key, partition in [("iid", "iid"), ("noniid", "natural")] for r in rows]


# Cells of the paper's tables run with more seeds than seed 0, to measure the spread.
EXTRA_SEEDS = {"2nn-iid-C0.1-E1-B10": (0, 1, 2), "2nn-shards-C0.1-E1-B10": (0, 1, 2)}


# --- the ablation: why our 2NN needs about a third of the paper's rounds ------------------------

@dataclass(frozen=True)
class Variant:
    """One set of training choices: fedlib's, or fedlib's with a step toward the paper's
    plausible 2016 TensorFlow setup (input scaling: ``fedlib.data.SCALINGS``;
    initialisation: ``fedlib.models.INITS``)."""

    name: str
    input_scaling: str
    init: str
    what: str


VARIANTS = (
    Variant("fedlib", "standardize", "pytorch", "our choices: standardised pixels, PyTorch's initialisation"),
    Variant("unit", "unit", "pytorch", "pixels scaled to [0, 1]"),
    Variant("raw", "raw", "pytorch", "raw pixels, 0-255"),
    Variant("truncnormal", "standardize", "truncated-normal", "truncated normal (std 0.1) initialisation"),
    Variant("glorot", "standardize", "glorot-uniform", "Glorot-uniform initialisation"),
    Variant("unit-truncnormal", "unit", "truncated-normal", "[0, 1] pixels and truncated normal initialisation"),
    Variant("unit-glorot", "unit", "glorot-uniform", "[0, 1] pixels and Glorot-uniform initialisation"),
    Variant("raw-truncnormal", "raw", "truncated-normal", "raw pixels and truncated normal initialisation"),
    Variant("raw-glorot", "raw", "glorot-uniform", "raw pixels and Glorot-uniform initialisation"),
)
# The cells of Table 1 the ablation reruns: the 2NN at C = 0.1, E = 1, B = 10 (the paper: 87 rounds IID,
# 664 non-IID), and FedSGD (B = infinity, IID, the paper: 1474) for three variants, to see whether what
# the first two show holds where each client takes one full-batch step per round.
IID, NON_IID, FEDSGD = "2nn-iid-C0.1-E1-B10", "2nn-shards-C0.1-E1-B10", "2nn-iid-C0.1-E1-Binf"
ABLATION_CELLS = (IID, NON_IID)
IID_ONLY = ("raw-truncnormal", "raw-glorot")     # variants run on the IID cell alone (see ABLATION_GRID)
ABLATION_SEEDS = (0, 1)


def lattice(*k: int) -> tuple[float, ...]:
    """The learning rates 10^(k/6) for the given k, to 3 significant digits: points of the
    paper's multiplicative grids (resolution 10^(1/6); even k alone give 10^(1/3))."""
    return tuple(float(f"{10 ** (i / 6):.3g}") for i in k)


# The ablation's runs: one grid of rates per (variant, cell), wide enough that the best rate of
# every seed is inside it; resolution 10^(1/3), with 10^(1/6) around the best for fedlib and raw.
ABLATION_GRID: dict[tuple[str, str], tuple[float, ...]] = {
    ("fedlib", IID): lattice(-8, -7, -6, -5, -4), ("fedlib", NON_IID): lattice(-8, -7, -6, -5, -4),
    ("unit", IID): lattice(-6, -4, -2), ("unit", NON_IID): lattice(-6, -4, -2),
    ("raw", IID): lattice(-20, -18, -17, -16, -15, -14), ("raw", NON_IID): lattice(-20, -18, -17, -16, -15, -14),
    ("truncnormal", IID): lattice(-8, -6, -4), ("truncnormal", NON_IID): lattice(-8, -6, -4),
    ("glorot", IID): lattice(-8, -6, -4), ("glorot", NON_IID): lattice(-8, -6, -4),
    ("unit-truncnormal", IID): lattice(-6, -4, -2), ("unit-truncnormal", NON_IID): lattice(-6, -4, -2),
    ("unit-glorot", IID): lattice(-6, -4, -2), ("unit-glorot", NON_IID): lattice(-6, -4, -2),
    # raw pixels with TensorFlow-style initialisers, on the IID cell only: over 1e-4 to 4.6e-3 no
    # rate reaches 97% within the cap (the largest diverges), so the non-IID cell was not run.
    ("raw-truncnormal", IID): lattice(-24, -22, -20, -18, -16, -14),
    ("raw-glorot", IID): lattice(-24, -22, -20, -18, -16, -14),
    ("fedlib", FEDSGD): lattice(-6, -4, -3, -2, -1), ("unit", FEDSGD): lattice(-4, -2, 0),
    ("raw", FEDSGD): lattice(-18, -16, -14, -12),
}


def ablation_settings() -> list[Setting]:
    """One setting per (variant, cell) of ``ABLATION_GRID``, in the order of ``VARIANTS``."""
    cells = {s.name: s for s in paper_settings("1")}
    return [Setting("ablation", c.model, c.partition, c.frac, c.local_epochs, c.batch_size, c.target,
                    c.paper_rounds, c.round_cap, v.name, v.input_scaling, v.init)
            for v in VARIANTS for c in (cells[cell] for variant, cell in ABLATION_GRID if variant == v.name)]


# --- Shakespeare: Table 2's LSTM rows, and the same rows at a size a CPU can run ---------------------

# The LSTM rows' learning rates, by B, on the paper's lattice. The paper does not list its grid; it
# names one rate, eta = 1.47 = 10^(1/6), for FedAvg with B = 10 ("near-optimal across the range of E",
# Figure 3). B = 10 tries 10^(1/3) below and above it; B = 50 and FedSGD's B = infinity average over
# more sequences per step, so their grids sit 10^(1/3) higher. A best rate at an edge of its grid says
# the grid must grow (lesson 10 lists the Shakespeare rows with their grids).
LSTM_GRID: dict[int | None, tuple[float, ...]] = {10: lattice(-1, 1, 3), 50: lattice(1, 3, 5), None: lattice(1, 3, 5)}


@dataclass(frozen=True)
class Reduced:
    """What 2-reduced changes from the paper's Shakespeare task, so that its runs fit a CPU."""

    plays: tuple[str, ...]
    max_sequences: int      # per role, of its training and of its test sequences (the first ones)
    model: str
    target: float
    seeds: tuple[int, ...]

    @property
    def data(self) -> tuple:
        """fedlib.shakespeare.load's options, as a Setting holds them."""
        return (("plays", self.plays), ("max_sequences", self.max_sequences))


REDUCED = Reduced(plays=("hamlet", "macbeth", "romeo_and_juliet"), max_sequences=32, model="lstm-small",
                  target=0.30, seeds=(0,))
# 2-reduced's rows: (E, B) -> (learning rates, round cap). With at most 32 sequences a client, B = 50 is one
# batch, B = infinity: the paper's two B = 50 rows would repeat the B = infinity rows, so they are left out.
# The grids are the paper's lattice 10^(k/6) around rates that sizing runs (seed 0) found best: FedSGD
# reached 30% in 257, 187 and 249 rounds at eta = 3.16, 4.64 and 6.81 on the split by role; FedAvg with
# E = 5, B = 10 in 12.0, 9.9 and 10.6 rounds at 4.64, 6.81 and 10. The caps are 3 to 6 times those rounds.
# The two B = infinity rows have a fourth rate, 10: on the IID split the best of their first three was the
# largest, 6.81.
# Lesson 10's quick profile is this table's FedSGD and E = 5, B = 10 rows, each at its best rate.
REDUCED_ROWS: dict[tuple[int, int | None], tuple[tuple[float, ...], int]] = {
    (1, None): (lattice(3, 4, 5, 6), 600),
    (5, None): (lattice(3, 4, 5, 6), 300),
    (1, 10): (lattice(4, 5, 6), 300),
    (5, 10): (lattice(4, 5, 6), 60),
}


def reduced_settings() -> list[Setting]:
    """2-reduced: the paper's Shakespeare rows of :data:`REDUCED_ROWS` on :data:`REDUCED`'s smaller task
    (its own target, no paper rounds to compare with: the paper's are for 54% at full size), IID then by role."""
    return [Setting("2-reduced", REDUCED.model, partition, 0.1, E, B, REDUCED.target, None, cap, lrs=lrs,
                    dataset="shakespeare", data=REDUCED.data)
            for partition in ("iid", "natural") for (E, B), (lrs, cap) in REDUCED_ROWS.items()]


@functools.cache
def _shakespeare(options: tuple) -> Dataset:
    return shakespeare.load(device="cpu", **dict(options))


def data_of(setting: Setting, scaling: str | None = None) -> Dataset:
    """The data a setting trains on, on the CPU: MNIST scaled as the setting says, or the Shakespeare
    task with the setting's options (loaded once per set of options)."""
    if setting.dataset == "shakespeare":
        return _shakespeare(setting.data)
    return load_dataset("mnist", scaling=scaling or setting.input_scaling, device="cpu")


def num_clients_of(setting: Setting) -> int:
    """K: 100 on MNIST; on Shakespeare the number of speaking roles of the setting's data, for the
    split by role and for the IID split alike (the paper's IID version has as many clients)."""
    return NUM_CLIENTS if setting.dataset == "mnist" else len(data_of(setting).clients)


# --- beyond FedAvg: lesson 8's tuned comparison ---------------------------------------------------

# The one cell: the 2NN on pathological non-IID MNIST, K = 100, C = 0.1, E = 5, B = 50 (u = 60 local
# steps), each run until 95% test accuracy or 150 rounds.
BEYOND_CELL = dict(model="2nn", partition="shards", frac=0.1, local_epochs=5, batch_size=50, target=0.95,
                   paper_rounds=None, round_cap=150)
BEYOND_SEEDS = (0, 1)           # every grid point runs with these (tuning)
BEYOND_FRESH = (2, 3)           # each method's best point runs again with these, which chose nothing
BEYOND_ETAS = (0.1, 0.2, 0.4)
# Each method's grid: its knobs and learning rates; "eta*" is FedAvg's best eta. A grid brackets its best
# point: SCAFFOLD diverged at FedAvg's eta = 0.2, so its grid goes down to 0.025; FedAvgM was best at
# eta_g = 1 with beta = 0.5, so its grid goes up to eta_g = 2.
BEYOND_GRID: dict[str, list[tuple[dict, tuple]]] = {
    "fedavg": [({}, BEYOND_ETAS)],
    "scaffold": [({}, (0.025, 0.05) + BEYOND_ETAS)],
    "fedprox": [({"mu": mu}, ("eta*",)) for mu in (0.01, 0.1, 1.0)],
    "fedavgm": [({"server_lr": g, "server_momentum": beta}, ("eta*",)) for beta in (0.5, 0.9)
                for g in (0.1, 0.3, 1.0, 2.0)],
    "fedadam": [({"server_lr": g}, ("eta*",)) for g in (0.001, 0.003, 0.01, 0.03)],
}
SHOWN = {"mu": "mu", "server_lr": "slr", "server_momentum": "mom"}      # how a knob appears in a name


def beyond_setting(method: str, knobs: dict, lrs: tuple, label: str | None = None) -> Setting:
    """One grid point of lesson 8's comparison: ``method`` (a strategy) with ``knobs``, over ``lrs``."""
    shown = [f"{SHOWN[k]}{v:g}" for k, v in knobs.items() if k in SHOWN]
    strategy = "fedavgm" if method == "server-sgd" else method
    return Setting("beyond", **BEYOND_CELL, variant="-".join([label or method, *shown]), strategy=strategy,
                   knobs=tuple(knobs.items()), lrs=tuple(lrs))


def beyond_plan(results: Iterable[dict]) -> list[tuple["Setting", float, int]]:
    """Lesson 8's runs that can be named now, given the results so far: every method's grid with the
    tuning seeds (the grids at FedAvg's best eta once it is known), each method's best point with the
    fresh seeds once its grid is done, and, once FedAvgM's best (eta_g, beta) is known, the control
    that asks whether its momentum matters: server SGD without momentum at the same long-run step
    eta_g / (1 - beta) ("server-sgd")."""
    results = list(results)
    best = {method: best_point(results, settings, BEYOND_SEEDS) for method, settings in beyond_grid(results).items()}
    jobs = []
    for method, settings in beyond_grid(results).items():
        jobs += [(s, lr, seed) for s in settings for lr in s.learning_rates() for seed in BEYOND_SEEDS]
        if best[method]:
            setting, lr = best[method]
            jobs += [(setting, lr, seed) for seed in BEYOND_FRESH]
    return jobs


def beyond_grid(results: list[dict]) -> dict[str, list[Setting]]:
    """Each method's grid points that can be named now (those at eta* once FedAvg's best eta is known)."""
    fedavg = best_point(results, [beyond_setting("fedavg", {}, BEYOND_ETAS)], BEYOND_SEEDS)
    grid: dict[str, list[Setting]] = {}
    for method, points in BEYOND_GRID.items():
        if any("eta*" in lrs for _, lrs in points) and fedavg is None:
            continue
        grid[method] = [beyond_setting(method, knobs, tuple(fedavg[1] if lr == "eta*" else lr for lr in lrs))
                        for knobs, lrs in points]
    momentum = best_point(results, grid.get("fedavgm", []), BEYOND_SEEDS)
    if momentum:
        knobs = dict(momentum[0].knobs)
        step = knobs["server_lr"] / (1 - knobs["server_momentum"])
        grid["server-sgd"] = [beyond_setting("server-sgd", {"server_lr": step, "server_momentum": 0.0},
                                             (momentum[1],))]
    return grid


def settings_of(table: str) -> list[Setting]:
    """The settings of Table 1, Table 2 (both halves), 2-reduced or the ablation (``beyond``: those
    that can be named without results, see :func:`beyond_plan`)."""
    if table not in TABLES:
        raise InputError(f"table must be one of {TABLES}, got {table!r}")
    if table == "beyond":
        return [s for settings in beyond_grid([]).values() for s in settings]
    if table == "2-reduced":
        return reduced_settings()
    return ablation_settings() if table == "ablation" else paper_settings(table)


def plan(table: str, out_dir: str | Path | None = None) -> list[tuple[Setting, float, int]]:
    """Every run (setting, eta, seed) of a table that can be named now: the paper's tables and the
    ablation are fixed; lesson 8's grows with its results in ``out_dir`` (:func:`beyond_plan`)."""
    if table == "beyond":
        return beyond_plan(load_results(out_dir or DEFAULT_OUT["beyond"]))
    return [(s, lr, seed) for s in settings_of(table) for lr in s.learning_rates() for seed in s.seeds()]


def select(settings: Sequence[Setting], model: str | None = None, partition: str | None = None,
           names: Sequence[str] | None = None) -> list[Setting]:
    """The settings matching every filter given; unknown names raise InputError."""
    if names:
        known = {s.name for s in settings}
        unknown = sorted(set(names) - known)
        if unknown:
            raise InputError(f"names must be settings of this table, got unknown {unknown}; "
                             f"see 'python -m fedlib reproduce --list'")
    return [s for s in settings if (model is None or s.model == model)
            and (partition is None or s.partition == partition) and (not names or s.name in names)]


def rate_text(lr: float) -> str:
    """eta as it appears in a run's name: the shortest text that reads back as exactly this
    float (0.1, 0.0464, 1e-05; 1.0 as 1), so two different rates never share a name."""
    text = repr(float(lr))
    return text[:-2] if text.endswith(".0") else text


def run_id(setting: Setting, lr: float, seed: int) -> str:
    return f"{setting.name}-lr{rate_text(lr)}-seed{seed}"


def command_for(setting: Setting, lr: float, seed: int, round_cap: int | None = None) -> str:
    """The command line that produces this run's result file (with ``--max-rounds``
    where the run had a lower cap than the setting's).

    The command trains the run alone; a file made by a batched sweep (``"together"`` > 1,
    ``--together on``) is reproduced by it up to float rounding: the same clients every
    round, and weights that differ only in the last bits.
    """
    command = (f"python -m fedlib reproduce --table {setting.table} --only {setting.name} "
               f"--lr {rate_text(lr)} --seeds {seed}")
    if round_cap is not None and round_cap < setting.round_cap:
        command += f" --max-rounds {round_cap}"
    return command


def round_cap_of(setting: Setting, max_rounds: int | None = None) -> int:
    """The rounds a run may take: the setting's cap, or ``max_rounds`` if lower."""
    return min(setting.round_cap, max_rounds) if max_rounds else setting.round_cap


def result_path(setting: Setting, lr: float, seed: int, out_dir: Path) -> Path:
    return Path(out_dir) / f"{run_id(setting, lr, seed)}.json"


def checkpoint_path(setting: Setting, lr: float, seed: int, out_dir: Path) -> Path:
    """Where an unfinished run keeps its w_t and History, to resume from."""
    return Path(out_dir) / ".checkpoints" / f"{run_id(setting, lr, seed)}.ckpt"


def saved_result(setting: Setting, lr: float, seed: int, cap: int, out_dir: Path) -> dict | None:
    """The saved run if it is final (reached its target, diverged, or ran to a cap >= ``cap``), else None."""
    path = result_path(setting, lr, seed, out_dir)
    if not path.exists():
        return None
    saved = load_result(path)
    if saved["lr"] != lr or saved["seed"] != seed or saved["setting"]["name"] != setting.name:
        raise InputError(f"{path} holds the run {saved['setting']['name']} at eta = {saved['lr']!r}, seed "
                         f"{saved['seed']}, not eta = {lr!r}, seed {seed}; delete it to run it again")
    if saved["reached"] or saved.get("diverged") or saved["round_cap"] >= cap:   # a lower cap runs again
        return saved
    return None


def config_of(setting: Setting, lr: float, seed: int, cap: int, device: str = "auto") -> FedAvgConfig:
    """The FedAvgConfig of one run: the setting's cell at learning rate eta = ``lr``, run
    for at most ``cap`` rounds, stopping when it reaches the setting's target. The test set is
    evaluated every round (every 5th with a cap over 1000 rounds; 2-reduced's FedSGD rows, whose
    rounds cost little beside an evaluation, every 5th)."""
    every = 5 if cap > 1000 or (setting.table == "2-reduced" and setting.batch_size is None
                                and setting.local_epochs == 1) else 1
    return FedAvgConfig(dataset=setting.dataset, model=setting.model, partition=setting.partition,
                        num_clients=num_clients_of(setting), frac=setting.frac, local_epochs=setting.local_epochs,
                        batch_size=setting.batch_size, lr=lr, rounds=cap, seed=seed,
                        input_scaling=setting.input_scaling, init=setting.init,
                        eval_every=every, device=device,
                        target=setting.target, stop_at_target=True, strategy=setting.strategy,
                        **dict(setting.knobs))


def save_result(setting: Setting, lr: float, seed: int, cap: int, history: History, out_dir: Path,
                together: int = 1) -> dict:
    """Write one finished run's result file (atomically), remove its checkpoint, return the result.

    together: how many runs were trained as one batch with it (1: alone).
    """
    needed = rounds_to_target(history, setting.target)
    result = {
        "setting": asdict(setting) | {"name": setting.name},
        "lr": lr, "seed": seed, "round_cap": cap,
        "rounds_to_target": needed, "reached": needed is not None,
        "diverged": history.diverged,
        "rounds_run": len(history.records), "best_accuracy": history.best_accuracy,
        "wall_seconds": round(history.seconds, 2), "device": history.device, "versions": history.versions,
        "command": command_for(setting, lr, seed, cap), "together": together,
        "history": history.to_dict(),
    }
    text = to_json(result)
    atomic_write_text(result_path(setting, lr, seed, out_dir), text)
    checkpoint_path(setting, lr, seed, out_dir).unlink(missing_ok=True)
    return json.loads(text)                    # as a later sweep reads it back (tuples as lists)


Job = tuple[Setting, float, int]          # (setting, eta, seed): one run of a sweep


def jobs_of(settings: Sequence[Setting], lrs: Sequence[float] | None = None,
            seeds: Sequence[int] | None = None) -> list[Job]:
    """Every setting x learning rate x seed (None: each setting's own grid and seeds)."""
    return [(s, lr, seed) for s in settings for lr in (lrs or s.learning_rates()) for seed in (seeds or s.seeds())]


def sweep(jobs: Sequence[Job], out_dir: str | Path, device: str = "auto", max_rounds: int | None = None,
          data: Dataset | None = None, progress: bool = True, together: bool | None = None) -> list[dict]:
    """Run every job (setting, eta, seed) not yet saved under ``out_dir``; returns every job's
    result (saved ones included), in order.

    data: the data of every job (default: each setting's own, :func:`data_of`, loaded once).
    together: train the pending runs that can share a batch (the same model, data and local
    training: ``fedlib.engine.lockstep.batch_key``) as one, with ``fedlib.run_many``, which gives
    each run the same clients and, up to float rounding, the same weights as training it alone;
    None: on a CUDA device only. False: one run after another. Ctrl-C stops the sweep with
    ``RunInterrupted``; the unfinished runs keep their checkpoints and resume on the next sweep.
    """
    out_dir = Path(out_dir)
    loaded: dict[tuple, Dataset] = {}

    def data_for(setting: Setting) -> Dataset:
        if data is not None:                      # the caller's data (a run refuses it if scaled otherwise)
            return data
        key = data_key(setting)
        if key not in loaded:
            loaded[key] = data_of(setting)
        return loaded[key]

    if together is None:
        together = get_device(device).type == "cuda"
    caps = [round_cap_of(s, max_rounds) for s, _, _ in jobs]
    results = [saved_result(s, lr, seed, cap, out_dir) for (s, lr, seed), cap in zip(jobs, caps)]
    pending = {i: config_of(*jobs[i], caps[i], device) for i, r in enumerate(results) if r is None}
    batches = groups(pending, {i: data_key(jobs[i][0]) for i in pending}) if together else [[i] for i in pending]
    overall = tqdm(batches, desc="reproduce", unit="batch", disable=not progress, position=0)
    for batch in overall:
        overall.set_postfix_str(run_id(*jobs[batch[0]]) + (f" and {len(batch) - 1} more" if len(batch) > 1 else ""))
        batch_data = data_for(jobs[batch[0]][0])
        configs = [pending[i] for i in batch]
        checkpoints = [checkpoint_path(*jobs[i], out_dir) for i in batch]
        if len(batch) == 1:
            histories = [run(configs[0], batch_data, progress=progress, checkpoint=checkpoints[0])]
        else:
            histories = run_many(configs, batch_data, progress=progress, checkpoints=checkpoints)
        for i, config, history in zip(batch, configs, histories):
            results[i] = save_result(*jobs[i], config.rounds, history, out_dir, together=len(batch))
    return results


def data_key(setting: Setting) -> tuple:
    """What decides a setting's data: the dataset, the inputs' scaling, the task's options."""
    return (setting.dataset, setting.input_scaling if setting.dataset == "mnist" else "ids", setting.data)


def groups(configs: dict[int, FedAvgConfig], data: dict[int, tuple] | None = None) -> list[list[int]]:
    """The keys of ``configs`` (positions of runs) in batches that can be trained together
    (``fedlib.engine.lockstep``; ``data``: each run's :func:`data_key`, which they must share too), in
    order of appearance; a run that cannot be batched is alone."""
    found: dict[tuple, list[int]] = {}
    for i, config in configs.items():
        key = ("alone", i) if refusal(config) else (batch_key(config), (data or {}).get(i))
        found.setdefault(key, []).append(i)
    return list(found.values())


# What a result file holds, with the type of each value (None allowed where a tuple says so).
# "diverged" is missing from the files written before the runner stopped diverged runs, and
# "together" (how many runs were trained as one batch with it) from those written before sweeps batched runs.
RESULT_FIELDS = {"setting": dict, "lr": (int, float), "seed": int, "round_cap": int,
                 "rounds_to_target": (int, float, type(None)), "reached": bool, "diverged": (bool, type(None)),
                 "rounds_run": int, "best_accuracy": (int, float, type(None)), "wall_seconds": (int, float),
                 "device": str, "versions": dict, "command": str, "together": (int, type(None)), "history": dict}
OPTIONAL = ("diverged", "together")


def load_result(path: str | Path) -> dict:
    """One saved run, checked field by field (:func:`check_result`); InputError names a file that is
    not a result of this runner and the first field that is wrong."""
    try:
        return check_result(load_json(path))
    except (FileNotFoundError, InputError) as error:
        raise InputError(f"{path} is not a reproduction result ({error}); delete it to run it again") from None


def check_result(data: object) -> dict:
    """A result's fields, each of its type (RESULT_FIELDS; a bool is not a number) and in its range:
    lr a rate eta, seed a seed, round_cap a number of rounds, rounds_run that of the history's
    records, rounds_to_target None or a number of rounds in [1, rounds_run] and None exactly when
    ``reached`` is false, best_accuracy the history's, wall_seconds finite and >= 0, versions names
    to version strings, together None or >= 1; setting a Setting whose name is ``setting.name``;
    history a History (:func:`fedlib.metrics.check_history`) of this run's configuration (its lr and
    seed). Returns ``data``."""
    if not isinstance(data, dict):
        raise InputError(f"a result must be a mapping of its fields, got {type(data).__name__}")
    unknown = sorted(map(str, set(data) - set(RESULT_FIELDS)))
    wrong = [k for k, kind in RESULT_FIELDS.items() if (k in data or k not in OPTIONAL)
             and (not isinstance(data.get(k), kind) or (isinstance(data.get(k), bool) and bool not in _kinds(kind)))]
    if unknown or wrong:
        raise InputError(f"missing or wrong: {', '.join(wrong + unknown)}")
    history = History.from_dict(data["history"])
    try:
        config = saved_config(history.config)
    except InputError as error:
        raise InputError(f"its history's config: {error}") from None
    checks = [
        ("lr", P.LR.contains(data["lr"]) and data["lr"] == config.lr, "a rate eta > 0, the history's"),
        ("seed", P.SEED.contains(data["seed"]) and data["seed"] == config.seed, "a seed, the history's"),
        ("round_cap", P.ROUNDS.contains(data["round_cap"]), "a number of rounds >= 1"),
        ("rounds_run", data["rounds_run"] == len(history.records), f"the history's {len(history.records)} rounds"),
        ("rounds_to_target", data["rounds_to_target"] is None or 1 <= data["rounds_to_target"] <= data["rounds_run"],
         "None or a number of rounds in [1, rounds_run]"),
        ("reached", data["reached"] == (data["rounds_to_target"] is not None), "whether rounds_to_target is given"),
        ("best_accuracy", data["best_accuracy"] == history.best_accuracy, "the history's best accuracy"),
        ("wall_seconds", 0 <= data["wall_seconds"] < math.inf, "a finite number of seconds >= 0"),
        ("versions", all(isinstance(v, str) for v in data["versions"].values()), "names to version strings"),
        ("together", data.get("together") is None or data["together"] >= 1, "None or a number of runs >= 1"),
    ]
    for field, ok, allowed in checks:
        if not ok:
            raise InputError(f"its {field} must be {allowed}, got {P.shown(data[field])}")
    setting = data["setting"]
    known = {f.name for f in dataclass_fields(Setting)}
    try:
        named = Setting(**{k: tuple(map(tuple, v)) if k == "knobs" else tuple(v) if k == "lrs" else v
                           for k, v in setting.items() if k != "name"}).name
    except (TypeError, ValueError):
        named = None
    if set(setting) - known - {"name"} or not isinstance(setting.get("name"), str) or named != setting["name"]:
        raise InputError(f"its setting must be a setting of a table with its name, got name {P.shown(setting.get('name'))}")
    return data


def _kinds(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def load_results(out_dir: str | Path) -> list[dict]:
    """Every saved run under ``out_dir`` (InputError names any file that is not one)."""
    return [load_result(p) for p in sorted(Path(out_dir).glob("*.json"))]


def run_status(setting: Setting, lr: float, seed: int, out_dir: str | Path) -> str:
    """'done', 'pending', or 'corrupt' (a file is there but is not a result) for one run."""
    path = Path(out_dir) / f"{run_id(setting, lr, seed)}.json"
    if not path.exists():
        return "pending"
    try:
        load_result(path)
    except InputError:
        return "corrupt"
    return "done"


def score(runs: Sequence[dict | None]) -> tuple[int, float, int]:
    """How good a grid point is over its seeds, smaller is better: first how many runs missed the
    target (a run not yet done counts as missed), then the mean rounds to target of those that
    reached it, then how many diverged. With one seed: the fewest rounds to target (the paper's
    choice), and a run that did not reach the target beats one that diverged."""
    done = [r for r in runs if r is not None]
    reached = [r["rounds_to_target"] for r in done if r["reached"]]
    return (len(runs) - len(reached), sum(reached) / len(reached) if reached else math.inf,
            sum(bool(r.get("diverged")) for r in done))


def best_point(results: Iterable[dict], settings: Sequence[Setting], seeds: Sequence[int]
               ) -> tuple[Setting, float] | None:
    """The (setting, eta) among ``settings`` x their grids with the best :func:`score` over
    ``seeds``; None until every one of those runs is saved."""
    by_run = {(r["setting"]["name"], r["lr"], r["seed"]): r for r in results}
    points = [(s, lr) for s in settings for lr in s.learning_rates()]
    runs = {(s.name, lr): [by_run.get((s.name, lr, seed)) for seed in seeds] for s, lr in points}
    if not points or any(r is None for rs in runs.values() for r in rs):
        return None
    return min(points, key=lambda point: score(runs[(point[0].name, point[1])]))


def best_per_setting(results: Iterable[dict]) -> dict[tuple[str, int], dict]:
    """For each (setting name, seed): the run with the best :func:`score` over the
    learning-rate grid (the paper's choice: the fewest rounds to target)."""
    best: dict[tuple[str, int], dict] = {}
    for r in results:
        key = (r["setting"]["name"], r["seed"])
        if key not in best or score([r]) < score([best[key]]):
            best[key] = r
    return best


def comparison_rows(table: str, out_dir: str | Path, seed: int = 0, dataset: str | None = None) -> list[dict]:
    """One row per setting of the table (or of the ablation) on one dataset: the paper's rounds,
    ours (best eta), their ratio.

    dataset: Table 2 has two halves, the MNIST CNN and the Shakespeare LSTM, each against its own
    FedSGD row and saved in its own folder (:func:`default_out`); this picks one (default: the
    dataset of the table's first setting, MNIST for Tables 1 and 2).
    A setting with no saved run shows ``ours = "not yet run"``; one whose runs all
    stopped at the cap shows ``"not reached"`` (and the cap). ``etas`` says how much of
    the setting's learning-rate grid has been run (``"2/3"``: the best may still move).
    ``u`` is ours; ``paper_u`` the paper's where it prints another (its Shakespeare rows).
    """
    results = [r for r in load_results(out_dir) if r["seed"] == seed]
    best = best_per_setting(results)
    settings = settings_of(table)
    dataset = dataset or settings[0].dataset
    rows = []
    for s in (s for s in settings if s.dataset == dataset):
        r = best.get((s.name, seed))
        tried = {x["lr"] for x in results if x["setting"]["name"] == s.name}
        row = {"setting": s.name, "variant": s.variant, "model": s.model, "partition": s.partition, "C": s.frac,
               "E": s.local_epochs, "B": "inf" if s.batch_size is None else s.batch_size,
               "u": s.updates_per_round, "paper_u": s.paper_u, "paper": s.paper_rounds,
               "etas": f"{len(tried & set(s.learning_rates()))}/{len(s.learning_rates())}"}
        if r is None:
            row |= {"ours": "not yet run", "lr": None, "ratio": None}
        elif not r["reached"]:
            why = "diverged" if r.get("diverged") else f"not reached in {r['round_cap']}"
            row |= {"ours": why, "lr": None, "ratio": None}
        else:
            ratio = r["rounds_to_target"] / s.paper_rounds if s.paper_rounds else None
            row |= {"ours": r["rounds_to_target"], "lr": r["lr"], "ratio": ratio}
        rows.append(row)
    return rows
