"""Running FedAvg: Algorithm 1's loop (``fedlib.server.rounds``) and what a real run needs around it.

:func:`run` builds a run from its configuration (:class:`Job`: the data, w_0, the clients'
data P_k, the strategy, the backend), iterates over the rounds of ``rounds`` and hands each
to small pieces, one job each (:class:`Tracker`):

- the record of the round: its clients, training loss and uploads, and the test accuracy of
  w_{t+1} every ``eval_every`` rounds (and in the last, and in one that diverged);
- the run's :class:`~fedlib.metrics.History`;
- the checkpoint, every ``checkpoint_every`` rounds, at the end and on an interrupt, from which
  a run resumes and ends exactly as if it had not stopped;
- the stopping rules: a run ends when it diverges (:func:`fedlib.metrics.diverged`) or, with
  ``stop_at_target``, when it reaches its target accuracy;
- a progress bar, and Ctrl-C: the run is cut back to its last complete round, saved, and
  :class:`RunInterrupted` says what was kept.

:func:`run_many` is the same for several runs at once: each run is its own ``rounds`` loop with
its own Tracker, and the clients of all of them train together as one batch
(``fedlib.engine.lockstep``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from fedlib import strategies
from fedlib.backends import make_backend, resolve_engine, round_bytes
from fedlib.checkpoint import CHECKPOINT_EVERY, Checkpoint
from fedlib.client import Weights
from fedlib.config import FedAvgConfig
from fedlib.data import Dataset, load_dataset
from fedlib.engine.lockstep import Lockstep
from fedlib.metrics import History, RoundRecord, diverged, evaluate
from fedlib.models import model_bytes
from fedlib.params import InputError
from fedlib.partition import check_split
from fedlib.runtime import available_memory, get_device, signals_held
from fedlib.server import Clients, Round, initial_model, rounds

__all__ = ["CHECKPOINT_EVERY", "Job", "RunInterrupted", "Tracker", "finished", "run", "run_many"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, through the command line) stopped a run or runs. Every run is cut back
    to its last complete round; ``saved`` lists the checkpoints that hold them (empty: nothing
    was saved). ``str()`` is the one line to show, with how to resume."""

    def __init__(self, rounds_done: list[int], saved: list[Path]):
        self.rounds_done, self.saved = rounds_done, saved
        done = (f"after round {rounds_done[0]}" if len(rounds_done) == 1
                else f"with {len(rounds_done)} runs after rounds {min(rounds_done)} to {max(rounds_done)}")
        if saved:
            where = str(saved[0]) if len(saved) == 1 else f"{len(saved)} checkpoints in {saved[0].parent}"
            text = f"interrupted {done}, saved in {where}; run the same command again to resume"
        else:
            text = (f"interrupted {done}; nothing was saved (a checkpoint makes a run resumable: --checkpoint FILE "
                    "on the command line, checkpoint= in fedlib.run)")
        super().__init__(text)


class Job:
    """What a run needs before its first round, built from its configuration: the data on the
    run's device, the model with w_0, the K clients' index tensors P_k, the strategy and the
    clients' backend (the engine ``config.engine`` picks, or the one given)."""

    def __init__(self, config: FedAvgConfig, data: Dataset | None = None, backend: Clients | None = None):
        if not isinstance(config, FedAvgConfig):
            raise TypeError(f"config must be a fedlib.FedAvgConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.device = get_device(config.device)
        if data is None:
            data = load_dataset(config.dataset, scaling=config.input_scaling, device="cpu")
        if not isinstance(data, Dataset):
            raise TypeError(f"data must be a fedlib.Dataset (or None), got {type(data).__name__}")
        if data.x_train.is_floating_point() and data.scaling != config.input_scaling:
            raise InputError(f"the data is scaled {data.scaling!r} but input_scaling is {config.input_scaling!r}")
        self.data = data.to(self.device)
        x = self.data.x_train                          # the model trains in the images' dtype (ids: float32)
        self.dtype = x.dtype if x.is_floating_point() else torch.float32
        try:
            self.model = initial_model(config, self.data.num_classes, self.data.input_shape, self.device, self.dtype)
        except ValueError as error:
            raise InputError(f"model {config.model!r} does not fit dataset {config.dataset!r}: {error}") from None
        self.w_0 = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        parts = config.split(self.data.y_train, self.data.clients)
        check_split(parts, len(self.data.y_train), f"partition {config.partition!r} of {config.num_clients} clients")
        self.clients = [torch.as_tensor(idx, device=self.device) for idx in parts]        # the P_k
        self.strategy = strategies.build(config, self.w_0)
        if backend is None:
            self.engine = resolve_engine(config.engine, self.model)
            backend = make_backend(self.engine, self.model, self.data, self.clients, config)
        else:
            self.engine = getattr(backend, "name", type(backend).__name__.lower())
        self.backend = backend

    def round_bytes(self) -> int:
        """The memory one round of this run asks for, estimated before it is allocated
        (:func:`fedlib.backends.round_bytes`; a backend of the caller's own counts as sequential)."""
        engine = self.engine if self.engine in ("sequential", "vectorized") else "sequential"
        state = {"scaffold": self.config.num_clients + 1, "fedadam": 2, "fedyogi": 2, "fedavgm": 1}
        return round_bytes(engine, self.model, self.data.x_train, [len(c) for c in self.clients], self.config,
                           state.get(self.config.strategy, 0))

    def history(self) -> History:
        return History(config=asdict(self.config) | {"engine_used": self.engine}, device=str(self.device))

    def evaluate(self, w: Weights) -> tuple[float, float]:
        """Test accuracy and loss of the global model with weights w."""
        self.model.load_state_dict(w)
        return evaluate(self.model, self.data.x_test, self.data.y_test)

    def random_state(self):
        """Keep the caller's random state as it was (the backends seed torch for dropout)."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])


# A run is refused when one round would need more than this share of the memory still available
# on its device (the rest is for the data loaded after the check, the evaluation and everything else).
MEMORY_SHARE = 0.8


def check_memory(jobs: Sequence[Job]) -> None:
    """Refuse (InputError, before any round allocates it) runs whose rounds together would need more
    than MEMORY_SHARE of the memory available on their device, with the estimate and how to lower it."""
    need = sum(job.round_bytes() for job in jobs)
    free = available_memory(jobs[0].device)
    if free is not None and need > MEMORY_SHARE * free:
        c = jobs[0].config
        m = strategies.num_selected(c.num_clients, c.frac)
        runs = f"{len(jobs)} runs of " if len(jobs) > 1 else ""
        raise InputError(f"{runs}m = {m} clients a round (K = {c.num_clients}, C = {c.frac:g}) would need about "
                         f"{need / 2**30:.1f} GiB on the {jobs[0].device.type} ({m} models of "
                         f"{model_bytes(jobs[0].model) // 4:,} parameters, the training's batches and state), more "
                         f"than {MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB available there; lower frac (C), "
                         "num_clients (K), local_epochs (E) or batch_size (B)")


def finished(history: History, config: FedAvgConfig) -> bool:
    """Whether a run is over before its last round: it diverged, or it reached its target with
    ``stop_at_target``."""
    reached = config.target is not None and any(a >= config.target for a in history.accuracies)
    return history.diverged or (config.stop_at_target and reached)


class Tracker:
    """One run around its loop: its History, the record of each round, the checkpoint, the last
    complete round (what an interrupt keeps) and the stopping rules."""

    def __init__(self, job: Job, checkpoint: str | Path | None = None, every: int = CHECKPOINT_EVERY):
        self.job, self.config = job, job.config
        self.saver = Checkpoint(checkpoint, job.config, every) if checkpoint else None
        self.history, self.w_t = job.history(), job.w_0
        saved = self.saver.load(job.w_0) if self.saver else None
        if saved:
            self.w_t, history, state = saved
            try:
                job.strategy.load_state_dict(state)
            except InputError as error:
                raise InputError(f"checkpoint {self.saver.path}: {error}; delete it or pass another checkpoint "
                                 "path") from None
            self.history.records = history.records
        self.last = (self.w_t, len(self.history.records), job.strategy.state_dict())
        self.clock = time.perf_counter()

    @property
    def next_round(self) -> int:
        return len(self.history.records) + 1

    @property
    def done(self) -> bool:
        return self.next_round > self.config.rounds or finished(self.history, self.config)

    def add(self, r: Round) -> RoundRecord:
        """Round r's record into the History; the checkpoint when due."""
        record = self.record(r)
        self.history.records.append(record)
        self.w_t = r.weights
        self.last = (r.weights, len(self.history.records), self.job.strategy.state_dict())
        if self.history.diverged:
            warnings.warn(f"training diverged in round {r.t} (train loss {record.train_loss}, test loss "
                          f"{record.test_loss}); the run stops here. A smaller lr (now {self.config.lr}) "
                          "usually helps.", stacklevel=3)
        if self.saver and (self.saver.due(r.t) or self.done):
            self.saver.save(r.weights, self.history, self.last[2])
        self.clock = time.perf_counter()
        return record

    def record(self, r: Round) -> RoundRecord:
        """Round t's record: the clients that sent an update, their n_k-weighted training loss,
        the uploads so far and, when due, the test accuracy and loss of w_{t+1}."""
        updates = r.updates.values()
        train_loss = strategies.weighted_mean([u.train_loss for u in updates], [u.num_examples for u in updates])
        broken = bool(r.updates) and not math.isfinite(train_loss) or not all(
            torch.isfinite(w).all() for w in r.weights.values())
        accuracy = loss = None
        if r.t % self.config.eval_every == 0 or r.t == self.config.rounds or broken:
            accuracy, loss = self.job.evaluate(r.weights)
        per_client = model_bytes(self.job.model) * self.job.strategy.uploads
        uploaded = (self.history.records[-1].bytes_uploaded if self.history.records else 0) + len(r.updates) * per_client
        return RoundRecord(r.t, sorted(r.updates), accuracy, loss, train_loss, time.perf_counter() - self.clock,
                           uploaded)

    def interrupted(self) -> Path | None:
        """Cut the run back to its last complete round and save that; the checkpoint, if any."""
        w_t, rounds_done, state = self.last
        del self.history.records[rounds_done:]
        self.w_t = w_t
        if self.saver:
            self.saver.save(w_t, self.history, state)
            return self.saver.path
        return None

    def result(self) -> History:
        """The History, with the final global model attached (``history.model``)."""
        model = initial_model(self.config, self.job.data.num_classes, self.job.data.input_shape, self.job.device,
                              self.job.dtype)
        model.load_state_dict(self.w_t)
        self.history.model = model
        return self.history


@contextlib.contextmanager
def interrupts(trackers: Sequence[Tracker]) -> Iterator[None]:
    """Ctrl-C inside: every run is cut back to its last complete round and saved, then
    :class:`RunInterrupted` (a KeyboardInterrupt) says what was kept."""
    try:
        yield
    except KeyboardInterrupt:
        with signals_held():                # a second Ctrl-C must not cut the save short
            saved = [path for path in (t.interrupted() for t in trackers) if path is not None]
        raise RunInterrupted([len(t.history.records) for t in trackers], saved) from None


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, unit="round", disable=not enabled, desc=desc)


def run(config: FedAvgConfig, data: Dataset | None = None, *, progress: bool = True,
        checkpoint: str | Path | None = None, checkpoint_every: int = CHECKPOINT_EVERY,
        on_round: Callable[[RoundRecord], None] | None = None, clients: Clients | None = None) -> History:
    """Train as ``config`` says (FedAvg, or the method ``config.strategy`` names) and return the
    run's History, with the final model as ``history.model``.

    data: a dataset already loaded (else it is loaded by name); the model trains in the dtype of
    its images (float32; the tests pass float64). checkpoint: a file the run is saved to every
    ``checkpoint_every`` rounds, when it ends and when it is interrupted; if it exists when the
    run starts, the run resumes from it and gives the same History as an uninterrupted run.
    on_round: called with each round's record. clients: a backend of your own (Flower's, say)
    instead of the engine ``config.engine`` picks. A run whose training diverges stops in that
    round with a warning (``history.diverged``). Before any training, InputError refuses a split
    that leaves a client without examples and a round that would need more memory than the device
    has available (:func:`check_memory`); TypeError a config, data or on_round of the wrong kind. Random numbers come from ``fedlib.seeds``; the caller's random state is
    left alone.
    """
    if on_round is not None and not callable(on_round):
        raise TypeError(f"on_round must be a function of a RoundRecord (or None), got {type(on_round).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {type(progress).__name__}")
    job = Job(config, data, clients)
    check_memory([job])
    track = Tracker(job, checkpoint, checkpoint_every)
    c = job.config
    with job.random_state(), progress_bar(c.rounds, len(track.history.records), progress,
                                          f"{c.strategy} {c.model} {c.partition}") as bar, interrupts([track]):
        if not track.done:
            for r in rounds(track.w_t, job.backend, job.strategy, c.num_clients, c.frac, c.rounds, track.next_round):
                record = track.add(r)
                if record.test_accuracy is not None:
                    bar.set_postfix(acc=f"{record.test_accuracy:.4f}", loss=f"{record.test_loss:.4f}")
                bar.update()
                if on_round:
                    on_round(record)
                if track.done:
                    break
    return track.result()


def run_many(configs: Sequence[FedAvgConfig], data: Dataset | None = None, *, progress: bool = True,
             checkpoints: Sequence[str | Path | None] | None = None, checkpoint_every: int = CHECKPOINT_EVERY,
             on_round: Callable[[int, RoundRecord], None] | None = None,
             max_examples_per_step: int | None = None) -> list[History]:
    """Train every run of ``configs`` at once; returns their Histories, in order.

    Each run is :func:`run`'s loop with its own strategy, clients, History and checkpoint; what
    they share is the training of their clients, which runs as one batch of models every round
    (``fedlib.engine.lockstep``: the runs must share the data, the model and the local training's
    E, B, momentum, weight decay and mu; they may differ in eta, the seed, the partition, C, K,
    the rounds, the target and the server side of the method). Each History equals the one
    ``run(config, data)`` gives with the vectorized engine, up to float rounding. data: the
    dataset all runs train on (else loaded by name). checkpoints: one path (or None) per run.
    on_round: called with (the run's position, its round's record).
    """
    if isinstance(configs, FedAvgConfig) or not isinstance(configs, Iterable):
        raise TypeError(f"configs must be a list of FedAvgConfig, got {type(configs).__name__}")
    configs = list(configs)
    if not configs:
        raise InputError("configs must hold at least one run, got none")
    if not all(isinstance(c, FedAvgConfig) for c in configs):
        raise TypeError("configs must be a list of FedAvgConfig, got "
                        + ", ".join(sorted({type(c).__name__ for c in configs})))
    if on_round is not None and not callable(on_round):
        raise TypeError(f"on_round must be a function of (run, RoundRecord) (or None), got {type(on_round).__name__}")
    if checkpoints is not None and len(checkpoints) != len(configs):
        raise InputError(f"checkpoints must hold one path (or None) per run ({len(configs)}), got {len(checkpoints)}")
    first = configs[0].validate()
    if data is None:
        data = load_dataset(first.dataset, scaling=first.input_scaling, device="cpu")
    lockstep = Lockstep()
    jobs = [Job(c, data, lockstep.member(i)) for i, c in enumerate(configs)]
    lockstep.join(jobs, max_examples_per_step)
    check_memory(jobs)
    trackers = [Tracker(job, checkpoints[i] if checkpoints else None, checkpoint_every) for i, job in enumerate(jobs)]
    loops = {i: rounds(t.w_t, job.backend, job.strategy, job.config.num_clients, job.config.frac,
                       job.config.rounds, t.next_round) for i, (job, t) in enumerate(zip(jobs, trackers))}
    total = sum(c.rounds for c in configs)
    with jobs[0].random_state(), progress_bar(total, sum(len(t.history.records) for t in trackers), progress,
                                              "FedAvg runs") as bar, interrupts(trackers):
        while active := [i for i, t in enumerate(trackers) if not t.done]:
            lockstep.train({i: (trackers[i].w_t, trackers[i].next_round) for i in active})
            for i in active:
                record = trackers[i].add(next(loops[i]))
                if on_round:
                    on_round(i, record)
            bar.update(len(active))
    return [t.result() for t in trackers]
