"""Every random stream of a run, derived from its one seed.

A run has one ``seed``. Each random choice it makes draws from a stream derived from
that seed and from *where* in the run the choice is made (the stream's name, the round
t, the client k), never from one shared generator. So a round's randomness does not
depend on what ran before it: a resumed run, the vectorised engine, Flower's
ClientApp and a lesson's hand-written loop all see exactly the same numbers as a
fresh sequential run.

==============  =======================================  ===============================
stream          what it decides                          function
==============  =======================================  ===============================
partition       which examples each client holds         ``seed`` itself (numpy), once
init            the initial global weights w_0           ``seed`` itself (torch), once
SAMPLING        S_t, the clients of round t              :func:`sampling_rng`
SHUFFLING       client k's minibatches in round t        :func:`shuffle_generator`
DROPOUT         the dropout masks of round t             :func:`dropout_seed`, :func:`dropout_generator`
NOISE           DP-FedAvg's noise in round t             :func:`noise_generator` (only with
                                                         ``dp_reproducible``: by default the noise
                                                         and DP's sample come from the operating
                                                         system, ``fedlib.privacy``)
==============  =======================================  ===============================

Dropout: client k's masks in round t come from ``dropout_seed(seed, t, k)``. One client
at a time (``local_update``, Flower's ClientApp), torch is seeded with it and the
model's ``nn.Dropout`` layers draw from torch's generator; the vectorised engine gives
client k a generator of its own with that seed and draws, before the round, exactly
the masks ``nn.Dropout`` would (``fedlib.engine.schedule``). So on a CPU both engines
train on the same masks. On a GPU, ``nn.Dropout`` draws from CUDA's generator instead:
there the sequential engine's masks differ from the vectorised engine's, which are
drawn on the CPU and so are the same on every device.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """The numbered streams, the first key of :func:`derive_seed`."""

    SAMPLING = 1
    SHUFFLING = 2
    DROPOUT = 3
    NOISE = 4


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from ``keys`` (for example ``seed, Stream.SHUFFLING, t, k``)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def sampling_rng(seed: int, t: int) -> np.random.Generator:
    """The generator that draws S_t, the clients of round t."""
    return np.random.default_rng(derive_seed(seed, Stream.SAMPLING, t))


def shuffle_generator(seed: int, t: int, k: int) -> torch.Generator:
    """Client k's shuffling stream in round t (CPU: the same batches on every device)."""
    return torch.Generator().manual_seed(derive_seed(seed, Stream.SHUFFLING, t, int(k)))


def dropout_seed(seed: int, t: int, k: int | None = None) -> int:
    """The seed of client k's dropout masks in round t (k=None: all clients of the round at once)."""
    return derive_seed(seed, Stream.DROPOUT, t) if k is None else derive_seed(seed, Stream.DROPOUT, t, int(k))


def dropout_generator(seed: int, t: int, k: int) -> torch.Generator:
    """Client k's dropout stream in round t, as a generator (the vectorised engine draws each
    client's masks from it; the sequential engine seeds torch with :func:`dropout_seed`)."""
    return torch.Generator().manual_seed(dropout_seed(seed, t, k))


def noise_generator(seed: int, t: int) -> torch.Generator:
    """The stream of round t's Gaussian noise in DP-FedAvg (CPU: the same noise on every device)."""
    return torch.Generator().manual_seed(derive_seed(seed, Stream.NOISE, t))
