"""Many runs at once: the clients of several runs' rounds, trained as one batch of models.

The paper tunes each setting over a grid of learning rates, and a reproduction adds seeds,
both partitions and the methods of lesson 8: runs that share the model and the shape of every
local step. Trained one after another, each round of each run is a handful of small steps.
``fedlib.run_many`` runs each of them as its own Algorithm 1 loop (``fedlib.server.rounds``),
in lockstep: before every round it asks :meth:`Lockstep.train` to train the clients of all
active runs together (``fedlib.engine.local.train_models``: R runs x m clients as one batch of
models, each with its run's learning rate, its client's data, shuffles and dropout masks, and
its strategy's terms), and each run's loop then collects its own clients' updates from its
:class:`Member`, the backend it was given, and aggregates them with its own strategy.

Each run's clients are the ones its strategy selects from the run's seed, and their updates are
those the vectorized engine computes for the run alone, up to float rounding
(``tests/test_engine_sweep.py``). A strategy whose selection is not a function of the seed
(DP-FedAvg: its sample comes from the operating system's entropy) cannot be run this way and is
refused by its type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedlib import strategies
from fedlib.client import ClientResult, Weights
from fedlib.config import FedAvgConfig
from fedlib.params import InputError
from fedlib.seeds import dropout_generator, shuffle_generator
from fedlib.strategies import DPFedAvg, FedAvg

from .local import LocalSGD, train_models, vectorized_unsupported_reason

REFUSED = (DPFedAvg,)          # strategies whose S_t is not a function of the run's seed


def batch_key(config: FedAvgConfig) -> tuple:
    """What the runs trained together must share: the data, the model, the device and the local
    training (E, B, momentum, weight decay, FedProx's mu)."""
    c = config
    mu = strategies.build(c, {}).client_terms(0).mu                 # the method's mu (0 but for FedProx)
    return (c.dataset, c.input_scaling, c.model, c.device, c.local_epochs, c.batch_size, c.momentum, c.weight_decay, mu)


def refusal(config: FedAvgConfig) -> str | None:
    """Why a run cannot be trained in lockstep (by its strategy's type, or its engine), or None."""
    if issubclass(strategies.STRATEGIES[config.strategy], REFUSED):
        return (f"strategy {config.strategy!r} draws its clients from the operating system's entropy, not the "
                "seed; run it with fedlib.run")
    if config.engine == "sequential":
        return "a run asks for the sequential engine"
    return None


@dataclass
class _Pending:
    t: int
    S_t: np.ndarray
    updates: dict[int, ClientResult]


class Lockstep:
    """The batch of runs: :meth:`member` gives each run's loop its backend, :meth:`join` checks
    that the runs can train together, :meth:`train` trains one round of all active runs."""

    def __init__(self):
        self.jobs: list = []
        self.pending: dict[int, _Pending] = {}

    def member(self, i: int) -> "Member":
        return Member(self, i)

    def join(self, jobs: list, max_examples_per_step: int | None = None) -> None:
        """The runs' Jobs, in order (InputError if they cannot be trained together)."""
        for job in jobs:
            reason = refusal(job.config) or vectorized_unsupported_reason(job.model)
            if reason:
                raise InputError(f"these runs cannot be trained together: {reason}")
        keys = {batch_key(job.config) for job in jobs}
        if len(keys) > 1:
            raise InputError("these runs cannot be trained together: they must share the dataset, its scaling, the "
                             "model, the device and E, B, momentum, weight decay and mu")
        first = jobs[0].config
        self.jobs, self.max_examples_per_step = jobs, max_examples_per_step
        self.sgd = LocalSGD(first.local_epochs, first.batch_size, first.momentum, first.weight_decay,
                            jobs[0].strategy.client_terms(0).mu)

    def train(self, requests: dict[int, tuple[Weights, int]]) -> None:
        """Train the clients of round t of every run i in ``requests`` (i -> (w_t, t)) as one batch."""
        start: dict[str, list[torch.Tensor]] = {}
        lr, indices, shuffles, dropouts, corrections, owners = [], [], [], [], [], []
        for i, (w_t, t) in requests.items():
            job = self.jobs[i]
            c = job.config
            S_t = job.strategy.select(c.num_clients, c.frac, t)
            self.pending[i] = _Pending(t, S_t, {})
            for k in (int(k) for k in S_t):
                owners.append((i, k))
                lr.append(c.lr)
                indices.append(job.clients[k])
                shuffles.append(shuffle_generator(c.seed, t, k))
                dropouts.append(dropout_generator(c.seed, t, k))
                corrections.append(job.strategy.client_terms(k).correction)
                for name, w in w_t.items():
                    start.setdefault(name, []).append(w)
        if not owners:
            return
        template, data = self.jobs[0].model, self.jobs[0].data
        stacked = {name: torch.stack(ws) for name, ws in start.items()}
        correction = None
        if any(c is not None for c in corrections):
            correction = {name: torch.stack([c[name] if c is not None else torch.zeros_like(stacked[name][0])
                                             for c in corrections]) for name in stacked}
        result = train_models(template, data.x_train, data.y_train, stacked,
                              torch.tensor(lr, dtype=data.x_train.dtype), indices, shuffles, dropouts, self.sgd,
                              correction, self.max_examples_per_step,
                              uniform_lr=lr[0] if len(set(lr)) == 1 else None)
        for position, (i, k) in enumerate(owners):
            self.pending[i].updates[k] = result.client_result(position)


class Member:
    """One run's backend in a lockstep batch: hands its loop the updates :meth:`Lockstep.train`
    computed for it (its S_t is checked against the one its loop selected)."""

    name = "vectorized"

    def __init__(self, lockstep: Lockstep, i: int):
        self.lockstep, self.i = lockstep, i

    def update(self, w_t: Weights, S_t: np.ndarray, t: int, strategy: FedAvg) -> dict[int, ClientResult]:
        pending = self.lockstep.pending.pop(self.i, None)
        if pending is None or pending.t != t or not np.array_equal(pending.S_t, S_t):
            raise RuntimeError(f"run {self.i} asked for round {t}'s clients {list(S_t)}, which the lockstep batch "
                               "did not train")
        return pending.updates
