"""The server side of FedAvg: the paper's Algorithm 1, as one loop.

The paper's Algorithm 1, server side::

    initialize w_0
    for each round t = 1, 2, ...:
        m <- max(C * K, 1)
        S_t <- random set of m clients
        for each client k in S_t in parallel:
            w_{t+1}^k <- ClientUpdate(k, w_t)
        m_t <- sum_{k in S_t} n_k
        w_{t+1} <- sum_{k in S_t} (n_k / m_t) * w_{t+1}^k

(The weights n_k / m_t, over the round's clients only, are the paper's corrected form of
Algorithm 1.) :func:`rounds` is that loop and nothing else. It asks three things of others:

- the *strategy* (``fedlib.strategies``) selects S_t and aggregates the clients' weights:
  FedAvg's own are ``sample_clients`` and ``fedavg``; the methods of lessons 8 and 9 change
  one hook each;
- the *clients* compute ClientUpdate(k, w_t) for every k in S_t: one after another with
  ``fedlib.client.local_update`` (``fedlib.backends.Sequential``), all at once
  (``fedlib.backends.Vectorized``), or on Flower's SuperNodes (``fedlib.flower``);
- the caller decides what to do with each round it yields: ``fedlib.run`` evaluates the
  model, keeps the History, saves checkpoints and stops at a target (``fedlib.runner``).

FedSGD is the same loop with E = 1 and B = infinity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
from torch import nn

from fedlib.client import ClientResult, Weights
from fedlib.config import FedAvgConfig
from fedlib.models import build_model, initialize
from fedlib.strategies import FedAvg, Updates, fedavg, num_selected, sample_clients, weighted_mean

__all__ = ["Clients", "Round", "fedavg", "initial_model", "num_selected", "rounds", "sample_clients",
           "weighted_mean"]


class Clients(Protocol):
    """Where ClientUpdate runs: ``update`` returns, for every client k of S_t, what
    ClientUpdate(k, w_t) sends back (with the terms the strategy adds to its gradients)."""

    def update(self, w_t: Weights, S_t: np.ndarray, t: int, strategy: FedAvg) -> dict[int, ClientResult]: ...


@dataclass
class Round:
    """What round t did: its clients S_t, their updates (client k -> ClientResult; a client that
    failed is missing) and the new global weights w_{t+1}."""

    t: int
    S_t: np.ndarray
    updates: Updates
    weights: Weights


def rounds(w_0: Weights, clients: Clients, strategy: FedAvg, num_clients: int, frac: float,
           num_rounds: int, first: int = 1) -> Iterator[Round]:
    """Algorithm 1: the rounds ``first``, ..., ``num_rounds`` of FedAvg (or of ``strategy``'s method),
    starting from the global weights w_0 (or, when resuming, those before round ``first``).

    num_clients: K; frac: C. Yields each round as it completes; stop iterating to stop training.
    """
    w_t = w_0
    for t in range(first, num_rounds + 1):
        S_t = strategy.select(num_clients, frac, t)             # m = max(C K, 1) clients at random
        updates = clients.update(w_t, S_t, t, strategy)         # w_{t+1}^k <- ClientUpdate(k, w_t)
        w_t = strategy.aggregate(w_t, updates, t)               # w_{t+1} <- sum_k (n_k / m_t) w_{t+1}^k
        yield Round(t, S_t, updates, w_t)


def initial_model(config: FedAvgConfig, num_classes: int = 10, input_shape: tuple[int, ...] | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with w_0, the initial weights drawn from the run's seed as ``config.init``
    says (PyTorch's default, or a TensorFlow-style initialiser: ``fedlib.models.initialize``).

    fedlib.run, Flower's ServerApp and the lessons all start from this, so their runs
    begin from the identical model. The caller's random state is left alone: the CPU generator,
    which the layers' initialisers draw from, is seeded inside a fork (torch.manual_seed would
    re-seed the GPU generators too, for good).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(config.seed)
        model = initialize(build_model(config.model, num_classes, input_shape), config.init)
    return model.to(device=device, dtype=dtype)
