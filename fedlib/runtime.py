"""Where the computation runs: device choice and thread count.

Every lesson and the command line call these helpers, so the device is chosen in
one place and never hard-coded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import torch

from fedlib import params as P
from fedlib.params import InputError

DEVICES = ("auto", "cpu", "cuda")


def get_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return ``cuda`` when it is available and asked for (``auto``), else ``cpu``."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device='cuda' was asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return torch.device(device)


def set_threads(num_threads: int | None = None) -> int:
    """Fix PyTorch's CPU thread count (default 1) and return it.

    The paper's models are tiny (a 2NN step on B=10 is ~12 MFLOP), so intra-op
    threads must wake and synchronise for very little work each. On an idle
    2-core machine two threads still pay off for the vectorised engine (2NN 2.3x,
    paper CNN 1.7x faster than one thread; benchmarks/README.md), but when
    anything else competes for the cores (a notebook kernel, a test worker) the
    synchronisation stalls: one sequential 2NN round took 0.75 s with 1 thread and
    17.4 s with 2 on a busy machine. One thread is never far from the best and
    never that bad, and it makes results independent of the machine's core count,
    so it is the default; set ``FEDLIB_THREADS=2`` (or pass ``num_threads``) on an
    idle machine.
    """
    if num_threads is None:
        env = os.environ.get("FEDLIB_THREADS") or "1"
        try:
            num_threads = P.THREADS.parse(env)
        except InputError:
            raise InputError(f"FEDLIB_THREADS must be {P.THREADS.describe()}, got {env!r}") from None
    P.THREADS.check("num_threads", num_threads)
    torch.set_num_threads(num_threads)
    return num_threads


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes a run may still allocate on ``device``: a CUDA device's free memory, or for the CPU the
    memory the kernel says is available (``MemAvailable`` of /proc/meminfo: free memory plus caches
    it can drop; elsewhere the free pages of ``os.sysconf``). None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM are swallowed inside (in the main thread; other threads get no signals):
    what runs there (a checkpoint being saved, the line saying so) is not cut short by a second
    Ctrl-C, and the program stops right after anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
