"""Where ClientUpdate runs: the clients that :func:`fedlib.server.rounds` asks for their updates.

Algorithm 1 says "for each client k in S_t in parallel: w_{t+1}^k <- ClientUpdate(k, w_t)".
A backend is the object that does this for a run: its ``update(w_t, S_t, t, strategy)``
returns, for every client k of S_t, the ClientResult of ``fedlib.client.local_update`` on
client k's data, started from w_t, with the terms the strategy adds to the gradients
(FedProx's mu, SCAFFOLD's correction).

- :class:`Sequential`: one client after another, with ``local_update`` itself: the readable path.
- :class:`Vectorized`: all clients of the round as one batched network (``fedlib.engine``):
  the same weights up to float rounding (``tests/test_engine.py``), many times faster.
- ``fedlib.engine.lockstep``: the clients of many runs at once (``fedlib.run_many``), and
  ``fedlib.flower``: the clients on Flower's SuperNodes.

Every client draws its minibatches and dropout masks from its own streams (``fedlib.seeds``),
so which backend runs changes nothing but rounding.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from fedlib.client import ClientResult, Weights, local_update
from fedlib.config import ENGINES, FedAvgConfig
from fedlib.data import Dataset
from fedlib.engine import sequential_is_faster, vectorized_local_updates, vectorized_unsupported_reason
from fedlib.params import InputError
from fedlib.seeds import dropout_generator, dropout_seed, shuffle_generator
from fedlib.strategies import FedAvg

__all__ = ["Sequential", "Vectorized", "make_backend", "resolve_engine"]


class Sequential:
    """ClientUpdate(k, w_t) for every k in S_t, one client after another.

    model: the architecture (trained in place, from w_t each time); data: the training set on
    the device; clients: the K index tensors P_k into it; config: E, B, eta, momentum, weight
    decay and the seed of the run.
    """

    def __init__(self, model: nn.Module, data: Dataset, clients: list[torch.Tensor], config: FedAvgConfig):
        self.model, self.data, self.clients, self.config = model, data, clients, config

    def update(self, w_t: Weights, S_t: np.ndarray, t: int, strategy: FedAvg) -> dict[int, ClientResult]:
        return {int(k): self.client_update(int(k), w_t, t, strategy) for k in S_t}

    def client_update(self, k: int, w_t: Weights, t: int, strategy: FedAvg) -> ClientResult:
        """ClientUpdate(k, w_t): client k's E epochs of SGD on its own data P_k."""
        c, idx, terms = self.config, self.clients[k], strategy.client_terms(k)
        torch.manual_seed(dropout_seed(c.seed, t, k))             # nn.Dropout draws from torch's generator
        return local_update(self.model, self.data.x_train[idx], self.data.y_train[idx], weights=w_t,
                            epochs=c.local_epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                            weight_decay=c.weight_decay, generator=shuffle_generator(c.seed, t, k),
                            mu=terms.mu, correction=terms.correction)


class Vectorized(Sequential):
    """The same ClientUpdates, all clients of the round at once (``fedlib.engine``); each
    client draws its batches and dropout masks from its own streams, as in :class:`Sequential`."""

    def update(self, w_t: Weights, S_t: np.ndarray, t: int, strategy: FedAvg) -> dict[int, ClientResult]:
        if len(S_t) == 0:
            return {}
        c, ks = self.config, [int(k) for k in S_t]
        terms = [strategy.client_terms(k) for k in ks]
        corrections = [term.correction for term in terms]
        result = vectorized_local_updates(
            self.model, self.data.x_train, self.data.y_train, [self.clients[k] for k in ks],
            [shuffle_generator(c.seed, t, k) for k in ks], weights=w_t, epochs=c.local_epochs,
            batch_size=c.batch_size, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
            mu=uniform_mu(terms), corrections=None if corrections[0] is None else corrections,
            dropout_generators=[dropout_generator(c.seed, t, k) for k in ks])
        return {k: result.client_result(i) for i, k in enumerate(ks)}


def uniform_mu(terms) -> float:
    """The one proximal weight mu all clients of a batch share (the engine trains them with one)."""
    mus = {term.mu for term in terms}
    if len(mus) != 1:  # pragma: no mutate block
        raise InputError(f"the vectorized engine trains clients with one mu, got {sorted(mus)}; use the sequential one")
    return mus.pop()


def resolve_engine(engine: str, model: nn.Module) -> str:
    """The engine that will run: ``auto`` is the faster one for this model and device.

    ``vectorized`` trains all clients of a round at once (``fedlib.engine``);
    ``sequential`` trains them one after another with ``local_update``. Both give
    the same weights. ``auto`` is ``vectorized`` except for a model the vectorised
    engine cannot run (it warns with the reason) and, on a CPU, for a model as large
    as the paper's CNN, which was measured faster sequentially (``fedlib.engine.
    sequential_is_faster``; ``history.config["engine_used"]`` records the choice).
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, got {engine!r}")
    reason = vectorized_unsupported_reason(model)
    if engine == "vectorized" and reason:
        raise InputError(f"engine='vectorized' cannot run this model: {reason}; use 'sequential'")
    if engine == "auto" and reason:
        warnings.warn(f"engine='auto' falls back to 'sequential': {reason}", stacklevel=3)
        return "sequential"
    if engine == "auto":
        return "sequential" if sequential_is_faster(model) else "vectorized"
    return engine


def make_backend(engine: str, model: nn.Module, data: Dataset, clients: list[torch.Tensor],
                 config: FedAvgConfig) -> Sequential:
    """The backend of a resolved engine name (``sequential`` or ``vectorized``)."""
    return {"sequential": Sequential, "vectorized": Vectorized}[engine](model, data, clients, config)
