"""Reproducing the paper's MNIST tables with this library's own runs.

The published numbers live in ``fedlib/paper_mnist.json`` (with the citation).
Every cell of a table is a :class:`Setting` (model, partition, C, E, B, target).
Like the paper, each setting is run over a small learning-rate grid and the best
rate is reported. Each run stops as soon as it reaches the target, or at a round
cap of twice the paper's rounds (for the paper's "--" cells, twice the largest
number of its column), and is written to its own JSON file: a sweep that is
interrupted resumes where it stopped, and a finished run is never redone.
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
from fedlib.files import atomic_write_text
from fedlib.metrics import History, rounds_to_target
from fedlib.params import InputError
from fedlib.server import run

NUM_CLIENTS = 100
EXAMPLES_PER_CLIENT = 600

# The learning rates each setting is tried with, by (model, B). The paper tuned
# eta per setting over a grid too, but does not list its grid.
LR_GRID: dict[tuple[str, int | None], tuple[float, ...]] = {
    ("2nn", 10): (0.05, 0.1, 0.2),
    ("2nn", None): (0.1, 0.3, 1.0),
    ("cnn", 10): (0.02, 0.05, 0.1),
    ("cnn", 50): (0.05, 0.1, 0.2),
    ("cnn", None): (0.1, 0.2, 0.5),
}


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

    @property
    def name(self) -> str:
        """The configuration, without the table: a cell that two tables share is run once."""
        b = "inf" if self.batch_size is None else self.batch_size
        return f"{self.model}-{self.partition}-C{self.frac:g}-E{self.local_epochs}-B{b}"

    @property
    def updates_per_round(self) -> float:
        """u = E n_k / B: local SGD steps per client per round (n_k = 600)."""
        steps = 1 if self.batch_size is None else math.ceil(EXAMPLES_PER_CLIENT / self.batch_size)
        return self.local_epochs * steps

    def learning_rates(self) -> tuple[float, ...]:
        return LR_GRID[(self.model, self.batch_size)]


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


def select(settings: Sequence[Setting], model: str | None = None, partition: str | None = None,
           names: Sequence[str] | None = None) -> list[Setting]:
    """The settings matching every filter given; unknown names raise InputError."""
    if names:
        known = {s.name for s in settings}
        unknown = sorted(set(names) - known)
        if unknown:
            raise InputError(f"names must be settings of this table, got unknown {unknown}; "
                             f"see 'python -m fedlib reproduce --table N --list'")
    return [s for s in settings if (model is None or s.model == model)
            and (partition is None or s.partition == partition) and (not names or s.name in names)]


def run_id(setting: Setting, lr: float, seed: int) -> str:
    return f"{setting.name}-lr{lr:g}-seed{seed}"


def command_for(setting: Setting, lr: float, seed: int, round_cap: int | None = None) -> str:
    """The command line that produces exactly this run's result file (with ``--max-rounds``
    where the run had a lower cap than the setting's)."""
    command = (f"python -m fedlib reproduce --table {setting.table} --only {setting.name} "
               f"--lr {lr:g} --seeds {seed}")
    if round_cap is not None and round_cap < setting.round_cap:
        command += f" --max-rounds {round_cap}"
    return command


def run_setting(setting: Setting, lr: float, seed: int, out_dir: Path, data: Dataset, device: str = "auto",
                max_rounds: int | None = None, progress: bool = True) -> dict:
    """Run one (setting, eta, seed) to its target or cap and save the result; reuse a saved one."""
    out_dir = Path(out_dir)
    path = out_dir / f"{run_id(setting, lr, seed)}.json"
    cap = min(setting.round_cap, max_rounds) if max_rounds else setting.round_cap
    if path.exists():
        saved = load_result(path)
        if saved["reached"] or saved["round_cap"] >= cap:   # a run stopped at a lower cap runs again
            return saved
    config = FedAvgConfig(dataset="mnist", model=setting.model, partition=setting.partition,
                          num_clients=NUM_CLIENTS, frac=setting.frac, local_epochs=setting.local_epochs,
                          batch_size=setting.batch_size, lr=lr, rounds=cap, seed=seed,
                          eval_every=1 if cap <= 1000 else 5, device=device,
                          target=setting.target, stop_at_target=True)
    checkpoint = out_dir / ".checkpoints" / f"{run_id(setting, lr, seed)}.ckpt"
    history = run(config, data, progress=progress, checkpoint=checkpoint, checkpoint_every=25)
    needed = rounds_to_target(history, setting.target)
    result = {
        "setting": asdict(setting) | {"name": setting.name},
        "lr": lr, "seed": seed, "round_cap": cap,
        "rounds_to_target": needed, "reached": needed is not None,
        "diverged": not math.isfinite(history.records[-1].train_loss),
        "rounds_run": len(history.records), "best_accuracy": history.best_accuracy,
        "wall_seconds": round(history.seconds, 2), "device": history.device, "versions": history.versions,
        "command": command_for(setting, lr, seed, cap),
        "history": history.to_dict(),
    }
    atomic_write_text(path, json.dumps(result, indent=1))
    checkpoint.unlink(missing_ok=True)
    return result


def sweep(settings: Sequence[Setting], out_dir: str | Path, lrs: Sequence[float] | None = None,
          seeds: Sequence[int] = (0,), device: str = "auto", max_rounds: int | None = None,
          data: Dataset | None = None, progress: bool = True) -> list[dict]:
    """Run every setting x learning rate x seed not yet saved under ``out_dir``."""
    jobs = [(s, lr, seed) for s in settings for lr in (lrs or s.learning_rates()) for seed in seeds]
    data = data or load_dataset("mnist")
    results = []
    overall = tqdm(jobs, desc="reproduce", unit="run", disable=not progress, position=0)
    for setting, lr, seed in overall:
        overall.set_postfix_str(run_id(setting, lr, seed))
        results.append(run_setting(setting, lr, seed, Path(out_dir), data, device, max_rounds, progress))
    return results


# What a result file holds, with the type of each value (None allowed where a tuple says so).
# "diverged" is missing from the files written before the runner stopped diverged runs.
RESULT_FIELDS = {"setting": dict, "lr": (int, float), "seed": int, "round_cap": int,
                 "rounds_to_target": (int, float, type(None)), "reached": bool, "diverged": (bool, type(None)),
                 "rounds_run": int, "best_accuracy": (int, float, type(None)), "wall_seconds": (int, float),
                 "device": str, "versions": dict, "command": str, "history": dict}


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
    """One row per setting of the table: the paper's rounds, ours (best eta), their ratio.

    A setting with no saved run shows ``ours = "not yet run"``; one whose runs all
    stopped at the cap shows ``"not reached"`` (and the cap). ``etas`` says how much of
    the setting's learning-rate grid has been run (``"2/3"``: the best may still move).
    """
    results = [r for r in load_results(out_dir) if r["seed"] == seed]
    best = best_per_setting(results)
    rows = []
    for s in paper_settings(table):
        r = best.get((s.name, seed))
        tried = {x["lr"] for x in results if x["setting"]["name"] == s.name}
        row = {"setting": s.name, "model": s.model, "partition": s.partition, "C": s.frac,
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
