"""How fast is a FedAvg round of the paper's character LSTM on Shakespeare? Both engines.

    python benchmarks/lstm_bench.py [--device cpu|cuda] [--rounds N] [--sizes quick,paper]
        [--epochs 1,5] [--fedsgd] [--engines sequential,vectorized] [--skip SIZE:E:ENGINE ...]

Real FedAvg rounds on the natural split (one client per speaking role, all 37 plays of the
package ``shakespeare`` 0.6: ``fedlib.shakespeare``), C = 0.1, B = 10, E from ``--epochs``,
for the ``quick`` model (``lstm-small``, 2 LSTM layers of 64) and the ``paper`` model
(``lstm``, 2 layers of 256), and with ``--fedsgd`` also FedSGD (E = 1, B = infinity).
Round t samples the same clients for every engine, so the engines train the same work; they
run interleaved (round 1 of each engine, then round 2 of each, ...) after a warm-up round of
two clients each. The clients' sizes are long-tailed, so rounds differ in work: each row
lists every round with its seconds and the sequences it trained (E x sum of n_k), and gives
GFLOP/s from an analytic count: per position of a sequence, the forward pass is
2 x 4 hidden x (in + hidden) per LSTM layer plus 2 x hidden x V for the softmax layer
(the embedding is a lookup), and training about 3 times the forward pass; every position of
every sequence counts, the padding of a client's last sequence too (it is computed).

The header names the machine, the thread count, the versions and the load average; the
float32 matmul peak is measured in the same run (``engine_bench.matmul_peak``). Then the
evaluation of each model on the whole test set.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import fedlib
from fedlib import FedAvgConfig, build_model, evaluate
from fedlib import shakespeare
from fedlib.seeds import sampling_rng
from fedlib.backends import make_backend
from fedlib.server import sample_clients
from fedlib.strategies import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_bench import load, machine, matmul_peak, synchronize  # noqa: E402  (benchmarks/engine_bench.py)

MODELS = {"quick": "lstm-small", "paper": "lstm"}


@dataclass(frozen=True)
class Setting:
    size: str                     # quick or paper
    local_epochs: int
    batch_size: int | None
    frac: float = 0.1
    lr: float = 1.0               # the time of a round does not depend on it

    @property
    def label(self) -> str:
        b = "inf" if self.batch_size is None else self.batch_size
        return f"{self.size} ({MODELS[self.size]}) E={self.local_epochs} B={b} C={self.frac}"


def forward_flops_per_position(model_name: str, vocab: int) -> int:
    """2 x multiply-adds of one position's forward pass (see the module docstring)."""
    model = build_model(model_name, vocab)
    hidden, layers, embedding = model.lstm.hidden_size, model.lstm.num_layers, model.embed.embedding_dim
    lstm = sum(2 * 4 * hidden * ((embedding if layer == 0 else hidden) + hidden) for layer in range(layers))
    return lstm + 2 * hidden * vocab


class Rounds:
    """FedAvg rounds of one engine on one setting; ``round(t)`` trains round t (its sampled
    clients) from the same w_0 every time and returns (wall s, CPU s, sequences trained)."""

    def __init__(self, setting: Setting, engine: str, data, device: torch.device):
        self.config = FedAvgConfig(dataset="shakespeare", model=MODELS[setting.size], partition="natural",
                                   num_clients=len(data.clients), frac=setting.frac,
                                   local_epochs=setting.local_epochs, batch_size=setting.batch_size,
                                   lr=setting.lr, seed=0, engine=engine).validate()
        self.engine, self.data, self.device = engine, data, device
        torch.manual_seed(0)
        self.model = build_model(self.config.model, data.num_classes).to(device)
        self.w_0 = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.client_indices = [torch.as_tensor(c, device=device) for c in data.clients]

    def selected(self, t: int):
        return sample_clients(self.config.num_clients, self.config.frac, sampling_rng(self.config.seed, t))

    def sequences(self, selected) -> int:
        return self.config.local_epochs * sum(len(self.client_indices[k]) for k in selected)

    def round(self, t: int, selected=None) -> tuple[float, float, int]:
        selected = self.selected(t) if selected is None else selected
        synchronize(self.device)
        began, cpu_began = time.perf_counter(), time.process_time()
        backend = make_backend(self.engine, self.model, self.data, self.client_indices, self.config)
        strategy = build(self.config, self.w_0)            # one round: ClientUpdate for S_t, then the average
        strategy.aggregate(self.w_0, backend.update(self.w_0, selected, t, strategy), t)
        synchronize(self.device)
        return time.perf_counter() - began, time.process_time() - cpu_began, self.sequences(selected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per row (default 3)")
    parser.add_argument("--sizes", default="quick,paper", help="quick (lstm-small), paper (lstm)")
    parser.add_argument("--epochs", default="1,5", help="E of the FedAvg rows (B = 10)")
    parser.add_argument("--fedsgd", action="store_true", help="also FedSGD rows (E = 1, B = infinity)")
    parser.add_argument("--engines", default="sequential,vectorized")
    parser.add_argument("--skip", nargs="*", default=[], metavar="SIZE:E:ENGINE",
                        help="rows not to time, e.g. paper:5:vectorized (B = inf rows: SIZE:inf:ENGINE)")
    parser.add_argument("--rounds-for", nargs="*", default=[], metavar="SIZE:E:N",
                        help="another number of timed rounds for a row, e.g. paper:5:1")
    args = parser.parse_args()
    if args.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {args.rounds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    fedlib.set_threads()                     # 1, or FEDLIB_THREADS
    engines = args.engines.split(",")
    settings = [Setting(size, int(e), 10) for size in args.sizes.split(",") for e in args.epochs.split(",")]
    if args.fedsgd:
        settings += [Setting(size, 1, None) for size in args.sizes.split(",")]
    rounds_for = {tuple(r.split(":")[:2]): int(r.split(":")[2]) for r in args.rounds_for}

    data = shakespeare.load(device=device)
    threads = torch.get_num_threads()
    peak, peak_cpu = matmul_peak(device)
    print(f"# Character LSTM benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {machine()}; device {device.type}, torch threads {threads}")
    print(f"torch {torch.__version__}, fedlib {fedlib.__version__}, python {platform.python_version()}; data: "
          f"Shakespeare, natural split, K={len(data.clients)} roles, {len(data.x_train)} training sequences of 80")
    print(f"measured float32 matmul peak {peak:.1f} GFLOP/s by wall time, {peak_cpu:.1f} by CPU time")
    print(f"load average at start (1, 5, 15 min): {load()}\n")
    print("| configuration | engine | s / round (median) | rounds: s (sequences) | CPU s / round | GFLOP/s "
          "| of peak | GFLOP/s by CPU time | vs sequential | load (1 min) |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for setting in settings:
        per_position = 3 * forward_flops_per_position(MODELS[setting.size], data.num_classes)
        key = (setting.size, str(setting.local_epochs) if setting.batch_size else "inf")
        runners = {e: Rounds(setting, e, data, device) for e in engines if f"{key[0]}:{key[1]}:{e}" not in args.skip}
        for runner in runners.values():                                   # warm-up: two clients
            runner.round(0, runner.selected(0)[:2])
        times = {e: [] for e in runners}
        for t in range(1, rounds_for.get(key, args.rounds) + 1):
            for engine, runner in runners.items():
                times[engine].append(runner.round(t))
        medians = {e: statistics.median(w for w, _, _ in rows) for e, rows in times.items()}
        for engine, rows in times.items():
            wall, cpu = medians[engine], statistics.median(c for _, c, _ in rows)
            work = statistics.median(per_position * 80 * s / 1e9 / w for w, _, s in rows)      # GFLOP/s
            work_cpu = statistics.median(per_position * 80 * s / 1e9 / c for _, c, s in rows)
            listed = " ".join(f"{w:.2f} ({s})" for w, _, s in rows)
            vs = f"{medians['sequential'] / wall:.2f}x" if engine != "sequential" and "sequential" in medians else ""
            print(f"| {setting.label} | {engine} | {wall:.3f} | {listed} | {cpu:.3f} | {work:.1f} | "
                  f"{work / peak:.0%} | {work_cpu:.1f} | {vs} | {os.getloadavg()[0]:.2f} |", flush=True)
    for size, name in MODELS.items():
        if size not in args.sizes.split(","):
            continue
        torch.manual_seed(0)
        model = build_model(name, data.num_classes).to(device)
        evaluate(model, data.x_test[:200], data.y_test[:200])
        synchronize(device)
        began = time.perf_counter()
        evaluate(model, data.x_test, data.y_test, batch_size=500)
        synchronize(device)
        print(f"\nevaluation of {name} on the whole test set ({len(data.x_test)} sequences, batches of 500, "
              f"no autograd): {time.perf_counter() - began:.2f} s", end="")
    print(f"\n\nload average at end (1, 5, 15 min): {load()}")


if __name__ == "__main__":
    main()
