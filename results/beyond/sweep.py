"""The comparison behind lesson 8: FedAvg and three remedies for client drift, each tuned.

Five methods train the paper's 2NN on pathological non-IID MNIST (K = 100 clients of two
shards each, C = 0.1, E = 5, B = 50, so u = 60 local steps per round), each until the
global model first reaches TARGET test accuracy or for ROUNDS rounds:

- FedAvg (McMahan et al. 2017), tuned over the clients' learning rate eta;
- SCAFFOLD, option II (Karimireddy et al. 2020), tuned over eta;
- FedProx (Li et al. 2020), tuned over mu at FedAvg's best eta;
- FedAvgM (Hsu et al. 2019), tuned over the server's rate and momentum at FedAvg's best eta;
- FedAdam (Reddi et al. 2021), tuned over the server's rate at FedAvg's best eta.

Every grid point runs with the seeds in SEEDS; a method's best point is the one with the
fewest mean rounds to TARGET over those seeds (see ``best``). The best point of each method
then runs again with the fresh seeds in FRESH_SEEDS, which played no part in choosing it.

Each run is saved by ``History.save`` as ``results/beyond/<name>.json``: the file holds the
run's whole configuration (``config``), the versions, the device and every round's record, so
it says exactly how it was made. The sweep is resumable: a run whose file exists is skipped,
and a run that was interrupted resumes from its checkpoint in ``.checkpoints/``.

Run it from the repository root, on one thread at the lowest priority (the committed 56 runs
took about an hour of training in all, on a shared 2-core machine)::

    FEDLIB_THREADS=1 nohup nice -n 19 .venv/bin/python results/beyond/sweep.py > beyond.log 2>&1 &
    .venv/bin/python results/beyond/sweep.py --list      # the plan: each run, done or missing
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import fedlib
from fedlib.metrics import History, rounds_to_target

HERE = Path(__file__).resolve().parent
TARGET = 0.95
ROUNDS = 150                 # the cap: a run that has not reached TARGET by then stops
SEEDS = (0, 1)               # the seeds every grid point runs with (tuning)
FRESH_SEEDS = (2, 3)         # the seeds each method's best point runs with afterwards
SETTING = dict(dataset="mnist", model="2nn", partition="shards", num_clients=100, frac=0.1,
               local_epochs=5, batch_size=50, rounds=ROUNDS, target=TARGET, stop_at_target=True,
               eval_every=1, device="cpu", engine="vectorized")

# Each method's grid: the overrides of SETTING it tries. "eta*" stands for FedAvg's best eta.
# A grid brackets its best point: when the best was at an edge, the grid was extended past it
# (SCAFFOLD diverged at FedAvg's eta = 0.2, so its grid goes down to 0.025; FedAvgM was best at
# eta_g = 1 with beta = 0.5, so its grid goes up to eta_g = 2).
ETAS = (0.1, 0.2, 0.4)
GRID = {
    "fedavg": [dict(lr=eta) for eta in ETAS],
    "scaffold": [dict(lr=eta, scaffold=True) for eta in (0.025, 0.05) + ETAS],
    "fedprox": [dict(lr="eta*", mu=mu) for mu in (0.01, 0.1, 1.0)],
    "fedavgm": [dict(lr="eta*", server_lr=g, server_momentum=beta) for beta in (0.5, 0.9)
                for g in (0.1, 0.3, 1.0, 2.0)],
    "fedadam": [dict(lr="eta*", server_opt="adam", server_lr=g, server_momentum=0.9) for g in (0.001, 0.003, 0.01, 0.03)],
}
# What each method's name in a file and in the lesson shows of its overrides.
SHOWN = {"lr": "lr", "mu": "mu", "server_lr": "slr", "server_momentum": "mom"}


def name(method: str, overrides: dict, seed: int) -> str:
    """The run's file name without .json, e.g. ``fedavgm-lr0.1-slr0.3-mom0.9-seed0``."""
    shown = [f"{SHOWN[k]}{v:g}" for k, v in overrides.items() if k in SHOWN
             and not (method == "fedadam" and k == "server_momentum")]
    return "-".join([method, *shown, f"seed{seed}"])


def load(method: str, overrides: dict, seed: int) -> History | None:
    path = HERE / f"{name(method, overrides, seed)}.json"
    return History.load(path) if path.exists() else None


def score(histories: list[History | None]) -> tuple[int, float]:
    """How good a grid point is over its seeds (smaller is better): first how many seeds
    missed TARGET (or are not run yet), then the mean rounds to TARGET of those that reached it."""
    reached = [rounds_to_target(h, TARGET) for h in histories if h is not None]
    reached = [r for r in reached if r is not None]
    return len(histories) - len(reached), (sum(reached) / len(reached) if reached else math.inf)


def best(method: str, fedavg_eta: float | None) -> dict | None:
    """The method's best grid point over SEEDS (None until all of its SEEDS runs exist)."""
    points = grid(method, fedavg_eta)
    if points is None:
        return None
    runs = [[load(method, p, s) for s in SEEDS] for p in points]
    if any(h is None for point in runs for h in point):
        return None
    return min(zip(points, runs), key=lambda pair: score(pair[1]))[0]


def grid(method: str, fedavg_eta: float | None) -> list[dict] | None:
    """The method's grid with eta* filled in (None while FedAvg's best eta is unknown)."""
    if any(p["lr"] == "eta*" for p in GRID[method]) and fedavg_eta is None:
        return None
    return [{**p, "lr": fedavg_eta if p["lr"] == "eta*" else p["lr"]} for p in GRID[method]]


def plan() -> list[tuple[str, dict, int]]:
    """Every run the sweep needs that can be named now, in the order they run: the cheap
    methods first (FedAvg, FedAvgM, FedAdam), then SCAFFOLD and FedProx (each step adds a term
    to every gradient, which costs the vectorised 2NN step its fast path), then the fresh seeds."""
    fedavg = best("fedavg", None)
    eta = fedavg["lr"] if fedavg else None
    jobs = [(m, p, s) for m in ("fedavg", "fedavgm", "fedadam", "scaffold", "fedprox")
            for p in (grid(m, eta) or []) for s in SEEDS]
    for method in GRID:
        chosen = best(method, eta)
        jobs += [(method, chosen, s) for s in FRESH_SEEDS] if chosen else []
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the plan and what is done; run nothing")
    args = parser.parse_args(argv)
    fedlib.set_threads()         # FEDLIB_THREADS, default 1
    data = None
    while True:
        jobs = plan()
        missing = [job for job in jobs if load(*job) is None]
        if args.list:
            for job in jobs:
                print(f"{'done   ' if load(*job) else 'missing'} {name(*job)}")
            later = " (more are planned once FedAvg's and each method's best point are known)" if missing else ""
            print(f"{len(jobs) - len(missing)} of {len(jobs)} runs done{later}")
            return 0
        if not missing:
            return 0
        method, overrides, seed = missing[0]
        data = data or fedlib.load_dataset("mnist", device="cpu")
        config = fedlib.FedAvgConfig(**{**SETTING, **overrides, "seed": seed})
        run_name = name(method, overrides, seed)
        history = fedlib.run(config, data, progress=False, checkpoint=HERE / ".checkpoints" / f"{run_name}.ckpt")
        history.save(HERE / f"{run_name}.json")
        (HERE / ".checkpoints" / f"{run_name}.ckpt").unlink(missing_ok=True)
        reached = rounds_to_target(history, TARGET)
        print(f"{run_name}: {len(history.records)} rounds, {history.seconds:.0f} s, rounds to {TARGET:.0%}: "
              f"{'not reached' if reached is None else f'{reached:.1f}'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
