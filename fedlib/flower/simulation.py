"""Run the Flower app in Flower's Simulation Runtime (Ray backend) and measure it.

K virtual SuperNodes live inside one process tree: Ray starts a small cluster on
this machine (a GCS server, a raylet, a pool of worker processes), and each worker
(an "actor") runs the ClientApp for whichever virtual client a message is for.
With ``cpus_per_client=1`` on a 2-core machine two clients train at the same time.

:func:`simulate` returns the run's fedlib History together with what it cost:
how long Ray took to start, the wall time, and the peak memory of the whole
process tree (this Python process plus every Ray process), sampled with psutil.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import psutil

from fedlib.metrics import History
from fedlib.config import FedAvgConfig


@dataclass
class SimulationResult:
    """A simulation's Histories (one per configuration) and its measured costs.

    ray_start_seconds: time of ``ray.init`` (cluster start-up, before any training).
    seconds: wall time of the whole simulation, Ray start-up and shutdown included.
    peak_memory_bytes: the largest sum of PSS (proportional set size: shared pages
        split between the processes that share them) over this process and all its
        descendants, sampled every ``sample_every`` seconds.
    peak_processes: how many processes that tree held at its largest.
    peak_breakdown: the peak's bytes by kind of process (see :func:`process_kind`).
    """

    histories: list[History]
    ray_start_seconds: float
    seconds: float
    peak_memory_bytes: int
    peak_processes: int
    peak_breakdown: dict[str, int]

    @property
    def history(self) -> History:
        """The History of the first (often the only) configuration."""
        return self.histories[0]


def process_kind(proc: psutil.Process, root_pid: int) -> str:
    """``driver`` (this process: ServerApp, test set), ``clients`` (Ray actors running
    ClientApps) or ``ray`` (Ray's own services: GCS, raylet, agents, idle workers)."""
    if proc.pid == root_pid:
        return "driver"
    return "clients" if "ClientAppActor" in proc.name() else "ray"


class TreeMemorySampler:
    """Samples the memory of this process and all its descendants in a background thread."""

    def __init__(self, sample_every: float = 0.5) -> None:
        self.sample_every = sample_every
        self.peak_bytes = 0
        self.peak_processes = 0
        self.peak_breakdown: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """Sum of PSS over the tree now (bytes); updates the peaks."""
        root = psutil.Process()
        breakdown = {"driver": 0, "clients": 0, "ray": 0}
        count = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                breakdown[process_kind(proc, root.pid)] += proc.memory_full_info().pss
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        total = sum(breakdown.values())
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_breakdown = total, breakdown
        self.peak_processes = max(self.peak_processes, count)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.sample_every):
            self.sample()

    def __enter__(self) -> "TreeMemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def simulate(config: FedAvgConfig | Sequence[FedAvgConfig], *, num_cpus: int = 2, cpus_per_client: float = 1.0,
             verbose: bool = False, sample_every: float = 0.5) -> SimulationResult:
    """FedAvg as ``config`` says, with K = ``config.num_clients`` virtual SuperNodes under Ray.

    config: one configuration, or several with the same K, run one after the other
        in the same Ray session (Ray and its actors start only once).

    num_cpus: the CPUs Ray may use; cpus_per_client: the CPUs each running
    ClientApp reserves, so num_cpus / cpus_per_client clients train in parallel.
    verbose: keep Flower's INFO log (one block per round) instead of warnings only.
    """
    import ray
    from flwr.simulation import run_simulation

    from fedlib.flower.client_app import app as client_app
    from fedlib.flower.server_app import build_server_app

    configs = [config] if isinstance(config, FedAvgConfig) else list(config)
    for c in configs:
        c.validate()
    if num_cpus < 1:
        raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
    if not 0 < cpus_per_client <= num_cpus:
        raise ValueError(f"cpus_per_client must be in (0, num_cpus={num_cpus}], got {cpus_per_client}")
    # Quiet unless verbose: Flower logs every round at INFO and warns that `run_simulation` is
    # deprecated in favour of the `flwr run` command line (which runs this same engine).
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", category=FutureWarning)
    histories: list[History] = []
    server_app = build_server_app(configs, on_history=histories.append, verbose=verbose)

    began = time.perf_counter()
    with TreeMemorySampler(sample_every) as memory:
        if ray.is_initialized():
            raise RuntimeError("Ray is already running in this process; call ray.shutdown() first")
        # Started here rather than inside Flower, to time it; Flower reuses it and shuts it down.
        ray_dir = tempfile.mkdtemp(prefix="fedlib-ray-")  # Ray's session files, removed at the end
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=verbose, _temp_dir=ray_dir)
            ray_started = time.perf_counter()
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=configs[0].num_clients,
                           backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
                           verbose_logging=False)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)
    if len(histories) != len(configs):
        raise RuntimeError("the Flower simulation ended without all its results; run with verbose=True "
                           "to see its log")
    return SimulationResult(histories, ray_started - began, time.perf_counter() - began,
                            memory.peak_bytes, memory.peak_processes, memory.peak_breakdown)
