"""Where the computation runs: device choice, thread count and seeding.

Every lesson and the command line call these helpers, so the device is chosen in
one place and never hard-coded.
"""

from __future__ import annotations

import os

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")


def get_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return ``cuda`` when it is available and asked for (``auto``), else ``cpu``."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'")
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
        env = os.environ.get("FEDLIB_THREADS")
        num_threads = int(env) if env else 1
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    torch.set_num_threads(num_threads)
    return num_threads


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from ``keys`` (for example ``seed, round, client``).

    Deriving every random stream from the run's one seed and the position in the
    run (rather than drawing from one shared stream) makes a round's randomness
    independent of what ran before it: a resumed run and a vectorised round see
    exactly the same numbers as a fresh, sequential one.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)
