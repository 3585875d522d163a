"""How long do a paper table's runs take when the runs of each setting train as one?

    FEDLIB_DATA=/path/to/data python benchmarks/sweep_bench.py --table 2 --model cnn --device cuda
    FEDLIB_DATA=/path/to/data python benchmarks/sweep_bench.py --table 1 --model 2nn --only 2nn-iid-C0.1-E1-B10

For every setting of the table (``fedlib.reproduce``), the runs the reproduction makes
of it (its learning-rate grid, IID and non-IID, seed 0: 6 runs for Table 2's CNN) are
trained together with ``fedlib.run_many`` (in lockstep) for ``--rounds`` rounds, and one
of them alone with ``fedlib.run`` (vectorized engine), both evaluating every round as
the reproduction does. Printed per setting: the seconds of a round of all runs
together (median over the rounds after the first two, which include warm-up and, on a
GPU, graph capture), of a round of one run alone, the peak GPU memory of the batched
runs, and what the whole setting would take at the paper's rounds to target (the
IID and non-IID runs each run the paper's rounds for their partition; a run stops when
it reaches the target) and at the reproduction's round caps (twice the paper's).

The time of a whole setting is estimated from these measured round times: batched,
R_iid rounds of all runs, then R_noniid - R_iid rounds of the non-IID runs alone (their
round time measured too, with ``--rounds`` rounds of them); one after another, every
run's rounds at the single-run round time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import fedlib
from fedlib import FedAvgConfig, load_dataset, run, run_many
from fedlib.reproduce import NUM_CLIENTS, select, settings_of

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_bench import load, machine  # noqa: E402


def configs_of(setting, partition: str, rounds: int, device: str) -> list[FedAvgConfig]:
    return [FedAvgConfig(model=setting.model, partition=partition, num_clients=NUM_CLIENTS, frac=setting.frac,
                         local_epochs=setting.local_epochs, batch_size=setting.batch_size, lr=lr, seed=0,
                         rounds=rounds, device=device, input_scaling=setting.input_scaling, init=setting.init)
            for lr in setting.learning_rates()]


def round_seconds(histories: list) -> list[float]:
    """The wall time of each batched round: the last record of that round ends it."""
    return [max(h.records[t].seconds for h in histories) for t in range(len(histories[0].records))]


def median_after_warmup(seconds: list[float]) -> float:
    return statistics.median(seconds[2:] if len(seconds) > 2 else seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default="2", choices=("1", "2"))
    parser.add_argument("--model", default="cnn", choices=("2nn", "cnn"))
    parser.add_argument("--only", nargs="*", default=None, help="setting names (default: every setting of the model)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds timed per setting (default 5; 2 are warm-up)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    threads = fedlib.set_threads()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = fedlib.get_device(args.device)
    data = load_dataset("mnist", download=False).to(device)
    both = select(settings_of(args.table), model=args.model, names=args.only)
    names = list(dict.fromkeys(s.name.replace("-shards-", "-iid-") for s in both))

    print(f"# Batched sweep benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {machine()}; device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {threads} thread(s)"))
    print(f"torch {torch.__version__}, fedlib {fedlib.__version__}, python {platform.python_version()}; "
          f"Table {args.table}, {args.model}, {args.rounds} rounds per measurement")
    print(f"load average at start (1, 5, 15 min): {load()}\n")
    print("| setting | runs | s / round, all runs | s / round, non-IID runs | s / round, one run | peak GPU memory "
          "| paper rounds IID / non-IID | at the paper's rounds: batched / one after another | at the caps: "
          "batched / one after another |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = {"paper": [0.0, 0.0], "caps": [0.0, 0.0]}
    for name in names:
        iid = next(s for s in both if s.name == name)
        noniid = next(s for s in both if s.name == name.replace("-iid-", "-shards-"))
        configs = configs_of(iid, "iid", args.rounds, args.device) + configs_of(noniid, "shards", args.rounds,
                                                                                args.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_all = median_after_warmup(round_seconds(run_many(configs, data, progress=False)))
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "-"
        t_noniid = median_after_warmup(round_seconds(run_many(configs[len(configs) // 2:], data, progress=False)))
        alone = run(FedAvgConfig(**vars(configs[0]) | dict(engine="vectorized")), data, progress=False)
        t_one = median_after_warmup([r.seconds for r in alone.records])
        row = []
        for key, (r_iid, r_noniid) in {"paper": (iid.paper_rounds, noniid.paper_rounds),
                                       "caps": (iid.round_cap, noniid.round_cap)}.items():
            r_iid, r_noniid = r_iid or iid.round_cap, r_noniid or noniid.round_cap
            batched = min(r_iid, r_noniid) * t_all + abs(r_noniid - r_iid) * t_noniid
            sequential = len(configs) // 2 * (r_iid + r_noniid) * t_one
            total[key][0] += batched
            total[key][1] += sequential
            row.append(f"{batched / 60:.1f} / {sequential / 60:.1f} min")
        print(f"| {name.replace('-iid-', '-')} | {len(configs)} | {t_all:.3f} | {t_noniid:.3f} | {t_one:.3f} | "
              f"{memory} | {iid.paper_rounds} / {noniid.paper_rounds} | {row[0]} | {row[1]} |", flush=True)
    print(f"\nall settings above: at the paper's rounds {total['paper'][0] / 60:.1f} min batched, "
          f"{total['paper'][1] / 60:.1f} min one run after another; at the caps {total['caps'][0] / 60:.1f} / "
          f"{total['caps'][1] / 60:.1f} min")
    print(f"load average at end (1, 5, 15 min): {load()}")


if __name__ == "__main__":
    main()
