"""How fast is a FedAvg round? fedlib's two engines and the code this book replaces, side by side.

    FEDLIB_DATA=/path/to/data python benchmarks/engine_bench.py [--device cpu|cuda|all]
        [--rounds N] [--threads 1,2] [--quick] [--no-memory] [--seed-code DIR]

For every configuration it times real FedAvg rounds of each contender: fedlib's
``sequential`` engine (one client after another, what the lessons teach), its
``vectorized`` engine (``fedlib.engine``: all clients at once), and, with
``--seed-code``, the most-used PyTorch reproduction (shaoxiongji/federated-learning,
``benchmarks/seed_code.py``) on its own model and setting. The contenders run in one
process, interleaved: a warm-up round each, then ``--rounds`` rounds in turn (seed,
sequential, vectorized, seed, ...), so that a change in the machine's load hits them
alike; each row is the median, with every round's time listed, and the ratios are
ratios of these medians.

A row also gives the CPU seconds of the round (all threads together: on an idle
machine about the thread count times the wall time; less means other processes took
the cores), the achieved GFLOP/s from an analytic FLOP count of the model (training
~ 3x the forward pass) and that figure as a fraction of the machine's own peak,
measured in the same run as the best of a few large float32 matrix products at the
same thread count. On a machine shared with other jobs the wall time includes the
time others held the core; the same figures by CPU time (the process's own) are given
beside them, with the peak measured by CPU time too. The header names the machine, the thread count,
the versions and the load average. Then it times the evaluation of each model on the
10,000 test images and, unless ``--no-memory``, the peak resident memory of whole
MNIST CNN runs in a fresh process.

Rounds are real FedAvg rounds of K=100 IID clients (n_k = 600) on MNIST; the data
values do not change the timing, so without MNIST under FEDLIB_DATA random images
of the same shape are used (the header says so; the seed's row then cannot run).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

import fedlib
from fedlib import Dataset, FedAvgConfig, build_model, evaluate, load_dataset
from fedlib.data import data_root
from fedlib.seeds import sampling_rng
from fedlib.backends import make_backend
from fedlib.server import initial_model, rounds, sample_clients
from fedlib.strategies import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seed_code import seed_commit  # noqa: E402  (benchmarks/seed_code.py)


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration: a model and its local-training parameters."""

    label: str
    model: str
    local_epochs: int
    batch_size: int | None
    frac: float = 0.1
    lr: float = 0.05
    momentum: float = 0.0
    seed_code: bool = False       # the seed's code runs this setting too (its own model and defaults)


SETTINGS = [
    Setting("2NN E=1 B=10 C=0.1", "2nn", 1, 10),
    Setting("CNN E=5 B=10 C=0.1", "cnn", 5, 10),
    Setting("CNN E=1 B=inf C=0.1 (FedSGD-like)", "cnn", 1, None),
    # The seed's own model (CNNMnist = fedlib's cnn-small) and setting: its main_fed.py defaults.
    Setting("cnn-small (dropout) E=5 B=10 C=0.1, lr 0.01, momentum 0.5", "cnn-small", 5, 10, lr=0.01,
            momentum=0.5, seed_code=True),
]
ENGINES = ("sequential", "vectorized")
SEED = "seed's code"


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of one example's forward pass through every Conv2d and Linear."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    for hook in hooks:
        hook.remove()
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, size: int = 4096, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of the best of ``repeats`` (size x size) @ (size x size) float32 products, by wall
    time and by the CPU time of this process (on a GPU both are the wall time)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        synchronize(device)
        began, cpu_began = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - began)
        best_cpu = min(best_cpu, time.process_time() - cpu_began)
    flop = 2 * size**3 / 1e9
    return flop / best, flop / (best if device.type == "cuda" else best_cpu)


class FedlibRounds:
    """Successive FedAvg rounds of one fedlib engine: ``round()`` trains one and returns its
    wall and CPU seconds (the first call, with E = 1, is the warm-up: same shapes)."""

    def __init__(self, setting: Setting, engine: str, data: Dataset, device: torch.device):
        self.config = FedAvgConfig(model=setting.model, num_clients=100, frac=setting.frac,
                                   local_epochs=setting.local_epochs, batch_size=setting.batch_size, lr=setting.lr,
                                   momentum=setting.momentum, seed=0, engine=engine).validate()
        self.engine, self.data, self.device = engine, data, device
        model = initial_model(self.config, device=device)
        self.model = model
        self.client_indices = [torch.as_tensor(p, device=device) for p in self.config.split(data.y_train)]
        self.w_t = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.t = 0
        self.examples_per_round = self.config.local_epochs * sum(len(self.client_indices[k]) for k in self.selected(1))

    def selected(self, t: int) -> np.ndarray:
        return sample_clients(self.config.num_clients, self.config.frac, sampling_rng(self.config.seed, t))

    def round(self) -> tuple[float, float]:
        config = replace(self.config, local_epochs=1) if self.t == 0 else self.config
        backend = make_backend(self.engine, self.model, self.data, self.client_indices, config)
        synchronize(self.device)
        began, cpu_began = time.perf_counter(), time.process_time()
        t = self.t + 1                                    # one round of Algorithm 1 (fedlib.server.rounds)
        self.w_t = next(rounds(self.w_t, backend, build(config, self.w_t), config.num_clients, config.frac, t,
                               first=t)).weights
        synchronize(self.device)
        self.t += 1
        return time.perf_counter() - began, time.process_time() - cpu_began


class SeedCodeRounds:
    """The seed's rounds (``benchmarks/seed_code.py``) with FedlibRounds' interface."""

    def __init__(self, code_dir: str, device: torch.device):
        from seed_code import SeedRounds
        self.seed = SeedRounds(code_dir, data_root(), device)
        self.examples_per_round = self.seed.examples_per_round

    def round(self) -> tuple[float, float]:
        cpu_began = time.process_time()
        seconds = self.seed.round()
        return seconds, time.process_time() - cpu_began


def time_side_by_side(contenders: dict, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """A warm-up round of each contender, then ``rounds`` rounds of each in turn; returns,
    per contender, the wall and CPU seconds of its timed rounds."""
    for contender in contenders.values():
        contender.round()
    times = {name: ([], []) for name in contenders}
    for _ in range(rounds):
        for name, contender in contenders.items():
            wall, cpu = contender.round()
            times[name][0].append(wall)
            times[name][1].append(cpu)
    return times


def time_evaluation(model_name: str, data: Dataset, device: torch.device, repeats: int = 3) -> float:
    """Best seconds to evaluate a model on the whole test set (large batches, no autograd)."""
    model = build_model(model_name).to(device)
    evaluate(model, data.x_test, data.y_test)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        evaluate(model, data.x_test, data.y_test)
        synchronize(device)
        best = min(best, time.perf_counter() - began)
    return best


MEMORY_RUN = """
import resource, sys, torch, fedlib
fedlib.set_threads({threads})
config = fedlib.FedAvgConfig(model="cnn", frac=0.1, local_epochs={epochs}, batch_size={batch_size},
                             rounds={rounds}, device="{device}", engine="{engine}")
fedlib.run(config, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)    # KiB on Linux
"""


def peak_memory(engine: str, epochs: int, batch_size: int | None, rounds: int, threads: int,
                device: torch.device) -> float:
    """Peak resident memory (GiB) of a whole MNIST CNN run in a fresh Python process."""
    code = MEMORY_RUN.format(threads=threads, epochs=epochs, batch_size=batch_size, rounds=rounds,
                             device=device.type, engine=engine)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def machine() -> str:
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    else:
        gpu = "no GPU"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs; {gpu}"


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all = the CPU, and the GPU where one exists (default)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per row, after one warm-up (default 3)")
    parser.add_argument("--threads", default=None,
                        help="comma-separated CPU thread counts to compare (default: fedlib.set_threads())")
    parser.add_argument("--quick", action="store_true", help="2 timed rounds, only the 2NN and cnn-small, no memory runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--seed-code", default=None, metavar="DIR",
                        help="a checkout of shaoxiongji/federated-learning (outside this repository): "
                             "time its rounds beside fedlib's on its own model and setting")
    args = parser.parse_args()
    if args.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {args.rounds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False          # float32 everywhere, as the peak
    torch.backends.cudnn.allow_tf32 = False
    rounds = 2 if args.quick else args.rounds
    settings = [s for s in SETTINGS if s.model != "cnn"] if args.quick else SETTINGS
    devices = [torch.device("cpu")] if args.device == "cpu" else \
        [torch.device("cuda")] if args.device == "cuda" else \
        [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    thread_counts = [int(n) for n in args.threads.split(",")] if args.threads else [fedlib.set_threads()]

    try:
        cpu_data, source = load_dataset("mnist", download=False), "real MNIST"
    except fedlib.DatasetNotFoundError:
        g = torch.Generator().manual_seed(0)
        cpu_data = Dataset("mnist", torch.randn(60000, 1, 28, 28, generator=g), torch.randint(0, 10, (60000,), generator=g),
                           torch.randn(10000, 1, 28, 28, generator=g), torch.randint(0, 10, (10000,), generator=g),
                           [str(i) for i in range(10)])
        source = "random images of MNIST's shape (MNIST not found under FEDLIB_DATA)"

    print(f"# FedAvg engine benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, fedlib {fedlib.__version__}, python {platform.python_version()}; "
          f"data: {source}; K=100 IID clients, n_k=600; median of {rounds} rounds after a warm-up, "
          f"contenders interleaved")
    if args.seed_code:
        print(f"seed's code: shaoxiongji/federated-learning at {seed_commit(args.seed_code)}, from {args.seed_code}")
    print(f"load average at start (1, 5, 15 min): {load()}\n")

    for device in devices:
        data = cpu_data.to(device)
        for threads in thread_counts if device.type == "cpu" else [fedlib.set_threads()]:
            torch.set_num_threads(threads)
            peak, peak_cpu = matmul_peak(device)
            where = f"{device.type}, {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" \
                else f"cuda ({torch.cuda.get_device_name()})"
            print(f"## {where}: measured float32 matmul peak {peak:.1f} GFLOP/s by wall time, {peak_cpu:.1f} by "
                  f"CPU time (4096x4096, best of 5); torch threads {torch.get_num_threads()}\n")
            print("| configuration | contender | s / round (median) | rounds (s) | CPU s / round | GFLOP/s "
                  "| of peak | GFLOP/s by CPU time | of peak by CPU time | vs sequential | vs seed's code "
                  "| vs seed's code by CPU time | load (1 min) |")
            print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for setting in settings:
                flops = 3 * forward_flops(build_model(setting.model), (1, 28, 28))
                contenders = {}
                if setting.seed_code and args.seed_code and source == "real MNIST":
                    contenders[SEED] = SeedCodeRounds(args.seed_code, device)
                for engine in ENGINES:
                    contenders[engine] = FedlibRounds(setting, engine, data, device)
                times = time_side_by_side(contenders, rounds)
                medians = {name: statistics.median(wall) for name, (wall, _) in times.items()}
                cpu_medians = {name: statistics.median(cpu) for name, (_, cpu) in times.items()}
                for name, (wall, cpu) in times.items():
                    seconds, cpu_seconds = medians[name], cpu_medians[name]
                    work = flops * contenders[name].examples_per_round / 1e9            # GFLOP per round
                    by_cpu = f"{work / cpu_seconds:.1f} | {work / cpu_seconds / peak_cpu:.0%}" \
                        if device.type == "cpu" else "- | -"
                    vs_seq = f"{medians['sequential'] / seconds:.2f}x" if name != "sequential" else ""
                    vs_seed = f"{medians[SEED] / seconds:.2f}x | {cpu_medians[SEED] / cpu_seconds:.2f}x" \
                        if SEED in medians and name != SEED else " | "
                    label = f"{SEED} ({contenders[SEED].seed.commit})" if name == SEED else f"fedlib {name}"
                    print(f"| {setting.label} | {label} | {seconds:.3f} | {' '.join(f'{t:.2f}' for t in wall)} | "
                          f"{cpu_seconds:.3f} | {work / seconds:.1f} | {work / seconds / peak:.0%} | {by_cpu} "
                          f"| {vs_seq} | {vs_seed} | {os.getloadavg()[0]:.2f} |", flush=True)
            evals = ", ".join(f"{name} {time_evaluation(name, data, device):.3f} s"
                              for name in ("2nn", "cnn", "cnn-small"))
            print(f"\nevaluation on the 10,000 test images (batches of 2,000, no autograd): {evals}\n")

        if not (args.quick or args.no_memory or source != "real MNIST"):
            threads = thread_counts[0] if device.type == "cpu" else 1
            for epochs, batch_size, rounds_run in ((5, 10, 2), (1, None, 3)):
                b = "inf" if batch_size is None else batch_size
                rss = peak_memory("auto", epochs, batch_size, rounds_run, threads, device)
                print(f"peak resident memory of a whole MNIST CNN run ({rounds_run} rounds, E={epochs}, B={b}, "
                      f"C=0.1, engine auto, {device.type}): {rss:.2f} GiB")
            print()
    print(f"load average at end (1, 5, 15 min): {load()}")


if __name__ == "__main__":
    main()
