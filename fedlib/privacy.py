"""Differentially private FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018).

FedAvg keeps the data on the clients, but what they send can still give it away (lesson 9
recovers a training image from one client's update). DP-FedAvg bounds how much any one
client can change the model and hides that change in noise. In each round t:

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
maintained accountant (the RDP accountant of Google's ``dp-accounting``, the ``privacy``
extra) for epsilon; nothing here computes it by hand.
"""

from __future__ import annotations

import numpy as np
import torch

from fedlib.client import Weights
from fedlib.params import InputError

# Integer Renyi orders only: the accountant's fractional orders near 1 do not converge for
# these q and z and would log warnings; the integer ones give a valid (slightly larger) epsilon.
RDP_ORDERS = tuple(range(2, 257))


def sample_clients_poisson(num_clients: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """S_t for DP-FedAvg: each of the K clients independently with probability q, sorted."""
    return np.flatnonzero(rng.random(num_clients) < q)


def clip(delta: Weights, clip_norm: float) -> Weights:
    """Delta scaled down, if needed, to an L2 norm (over all its tensors together) of clip_norm."""
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: d * scale for name, d in delta.items()}


def dp_aggregate(w_t: Weights, client_weights: list[Weights], clip_norm: float, noise_multiplier: float,
                 expected_clients: float, generator: torch.Generator) -> Weights:
    """w_{t+1} = w_t + (sum of the clipped updates + N(0, (z S)^2)) / (q K).

    client_weights: the w_k of this round's clients (possibly none); expected_clients: q K;
    generator: the round's noise stream (on the CPU, so every device draws the same noise).
    """
    total = {name: torch.zeros_like(w) for name, w in w_t.items()}
    for w_k in client_weights:
        for name, d in clip({name: w_k[name] - w_t[name] for name in w_t}, clip_norm).items():
            total[name] += d
    std = noise_multiplier * clip_norm
    return {name: w_t[name] + (total[name] + std * torch.randn(w.shape, generator=generator, dtype=w.dtype)
                               .to(w.device)) / expected_clients
            for name, w in w_t.items()}


def epsilon(noise_multiplier: float, q: float, rounds: int, delta: float) -> float:
    """epsilon of ``rounds`` rounds of DP-FedAvg at ``delta`` (client-level, add or remove one
    client), from dp-accounting's RDP accountant for the Poisson-sampled Gaussian mechanism."""
    try:
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError:
        raise ImportError("epsilon needs the dp-accounting package: pip install 'fedlib[privacy]'") from None
    if noise_multiplier <= 0:
        return float("inf")
    if not 0 < delta < 1:
        raise InputError(f"delta must be a number in (0, 1), got {delta}")
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)),
                       rounds)
    return float(accountant.get_epsilon(delta))
