"""Where does a training step's time go? One round of 10 clients under ``torch.profiler``.

    FEDLIB_DATA=/path/to/data python benchmarks/profile_step.py [--model cnn-small] [--engine vectorized]
        [--clients 10] [--examples 200]

Runs a round of ``--clients`` clients with ``--examples`` examples each (E = 1, B = 10,
eta 0.05, 1 thread) once to warm up, then once under the profiler, and prints the
operators by their own CPU time, and the CPU seconds per step measured without the
profiler. The profiler reads wall-clock time, so run it on a quiet machine, or read
its table for proportions only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fedlib
from fedlib import FedAvgConfig, load_dataset
from fedlib.backends import make_backend
from fedlib.server import initial_model, rounds
from fedlib.strategies import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_bench import load, machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--engine", default="vectorized", choices=("vectorized", "sequential"))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    fedlib.set_threads()
    data = load_dataset("mnist", download=False)
    config = FedAvgConfig(model=args.model, num_clients=args.clients, frac=1.0, local_epochs=1, batch_size=10,
                          lr=0.05, engine=args.engine, device="cpu").validate()
    clients = [torch.arange(args.examples * k, args.examples * (k + 1)) for k in range(args.clients)]
    model = initial_model(config)
    w_t = {k: v.clone() for k, v in model.state_dict().items()}
    backend = make_backend(args.engine, model, data, clients, config)
    steps = args.examples // 10

    def one_round():                                      # round 1 of Algorithm 1, C = 1: every client
        return next(rounds(w_t, backend, build(config, w_t), config.num_clients, config.frac, 1)).weights
    one_round()
    began = time.process_time()
    one_round()
    per_step = (time.process_time() - began) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_round()
    print(f"# {args.model}, {args.engine} engine: {args.clients} clients x {args.examples} examples, E=1, B=10 "
          f"({steps} steps), {torch.get_num_threads()} thread(s)")
    print(f"machine: {machine()}; torch {torch.__version__}; load average {load()}")
    print(f"CPU time per step (all {args.clients} clients), without the profiler: {per_step * 1e3:.2f} ms\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
