"""Reproducing the paper's MNIST tables with this library's own runs.

The published numbers live in ``fedlib/paper_mnist.json`` (with the citation).
Every cell of a table is a :class:`Setting` (model, partition, C, E, B, target).
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
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from fedlib.config import FedAvgConfig
from fedlib.data import Dataset, load_dataset
from fedlib.engine.sweep import MAY_DIFFER, run_many, sweep_reason
from fedlib.files import atomic_write_text
from fedlib.metrics import History, rounds_to_target
from fedlib.params import InputError
from fedlib.runtime import get_device
from fedlib.server import run

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


TABLES = ("1", "2", "ablation")
# Where each table's runs are saved by default (one JSON file per run).
DEFAULT_OUT = {"1": "results/reproduce", "2": "results/reproduce", "ablation": "results/ablation"}


def paper_table(table: str) -> dict:
    """The published table ("1" or "2") as stored in ``paper_mnist.json``."""
    if table not in ("1", "2"):
        raise InputError(f"table must be '1' or '2', got {table!r}")
    data = json.loads(resources.files("fedlib").joinpath("paper_mnist.json").read_text())
    return data[f"table{table}"] | {"citation": data["citation"]}


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
    variant: str = ""         # the ablation's variant ("" in the paper's tables)
    input_scaling: str = "standardize"
    init: str = "pytorch"

    @property
    def name(self) -> str:
        """The configuration, without the table: a cell that two tables share is run once."""
        b = "inf" if self.batch_size is None else self.batch_size
        name = f"{self.model}-{self.partition}-C{self.frac:g}-E{self.local_epochs}-B{b}"
        return f"{name}-{self.variant}" if self.variant else name

    @property
    def updates_per_round(self) -> float:
        """u = E n_k / B: local SGD steps per client per round (n_k = 600)."""
        steps = 1 if self.batch_size is None else math.ceil(EXAMPLES_PER_CLIENT / self.batch_size)
        return self.local_epochs * steps

    @property
    def cell(self) -> str:
        """The name of the paper's cell this setting runs (its name without the variant)."""
        return self.name.removesuffix(f"-{self.variant}") if self.variant else self.name

    def learning_rates(self) -> tuple[float, ...]:
        if self.variant:
            return ABLATION_GRID[(self.variant, self.cell)]
        return LR_GRID[(self.model, self.batch_size)]

    def seeds(self) -> tuple[int, ...]:
        """The seeds this setting is planned with (``--list`` shows them, a sweep runs them)."""
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
    return settings


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


def settings_of(table: str) -> list[Setting]:
    """The settings of Table 1, Table 2 or the ablation."""
    if table not in TABLES:
        raise InputError(f"table must be one of {TABLES}, got {table!r}")
    return ablation_settings() if table == "ablation" else paper_settings(table)


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


def run_id(setting: Setting, lr: float, seed: int) -> str:
    return f"{setting.name}-lr{lr:g}-seed{seed}"


def command_for(setting: Setting, lr: float, seed: int, round_cap: int | None = None) -> str:
    """The command line that produces this run's result file (with ``--max-rounds``
    where the run had a lower cap than the setting's).

    The command trains the run alone; a file made by a batched sweep (``"together"`` > 1,
    ``--together on``) is reproduced by it up to float rounding: the same clients every
    round, and weights that differ only in the last bits.
    """
    command = (f"python -m fedlib reproduce --table {setting.table} --only {setting.name} "
               f"--lr {lr:g} --seeds {seed}")
    if round_cap is not None and round_cap < setting.round_cap:
        command += f" --max-rounds {round_cap}"
    return command


# Rounds between two checkpoints of a run (each run also saves when it ends and on Ctrl-C).
CHECKPOINT_EVERY = 25


def round_cap_of(setting: Setting, max_rounds: int | None = None) -> int:
    """The rounds a run may take: the setting's cap, or ``max_rounds`` if lower."""
    return min(setting.round_cap, max_rounds) if max_rounds else setting.round_cap


def result_path(setting: Setting, lr: float, seed: int, out_dir: Path) -> Path:
    return Path(out_dir) / f"{run_id(setting, lr, seed)}.json"


def checkpoint_path(setting: Setting, lr: float, seed: int, out_dir: Path) -> Path:
    """Where an unfinished run keeps its w_t and History, to resume from."""
    return Path(out_dir) / ".checkpoints" / f"{run_id(setting, lr, seed)}.ckpt"


def saved_result(setting: Setting, lr: float, seed: int, cap: int, out_dir: Path) -> dict | None:
    """The saved run if it is final (reached its target, or ran to a cap >= ``cap``), else None."""
    path = result_path(setting, lr, seed, out_dir)
    if not path.exists():
        return None
    saved = load_result(path)
    if saved["reached"] or saved["round_cap"] >= cap:        # a run stopped at a lower cap runs again
        return saved
    return None


def config_of(setting: Setting, lr: float, seed: int, cap: int, device: str = "auto") -> FedAvgConfig:
    """The FedAvgConfig of one run: the setting's cell at learning rate eta = ``lr``, run
    for at most ``cap`` rounds, stopping when it reaches the setting's target."""
    return FedAvgConfig(dataset="mnist", model=setting.model, partition=setting.partition,
                        num_clients=NUM_CLIENTS, frac=setting.frac, local_epochs=setting.local_epochs,
                        batch_size=setting.batch_size, lr=lr, rounds=cap, seed=seed,
                        input_scaling=setting.input_scaling, init=setting.init,
                        eval_every=1 if cap <= 1000 else 5, device=device,
                        target=setting.target, stop_at_target=True)


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
        "diverged": not math.isfinite(history.records[-1].train_loss),
        "rounds_run": len(history.records), "best_accuracy": history.best_accuracy,
        "wall_seconds": round(history.seconds, 2), "device": history.device, "versions": history.versions,
        "command": command_for(setting, lr, seed, cap), "together": together,
        "history": history.to_dict(),
    }
    atomic_write_text(result_path(setting, lr, seed, out_dir), json.dumps(result, indent=1))
    checkpoint_path(setting, lr, seed, out_dir).unlink(missing_ok=True)
    return result


def check_scaling(setting: Setting, data: Dataset) -> None:
    if data.scaling != setting.input_scaling:
        raise InputError(f"{setting.name} needs data scaled {setting.input_scaling!r}, got {data.scaling!r}")


def run_setting(setting: Setting, lr: float, seed: int, out_dir: Path, data: Dataset, device: str = "auto",
                max_rounds: int | None = None, progress: bool = True) -> dict:
    """Run one (setting, eta, seed) to its target or cap and save the result; reuse a saved one."""
    out_dir = Path(out_dir)
    check_scaling(setting, data)
    cap = round_cap_of(setting, max_rounds)
    saved = saved_result(setting, lr, seed, cap, out_dir)
    if saved is not None:
        return saved
    history = run(config_of(setting, lr, seed, cap, device), data, progress=progress,
                  checkpoint=checkpoint_path(setting, lr, seed, out_dir), checkpoint_every=CHECKPOINT_EVERY)
    return save_result(setting, lr, seed, cap, history, out_dir)


Job = tuple[Setting, float, int]          # (setting, eta, seed): one run of a sweep


def sweep(settings: Sequence[Setting], out_dir: str | Path, lrs: Sequence[float] | None = None,
          seeds: Sequence[int] | None = (0,), device: str = "auto", max_rounds: int | None = None,
          data: Dataset | None = None, progress: bool = True, together: bool | None = None) -> list[dict]:
    """Run every setting x learning rate x seed not yet saved under ``out_dir``; returns
    every run's result (saved ones included), in that order.

    lrs: None for each setting's grid; seeds: None for each setting's planned seeds.
    data: MNIST as the settings need it scaled (default: loaded once per scaling).
    together: train the runs that share a model and the shape of every step (C, E, B,
    input scaling) as one batch (``fedlib.engine.sweep.run_many``), which gives each run
    the same clients and, up to float rounding, the same weights as training it alone;
    None: on a CUDA device only. False: one run after another.
    """
    jobs = [(s, lr, seed) for s in settings for lr in (lrs or s.learning_rates()) for seed in (seeds or s.seeds())]
    loaded = {data.scaling: data} if data is not None else {}

    def data_for(setting: Setting) -> Dataset:
        if setting.input_scaling not in loaded:
            loaded[setting.input_scaling] = load_dataset("mnist", scaling=setting.input_scaling)
        return loaded[setting.input_scaling]

    if together is None:
        together = get_device(device).type == "cuda"
    if together:
        return _sweep_together(jobs, Path(out_dir), data_for, device, max_rounds, progress)
    results = []
    overall = tqdm(jobs, desc="reproduce", unit="run", disable=not progress, position=0)
    for setting, lr, seed in overall:
        overall.set_postfix_str(run_id(setting, lr, seed))
        results.append(run_setting(setting, lr, seed, Path(out_dir), data_for(setting), device,
                                   max_rounds, progress))
    return results


def group_key(config: FedAvgConfig) -> tuple:
    """What the runs trained together must share: every field of the config but those that
    ``run_many`` lets differ (``MAY_DIFFER``: eta, seed, partition, rounds, target, init, ...),
    so the model, C, E, B and the input scaling among others."""
    return tuple((k, v) for k, v in asdict(config).items() if k not in MAY_DIFFER)


def groups(configs: dict[int, FedAvgConfig]) -> list[list[int]]:
    """The keys of ``configs`` (positions of runs) grouped by :func:`group_key`, in order of appearance."""
    found: dict[tuple, list[int]] = {}
    for i, config in configs.items():
        found.setdefault(group_key(config), []).append(i)
    return list(found.values())


def _sweep_together(jobs: Sequence[Job], out_dir: Path, data_for, device: str, max_rounds: int | None,
                    progress: bool) -> list[dict]:
    """:func:`sweep` with the pending runs of each group trained as one (``run_many``)."""
    caps = [round_cap_of(s, max_rounds) for s, _, _ in jobs]
    results = [saved_result(s, lr, seed, cap, out_dir) for (s, lr, seed), cap in zip(jobs, caps)]
    configs = {i: config_of(*jobs[i], caps[i], device) for i, r in enumerate(results) if r is None}
    overall = tqdm(groups(configs), desc="reproduce", unit="group", disable=not progress, position=0)
    for group in overall:
        overall.set_postfix_str(f"{run_id(*jobs[group[0]])} and {len(group) - 1} more")
        trained = train_group([jobs[i] for i in group], [configs[i] for i in group], out_dir,
                              data_for(jobs[group[0]][0]), device, max_rounds, progress)
        for i, result in zip(group, trained):
            results[i] = result
    return results


def train_group(group: Sequence[Job], configs: Sequence[FedAvgConfig], out_dir: Path, data: Dataset,
                device: str, max_rounds: int | None, progress: bool) -> list[dict]:
    """Train the runs of one group together, each with its checkpoint, and save each result;
    one at a time where ``run_many`` cannot batch them (``sweep_reason`` says why)."""
    for setting, _, _ in group:
        check_scaling(setting, data)
    if sweep_reason(configs) is not None:
        return [run_setting(s, lr, seed, out_dir, data, device, max_rounds, progress) for s, lr, seed in group]
    histories = run_many(configs, data, progress=progress, checkpoint_every=CHECKPOINT_EVERY,
                         checkpoints=[checkpoint_path(s, lr, seed, out_dir) for s, lr, seed in group])
    return [save_result(s, lr, seed, config.rounds, history, out_dir, together=len(group))
            for (s, lr, seed), config, history in zip(group, configs, histories)]


# What a result file holds, with the type of each value (None allowed where a tuple says so).
# "diverged" is missing from the files written before the runner stopped diverged runs, and
# "together" (how many runs were trained as one batch with it) from those written before sweeps batched runs.
RESULT_FIELDS = {"setting": dict, "lr": (int, float), "seed": int, "round_cap": int,
                 "rounds_to_target": (int, float, type(None)), "reached": bool, "diverged": (bool, type(None)),
                 "rounds_run": int, "best_accuracy": (int, float, type(None)), "wall_seconds": (int, float),
                 "device": str, "versions": dict, "command": str, "together": (int, type(None)), "history": dict}


def load_result(path: str | Path) -> dict:
    """One saved run; InputError names a file that is not a result of this runner."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not a reproduction result ({error}); delete it to run it again") from None
    wrong = [k for k, kind in RESULT_FIELDS.items() if not isinstance(data, dict) or not isinstance(data.get(k), kind)]
    if not wrong and not isinstance(data["setting"].get("name"), str):
        wrong = ["setting.name"]
    if wrong:
        raise InputError(f"{path} is not a reproduction result (missing or wrong: {', '.join(wrong)}); "
                         "delete it to run it again")
    try:
        History.from_dict(data["history"])
    except InputError as error:
        raise InputError(f"{path} is not a reproduction result ({error}); delete it to run it again") from None
    return data


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


def best_per_setting(results: Iterable[dict]) -> dict[tuple[str, int], dict]:
    """For each (setting name, seed): the run with the fewest rounds to target over the
    learning-rate grid (the paper's choice); a reached run beats an unreached one, which
    beats a diverged one."""
    def score(r: dict) -> tuple[int, float]:
        if r["reached"]:
            return (0, r["rounds_to_target"])
        return (2, 0.0) if r.get("diverged") else (1, 0.0)

    best: dict[tuple[str, int], dict] = {}
    for r in results:
        key = (r["setting"]["name"], r["seed"])
        if key not in best or score(r) < score(best[key]):
            best[key] = r
    return best


def comparison_rows(table: str, out_dir: str | Path, seed: int = 0) -> list[dict]:
    """One row per setting of the table (or of the ablation): the paper's rounds, ours
    (best eta), their ratio.

    A setting with no saved run shows ``ours = "not yet run"``; one whose runs all
    stopped at the cap shows ``"not reached"`` (and the cap). ``etas`` says how much of
    the setting's learning-rate grid has been run (``"2/3"``: the best may still move).
    """
    results = [r for r in load_results(out_dir) if r["seed"] == seed]
    best = best_per_setting(results)
    rows = []
    for s in settings_of(table):
        r = best.get((s.name, seed))
        tried = {x["lr"] for x in results if x["setting"]["name"] == s.name}
        row = {"setting": s.name, "variant": s.variant, "model": s.model, "partition": s.partition, "C": s.frac,
               "E": s.local_epochs, "B": "inf" if s.batch_size is None else s.batch_size,
               "u": s.updates_per_round, "paper": s.paper_rounds,
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
