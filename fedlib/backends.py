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

import math
import warnings

import numpy as np
import torch
from torch import nn

from fedlib.client import ClientResult, Weights, local_update
from fedlib.config import ENGINES, FedAvgConfig
from fedlib.data import Dataset
from fedlib.engine import (MAX_EXAMPLES_PER_STEP, sequential_is_faster, vectorized_local_updates,
                           vectorized_unsupported_reason)
from fedlib.engine.local import examples_per_input
from fedlib.engine.schedule import batch_width
from fedlib.models import count_parameters
from fedlib.params import InputError
from fedlib.seeds import dropout_generator, dropout_seed, shuffle_generator
from fedlib.strategies import FedAvg, num_selected

__all__ = ["Sequential", "Vectorized", "activation_bytes", "make_backend", "resolve_engine", "round_bytes"]


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
    if engine not in ENGINES:  # pragma: no mutate block
        raise InputError(f"engine must be one of {ENGINES}, got {engine!r}")
    reason = vectorized_unsupported_reason(model)
    if engine == "vectorized" and reason:  # pragma: no mutate block
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


# --- how much memory a round asks for, before it is allocated ------------------------------------

def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes one training input (x: one input, with its batch axis) keeps for the backward pass,
    estimated from one forward pass in eval mode (no randomness drawn, no gradient): the outputs
    of every layer, times 4 (their gradients and the backward's temporaries), and for a recurrent
    layer 4 times more per layer (the gates and states it keeps at every position). This matches what the
    engine measured within a factor of 1.5: the paper's CNN ~0.5 MB per image (this: 0.6 MB), the
    paper's LSTM ~3.5 MB per sequence of 80 (this: 3.2 MB)."""
    total = [0]

    def count(module: nn.Module, inputs, output) -> None:
        found = [output]
        size = 0
        while found:
            item = found.pop()
            if isinstance(item, torch.Tensor):
                size += item.numel() * item.element_size()
            elif isinstance(item, (tuple, list)):
                found.extend(item)
        factor = 4 * (1 + 4 * module.num_layers if isinstance(module, nn.RNNBase) else 1)
        total[0] += factor * size

    hooks = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return total[0]


def round_bytes(engine: str, model: nn.Module, x: torch.Tensor, sizes: list[int], config: FedAvgConfig,
                state_copies: int = 0) -> int:
    """Bytes one round asks for, estimated before anything is allocated.

    engine: ``sequential`` or ``vectorized``; model: the run's model (its parameter count P and
    dtype give the bytes of one model, b = P x itemsize); x: one training input (for
    :func:`activation_bytes`); sizes: every client's n_k; state_copies: models' worth of state the
    strategy keeps (SCAFFOLD: a c_k for each of the K clients). With m = max(C K, 1) clients a round
    and the largest m of the n_k:

    - the updates the clients send back: m b, and m b more for the vectorized engine, which
      trains them in groups and concatenates the groups' results;
    - the vectorized engine's group: g = max(1, MAX_EXAMPLES_PER_STEP / (W x inputs)) models of
      batch width W at once, each with its weights, gradients, start and (where used) momentum,
      w_t and correction; its schedule of S = E ceil(n_k / B) steps x g x W slots (21 bytes
      each: the indices and masks); and the activations of g x W inputs;
    - the sequential engine: one model's weights, gradients and optimizer state, and the
      activations of one batch of min(B, n_k) inputs;

    all times ALLOCATOR_SLACK, what the process was measured to grow by beyond these counts.
    """
    P = count_parameters(model)
    b = P * next(model.parameters()).element_size()
    m = min(num_selected(config.num_clients, config.frac), len(sizes))
    largest = sorted(sizes, reverse=True)[:m]
    width = batch_width(largest, config.batch_size)
    per_input = activation_bytes(model, x[:1])
    if engine == "vectorized":
        limit = MAX_EXAMPLES_PER_STEP.get(x.device.type, MAX_EXAMPLES_PER_STEP["cpu"])
        group = min(m, max(1, limit // (width * examples_per_input(x))))
        copies = 3 + bool(config.momentum) + bool(config.mu) + (config.strategy == "scaffold")
        steps = config.local_epochs * (1 if config.batch_size is None else math.ceil(largest[0] / config.batch_size))
        working = group * (copies * b + steps * width * 21 + width * per_input)
        updates = 2 * m * b
    else:
        working = 4 * b + min(width, largest[0]) * per_input
        updates = m * b
    return int(ALLOCATOR_SLACK * (updates + working + state_copies * b))


# Measured (real MNIST, the 2NN, C = 1, B = infinity, one round on a 2-core CPU shared with other work):
# the process grew by 1.48 GiB at K = 1000 and 3.79 GiB at K = 2000 with the vectorized engine, and by
# 1.16 GiB at K = 1000 with the sequential one, where the counts above are 1.53, 3.05 and 0.75 GiB:
# up to 1.55 times the count (the allocator keeps the freed blocks of the average's temporaries).
ALLOCATOR_SLACK = 1.6
