"""Differentially private FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018): the arithmetic.

FedAvg keeps the data on the clients, but what they send can still give it away (lesson 9
recovers a training image from one client's update). DP-FedAvg (the strategy
:class:`fedlib.strategies.DPFedAvg`) bounds how much any one client can change the model and
hides that change in noise. In each round t:

1. every client takes part independently with probability q = C (Poisson sampling:
   S_t may hold more or fewer than q K clients, or none);
2. each client's update Delta_k = w_k - w_t is clipped to L2 norm at most S (all its
   parameters as one vector);
3. the server adds Gaussian noise of standard deviation z S to the sum of the clipped
   updates and divides by the expected number of clients q K, a fixed denominator::

       w_{t+1} = w_t + (sum_{k in S_t} clip(Delta_k, S) + N(0, z^2 S^2 I)) / (q K)

Adding or removing one client's data changes the sum by at most S, so each round is the
sampled Gaussian mechanism with noise multiplier z, and T rounds are (epsilon, delta)-
differentially private at the level of clients ("user-level"). :func:`epsilon` asks a
maintained accountant (Google's ``dp-accounting``, the ``privacy`` extra) for epsilon;
nothing here computes it by hand.

The guarantee holds only if nobody can regenerate the noise or the sample. So by default both
come from the operating system's entropy (``os.urandom``, a cryptographically secure source,
:func:`secret_uniform` and :func:`secret_normal`) and differ in every run; the noise is never
saved. A seeded version (:func:`seeded_normal`, ``fedlib.seeds``) exists for teaching and tests only.

What the guarantee covers is the sequence of global models w_1, ..., w_T (and what is computed
from them alone, such as their test accuracy). The amplification by sampling in epsilon holds
only while S_t stays secret, so a DP run's History leaves out what a FedAvg History records of
the sample: each round's clients, their mean training loss (not noised) and how many uploaded
(``DPFedAvg.secret_sample``). A ``dp_reproducible`` run, whose guarantee is void anyway, records them.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Sequence

import numpy as np
import torch

from fedlib.client import Weights
from fedlib.params import InputError

ACCOUNTANTS = ("rdp", "pld")
Noise = Callable[[tuple[int, ...]], torch.Tensor]      # shape -> standard normal float64 samples on the CPU


def secret_uniform(n: int) -> np.ndarray:
    """n numbers uniform in [0, 1) from the operating system's entropy (53 random bits each)."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return bits.astype(np.float64) * 2.0 ** -53


def secret_normal(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal samples (float64, CPU) from the operating system's entropy, by the
    Box-Muller transform of :func:`secret_uniform` numbers: z = sqrt(-2 ln u) cos(2 pi v)."""
    n = math.prod(shape)
    u = torch.from_numpy(1.0 - secret_uniform(n))                # (0, 1]: the log is finite
    v = torch.from_numpy(secret_uniform(n))
    return (torch.sqrt(-2.0 * torch.log(u)) * torch.cos(2 * math.pi * v)).reshape(shape)


def seeded_normal(generator: torch.Generator) -> Noise:
    """Standard normal samples from ``generator`` (reproducible: for teaching and tests only)."""
    return lambda shape: torch.randn(shape, generator=generator, dtype=torch.float64)


def poisson_sample(uniform: np.ndarray, q: float) -> np.ndarray:
    """S_t for DP-FedAvg: client k takes part when its uniform number is below q, sorted."""
    return np.flatnonzero(uniform < q)


def clip(delta: Weights, clip_norm: float) -> Weights:
    """Delta scaled down, if needed, to an L2 norm (over all its tensors together) of clip_norm."""
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: d * scale for name, d in delta.items()}


def dp_aggregate(w_t: Weights, client_weights: Sequence[Weights], clip_norm: float, noise_multiplier: float,
                 expected_clients: float, noise: Noise, server_lr: float = 1.0) -> Weights:
    """w_{t+1} = w_t + eta_g (sum of the clipped updates + N(0, (z S)^2)) / (q K).

    client_weights: the w_k of this round's clients (possibly none); expected_clients: q K;
    noise: where the standard normal samples come from (drawn on the CPU, so every device adds
    the same noise for the same source).
    """
    total = {name: torch.zeros_like(w) for name, w in w_t.items()}
    for w_k in client_weights:
        for name, d in clip({name: w_k[name] - w_t[name] for name in w_t}, clip_norm).items():
            total[name] += d
    std = noise_multiplier * clip_norm
    return {name: w_t[name] + server_lr * (total[name] + (std * noise(tuple(w.shape))).to(device=w.device,
                                                                                             dtype=w.dtype))
            / expected_clients for name, w in w_t.items()}


def epsilon(noise_multiplier: float, q: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon of ``rounds`` rounds of DP-FedAvg at ``delta`` (client-level: add or remove one
    client), for the Poisson-sampled Gaussian mechanism, from Google's ``dp-accounting``.

    accountant: ``rdp``, its Renyi-DP accountant with the library's default orders (fast; the
    number most papers and libraries report), or ``pld``, its privacy-loss-distribution
    accountant (tighter: the RDP conversion to (epsilon, delta) is lossy; slower for small z).
    """
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError:  # pragma: no mutate block
        raise ImportError("epsilon needs the dp-accounting package: pip install 'fedlib[privacy]'") from None
    if accountant not in ACCOUNTANTS:  # pragma: no mutate block
        raise InputError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0 < delta < 1:  # pragma: no mutate block
        raise InputError(f"delta must be a number in (0, 1), got {delta}")
    if not 0 <= q <= 1:  # pragma: no mutate block
        raise InputError(f"q must be a number in [0, 1], got {q}")
    if noise_multiplier <= 0:
        return float("inf")
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    if accountant == "pld":
        ledger = pld_privacy_accountant.PLDAccountant()
    else:
        ledger = rdp_privacy_accountant.RdpAccountant()
    absl = logging.getLogger("absl")           # the RDP orders near 1 that do not converge are skipped, loudly
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        ledger.compose(event, rounds)
        return float(ledger.get_epsilon(delta))
    finally:
        absl.setLevel(level)
