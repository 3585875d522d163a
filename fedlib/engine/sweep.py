"""Many FedAvg runs trained as one: the runs of a sweep, their clients side by side.

The paper tunes each setting over a grid of learning rates, and a reproduction adds
seeds and both partitions: runs that share the model and the shape of every step
(E, B, C, K). Trained one after another, each round of each run is a handful of
small steps. :func:`run_many` trains all of them together: every round, each
unfinished run r samples its own clients S_t^r, and the m clients of all R runs
train as one batch of R x m models (``fedlib.engine.local.train_models``), each with
its run's learning rate, partition, shuffles and dropout masks. Each run then
averages its own clients, is evaluated, and keeps its own History; a run that
reaches its target (with ``stop_at_target``), diverges or uses up its rounds drops
out, and the others go on with fewer models.

Every random choice comes from the run's own seed, exactly as in ``fedlib.run``
(``fedlib.seeds``), and the server step is the same ``fedavg``, so each History is
the one ``fedlib.run(config)`` gives with the vectorized engine: the same clients,
and weights equal up to float rounding (``tests/test_engine_sweep.py``). Dropout masks
are each client's own stream, ``dropout_seed(seed, t, k)``, as in the sequential
engine. A record's ``seconds`` is the time of the whole batched round.

Runs may differ in: lr, seed, partition (and its parameters), rounds, target,
stop_at_target, eval_every, init. They must share everything else (:func:`sweep_reason`
says what differs); the methods of lessons 8 and 9 (SCAFFOLD, server optimizers, DP) are not
batched.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from fedlib.config import FedAvgConfig
from fedlib.data import Dataset, load_dataset
from fedlib.metrics import History, RoundRecord
from fedlib.params import InputError
from fedlib.runtime import get_device
from fedlib.seeds import dropout_seed, shuffle_generator
from fedlib.server import (Checkpoint, ServerState, fedavg, finished, initial_model, resolve_engine, round_record,
                           select_clients, weighted_mean)

from .local import LocalSGD, train_models

# What the runs of one batched sweep may differ in; every other field must be equal.
MAY_DIFFER = ("lr", "seed", "partition", "shards_per_client", "shard_size", "alpha", "min_size", "sigma",
              "rounds", "target", "stop_at_target", "eval_every", "init", "engine")


def sweep_reason(configs: Sequence[FedAvgConfig]) -> str | None:
    """Why ``configs`` cannot be trained together by :func:`run_many`, or None if they can."""
    if not configs:
        return "no runs were given"
    first = asdict(configs[0])
    for config in configs:
        if config.engine == "sequential":
            return "a run asks for the sequential engine"
        if config.scaffold or config.dp_clip is not None or config.server_opt != "sgd" \
                or config.server_lr != 1 or config.server_momentum != 0:
            return "SCAFFOLD, DP-FedAvg and server optimizers are not batched; run them with fedlib.run"
        differ = [k for k, v in asdict(config).items() if k not in MAY_DIFFER and v != first[k]]
        if differ:
            return f"the runs differ in {', '.join(differ)} (they may differ only in {', '.join(MAY_DIFFER)})"
    return None


class _Run:
    """One run of the sweep: its config, clients' data, current w_t, History and checkpoint."""

    def __init__(self, config: FedAvgConfig, data: Dataset, device: torch.device, checkpoint, every: int):
        self.config = config
        self.model = initial_model(config, data.num_classes, data.input_shape, device, data.x_train.dtype)   # w_0
        self.clients = [torch.as_tensor(idx, device=device) for idx in config.split(data.y_train)]
        self.w_t = {name: v.detach().clone() for name, v in self.model.state_dict().items()}
        self.history = History(config=asdict(config) | {"engine_used": "vectorized"}, device=str(device))
        self.saver = Checkpoint(checkpoint, config, every) if checkpoint else None
        self.state = ServerState(config, self.w_t)
        if self.saver:
            self.w_t, self.history = self.saver.resume(self.w_t, self.history, device, self.state)

    @property
    def t(self) -> int:
        return len(self.history.records) + 1

    @property
    def done(self) -> bool:
        return self.t > self.config.rounds or finished(self.history, self.config)

    def save(self) -> None:
        if self.saver:
            self.saver.save(self.w_t, self.history, self.state.state_dict())


def run_many(configs: Sequence[FedAvgConfig], data: Dataset | None = None, *, progress: bool = True,
             checkpoints: Sequence[str | Path | None] | None = None, checkpoint_every: int = 10,
             on_round: Callable[[int, RoundRecord], None] | None = None,
             max_examples_per_step: int | None = None) -> list[History]:
    """Train every run of ``configs`` at once; returns their Histories, in order.

    Each History is the one ``fedlib.run(config, data)`` returns (vectorized engine),
    ``history.model`` included. data: the dataset all runs train on (else loaded by
    name). checkpoints: one path (or None) per run, as ``fedlib.run``'s checkpoint: a
    run resumes from its file and saves to it every ``checkpoint_every`` rounds, when
    it ends and on Ctrl-C. on_round: called with (run's position, its round's record).
    """
    configs = [c.validate() for c in configs]
    reason = sweep_reason(configs)
    if reason:
        raise InputError(f"these runs cannot be trained together: {reason}")
    if checkpoints is not None and len(checkpoints) != len(configs):
        raise InputError(f"checkpoints must hold one path (or None) per run ({len(configs)}), got {len(checkpoints)}")
    first = configs[0]
    device = get_device(first.device)
    data = (data or load_dataset(first.dataset)).to(device)
    runs = [_Run(c, data, device, checkpoints[i] if checkpoints else None, checkpoint_every)
            for i, c in enumerate(configs)]
    template = runs[0].model
    resolve_engine("vectorized", template)                         # InputError for a model it cannot run
    sgd = LocalSGD(first.local_epochs, first.batch_size, first.momentum, first.weight_decay, first.mu)
    total = sum(c.rounds for c in configs)
    bar = _bar(total, sum(len(r.history.records) for r in runs), progress)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            while True:
                active = [r for r in runs if not r.done]
                if not active:
                    break
                began = time.perf_counter()
                _round(active, template, data, sgd, began, max_examples_per_step)
                for r in active:
                    if r.saver and ((r.t - 1) % r.saver.every == 0 or r.done):
                        r.save()
                    if on_round:
                        on_round(runs.index(r), r.history.records[-1])
                bar.update(len(active))
    except KeyboardInterrupt:
        for r in runs:
            r.save()
        raise
    finally:
        bar.close()
    for r in runs:
        model = initial_model(r.config, data.num_classes, data.input_shape, device, data.x_train.dtype)
        model.load_state_dict(r.w_t)
        r.history.model = model
    return [r.history for r in runs]


def _round(active: list[_Run], template: torch.nn.Module, data: Dataset, sgd: LocalSGD, began: float,
           max_examples_per_step: int | None) -> None:
    """One round of every active run, all clients trained together."""
    selected = [select_clients(r.config, r.t) for r in active]
    lr, indices, shuffles, dropouts = [], [], [], []
    for r, S_t in zip(active, selected):
        for k in S_t:
            lr.append(r.config.lr)
            indices.append(r.clients[k])
            shuffles.append(shuffle_generator(r.config.seed, r.t, k))
            dropouts.append(torch.Generator().manual_seed(dropout_seed(r.config.seed, r.t, k)))
    names = list(active[0].w_t)
    sizes = [len(S_t) for S_t in selected]
    start = {n: torch.cat([r.w_t[n].unsqueeze(0).expand(m, *r.w_t[n].shape) for r, m in zip(active, sizes) if m])
             for n in names}
    result = train_models(template, data.x_train, data.y_train, start, torch.tensor(lr, dtype=data.x_train.dtype),
                          indices, shuffles, dropouts, sgd, max_examples_per_step=max_examples_per_step,
                          uniform_lr=lr[0] if len(set(lr)) == 1 else None)
    at = 0
    for r, S_t, m in zip(active, selected, sizes):
        clients = [result.client(i) for i in range(at, at + m)]
        n = [int(result.num_examples[i]) for i in range(at, at + m)]
        losses = [float(result.train_loss[i]) for i in range(at, at + m)]
        at += m
        w_next = fedavg(clients, n)
        record = round_record(template, w_next, data, r.config, r.t, S_t, weighted_mean(losses, n), began,
                              r.history)
        r.w_t = w_next                                   # w_t and its record together: what a checkpoint saves
        r.history.records.append(record)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="round", desc="FedAvg sweep")
