"""The server side of FedAvg: sample clients, collect their updates, average.

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
Algorithm 1.) FedSGD is the same loop with E = 1 and B = infinity. :func:`run` is this
loop with an evaluation of the global model after each round, a
:class:`~fedlib.metrics.History`, and what a long run needs around it: a checkpoint to
resume from, stopping rules and a progress bar, each in a small helper below the loop.

The methods of lessons 8 and 9 change one step each, and their defaults are FedAvg: FedProx
and SCAFFOLD the local update (``mu``, ``scaffold``; see ``fedlib.algorithms``), the
server optimizers the last line (``server_opt``, ``server_lr``, ``server_momentum``),
and DP-FedAvg the sampling and the average (``dp_clip``, ``dp_noise``; ``fedlib.privacy``).
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fedlib import params as P
from fedlib.algorithms import Scaffold, ServerOptimizer
from fedlib.client import ClientResult, Weights, local_update
from fedlib.config import ENGINES, FedAvgConfig
from fedlib.data import Dataset, load_dataset
from fedlib.engine import sequential_is_faster, vectorized_local_updates, vectorized_unsupported_reason
from fedlib.files import atomic_write_bytes, check_output
from fedlib.metrics import History, RoundRecord, evaluate
from fedlib.models import build_model, initialize, model_bytes
from fedlib.params import InputError
from fedlib.runtime import get_device
from fedlib.privacy import dp_aggregate, sample_clients_poisson
from fedlib.seeds import dropout_seed, noise_generator, sampling_rng, shuffle_generator

__all__ = ["FedAvgConfig", "RunInterrupted", "ServerState", "fedavg", "initial_model", "num_selected",
           "resolve_engine", "run", "run_round", "sample_clients", "select_clients", "weighted_mean"]


def fedavg(weights_list: Sequence[Weights], num_examples: Sequence[int]) -> Weights:
    """The n_k-weighted average of the clients' weights: sum_k (n_k / m_t) w_k.

    weights_list: one state dict per client of the round; num_examples: their n_k.
    m_t = the examples of this round's clients.
    """
    if len(weights_list) == 0:
        raise InputError("weights_list must hold at least one client's weights, got none")
    if len(weights_list) != len(num_examples):
        raise InputError(f"num_examples must have one n_k per client ({len(weights_list)}), got {len(num_examples)}")
    if any(n < 0 for n in num_examples) or sum(num_examples) <= 0:
        raise InputError(f"num_examples must be >= 0 with a positive sum, got {list(num_examples)}")
    m_t = float(sum(num_examples))
    return {name: sum((n_k / m_t) * w_k[name] for w_k, n_k in zip(weights_list, num_examples))
            for name in weights_list[0]}


def weighted_mean(values: Sequence[float], num_examples: Sequence[int]) -> float:
    """sum_k (n_k / m_t) v_k: a per-client number (a training loss) averaged like the weights."""
    return sum(v * n_k for v, n_k in zip(values, num_examples)) / sum(num_examples)


def num_selected(num_clients: int, frac: float) -> int:
    """m = max(C * K, 1): how many clients take part in each round."""
    return max(int(frac * num_clients), 1)


def sample_clients(num_clients: int, frac: float, rng: np.random.Generator) -> np.ndarray:
    """S_t: m = max(C * K, 1) distinct clients drawn uniformly without replacement, sorted."""
    P.NUM_CLIENTS.check("num_clients", num_clients)
    P.FRAC.check("frac", frac)
    return np.sort(rng.choice(num_clients, size=num_selected(num_clients, frac), replace=False))


def select_clients(config: FedAvgConfig, t: int) -> np.ndarray:
    """S_t: FedAvg's m = max(C K, 1) clients, or, for DP-FedAvg, each client with probability C."""
    rng = sampling_rng(config.seed, t)
    if config.dp_clip is not None:
        return sample_clients_poisson(config.num_clients, config.frac, rng)
    return sample_clients(config.num_clients, config.frac, rng)


class ServerState:
    """What the server keeps between rounds besides w_t: SCAFFOLD's control variates and the
    server optimizer (each None when the config asks for FedAvg's own step)."""

    def __init__(self, config: FedAvgConfig, w_0: Weights):
        self.scaffold = Scaffold(w_0, config.num_clients) if config.scaffold else None
        plain = config.server_opt == "sgd" and config.server_lr == 1 and config.server_momentum == 0
        self.optimizer = None if plain else ServerOptimizer(w_0, config.server_opt, config.server_lr,
                                                            config.server_momentum, config.server_beta2,
                                                            config.server_tau)

    def state_dict(self) -> dict:
        return {"scaffold": self.scaffold.state_dict() if self.scaffold else None,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaffold:
            self.scaffold.load_state_dict(state["scaffold"])
        if self.optimizer:
            self.optimizer.load_state_dict(state["optimizer"])


def initial_model(config: FedAvgConfig, num_classes: int = 10, input_shape: tuple[int, ...] | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with w_0, the initial weights drawn from the run's seed as ``config.init``
    says (PyTorch's default, or a TensorFlow-style initialiser: ``fedlib.models.initialize``).

    fedlib.run, Flower's ServerApp and the lessons all start from this, so their runs
    begin from the identical model. The caller's random state is left alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = initialize(build_model(config.model, num_classes, input_shape), config.init)
    return model.to(device=device, dtype=dtype)


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
        warnings.warn(f"engine='auto' falls back to 'sequential': {reason}", stacklevel=2)
        return "sequential"
    if engine == "auto":
        return "sequential" if sequential_is_faster(model) else "vectorized"
    return engine


def client_updates(model: nn.Module, w_t: Weights, data: Dataset, client_indices: list[torch.Tensor],
                   selected: np.ndarray, config: FedAvgConfig, t: int, scaffold: Scaffold | None = None
                   ) -> list[ClientResult]:
    """ClientUpdate(k, w_t) for every k in S_t, one client after another."""
    results = []
    for k in selected:
        idx = client_indices[k]
        torch.manual_seed(dropout_seed(config.seed, t, k))
        results.append(local_update(model, data.x_train[idx], data.y_train[idx], weights=w_t,
                                    epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
                                    momentum=config.momentum, weight_decay=config.weight_decay,
                                    generator=shuffle_generator(config.seed, t, k), mu=config.mu,
                                    correction=scaffold.correction(k) if scaffold else None))
    return results


def vectorized_client_updates(model: nn.Module, w_t: Weights, data: Dataset, client_indices: list[torch.Tensor],
                              selected: np.ndarray, config: FedAvgConfig, t: int,
                              scaffold: Scaffold | None = None) -> list[ClientResult]:
    """The same ClientUpdates, all clients at once (``fedlib.engine``), as ClientResults; each
    client draws its dropout masks from its own stream, as in ``client_updates``."""
    result = vectorized_local_updates(model, data.x_train, data.y_train, [client_indices[k] for k in selected],
                                      [shuffle_generator(config.seed, t, k) for k in selected], weights=w_t,
                                      epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
                                      momentum=config.momentum, weight_decay=config.weight_decay, mu=config.mu,
                                      corrections=[scaffold.correction(k) for k in selected] if scaffold else None,
                                      dropout_generators=[torch.Generator().manual_seed(dropout_seed(config.seed, t, k))
                                                          for k in selected])
    return [ClientResult(result.client(i), int(result.num_examples[i]), float(result.train_loss[i]),
                         int(result.steps[i])) for i in range(len(selected))]


def run_round(model: nn.Module, w_t: Weights, data: Dataset, client_indices: list[torch.Tensor],
              selected: np.ndarray, config: FedAvgConfig, t: int, engine: str = "sequential",
              state: ServerState | None = None) -> tuple[Weights, float]:
    """One round: ClientUpdate for the clients in S_t, then their n_k-weighted average.

    Returns w_{t+1} and the clients' mean training loss (weighted by n_k, like the weights;
    nan if S_t is empty, which only DP-FedAvg's sampling allows). ``state`` holds what the
    methods of lesson 8 keep between rounds (None: FedAvg).
    """
    scaffold = state.scaffold if state else None
    updates = vectorized_client_updates if engine == "vectorized" and len(selected) else client_updates
    results = updates(model, w_t, data, client_indices, selected, config, t, scaffold)
    clients, n = [r.weights for r in results], [r.num_examples for r in results]
    if scaffold:
        scaffold.update(w_t, list(selected), clients, [r.steps for r in results], config.lr)
    if config.dp_clip is not None:
        w_next = dp_aggregate(w_t, clients, config.dp_clip, config.dp_noise, config.frac * config.num_clients,
                              noise_generator(config.seed, t))
    else:
        w_next = fedavg(clients, n)
    if state and state.optimizer:
        w_next = state.optimizer.step(w_t, w_next)
    train_loss = weighted_mean([r.train_loss for r in results], n) if results else math.nan
    return w_next, train_loss


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, through the command line) stopped a run; ``rounds_done`` rounds
    are complete, and saved in ``checkpoint`` if the run had one."""

    def __init__(self, rounds_done: int, checkpoint: Path | None):
        super().__init__(f"interrupted after {rounds_done} complete rounds")
        self.rounds_done, self.checkpoint = rounds_done, checkpoint


def run(config: FedAvgConfig, data: Dataset | None = None, *, progress: bool = True,
        checkpoint: str | Path | None = None, checkpoint_every: int = 10,
        on_round: Callable[[RoundRecord], None] | None = None) -> History:
    """Train with FedAvg as ``config`` says and return the run's History.

    data: a dataset already loaded (else it is loaded by name); the model trains in
    the dtype of its images (float32; the tests pass float64). checkpoint: a file the
    global weights and history are saved to every ``checkpoint_every`` rounds, when the
    run ends and when it is interrupted; if it exists when the run starts, the run
    resumes from it and gives the same history as an uninterrupted run. on_round: called
    with each round's record. A run whose training loss becomes inf or nan (too large
    an lr) stops in that round with a warning: nothing can be learned from then on.
    Random numbers come from ``fedlib.seeds``; the caller's random state is left alone.
    """
    config.validate()
    saver = Checkpoint(checkpoint, config, checkpoint_every) if checkpoint else None
    device = get_device(config.device)
    data = (data or load_dataset(config.dataset)).to(device)
    model = initial_model(config, data.num_classes, data.input_shape, device, data.x_train.dtype)   # w_0
    engine = resolve_engine(config.engine, model)
    client_indices = [torch.as_tensor(idx, device=device) for idx in config.split(data.y_train)]   # the P_k
    w_t = {name: value.detach().clone() for name, value in model.state_dict().items()}
    state = ServerState(config, w_t)            # control variates, server optimizer (lesson 8)
    history = History(config=asdict(config) | {"engine_used": engine}, device=str(device))
    if saver:
        w_t, history = saver.resume(w_t, history, device, state)
    done = (w_t, len(history.records), state.state_dict())    # the last complete round: what a checkpoint holds

    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), ProgressBar(config, history, progress) as bar:
        try:
            for t in range(len(history.records) + 1, config.rounds + 1):
                if finished(history, config):
                    break
                began = time.perf_counter()
                S_t = select_clients(config, t)
                w_t, train_loss = run_round(model, w_t, data, client_indices, S_t, config, t, engine, state)
                record = round_record(model, w_t, data, config, t, S_t, train_loss, began, history)
                history.records.append(record)
                done = (w_t, len(history.records), state.state_dict())
                bar.update_round(record)
                if saver and (t % saver.every == 0 or finished(history, config) or t == config.rounds):
                    saver.save(w_t, history, state.state_dict())
                if on_round:
                    on_round(record)
        except KeyboardInterrupt:
            w_done, rounds_done, state_done = done
            del history.records[rounds_done:]
            if saver:
                saver.save(w_done, history, state_done)
            raise RunInterrupted(rounds_done, saver.path if saver else None) from None
    model.load_state_dict(w_t)
    history.model = model
    return history


# --- what runs around the loop ------------------------------------------------------------------

def diverged(history: History) -> bool:
    """Whether the last round's training loss is inf or nan (the weights are then useless).
    A round without clients (possible only with DP-FedAvg's sampling) has no loss, and is fine."""
    return bool(history.records) and bool(history.records[-1].clients) \
        and not math.isfinite(history.records[-1].train_loss)


def reached_target(history: History, config: FedAvgConfig) -> bool:
    return config.target is not None and any(a >= config.target for a in history.accuracies)


def finished(history: History, config: FedAvgConfig) -> bool:
    """Whether the run stops before its last round: it diverged, or reached its target
    with ``stop_at_target``."""
    return diverged(history) or (config.stop_at_target and reached_target(history, config))


def round_record(model: nn.Module, w_t: Weights, data: Dataset, config: FedAvgConfig, t: int,
                 selected: np.ndarray, train_loss: float, began: float, history: History) -> RoundRecord:
    """Round t's record: its clients, training loss and, when due, the test accuracy of w_{t+1}.

    The global model is evaluated every ``eval_every`` rounds, in the last round, and in a
    round whose training diverged (which ends the run, so it gets a final evaluation).
    """
    accuracy = loss = None
    stops = len(selected) > 0 and not math.isfinite(train_loss)
    if stops:
        warnings.warn(f"training diverged in round {t} (train loss {train_loss}); the run stops here. "
                      f"A smaller lr (now {config.lr}) usually helps.", stacklevel=3)
    if t % config.eval_every == 0 or t == config.rounds or stops:
        model.load_state_dict(w_t)
        accuracy, loss = evaluate(model, data.x_test, data.y_test)
    per_client = model_bytes(model) * (2 if config.scaffold else 1)      # SCAFFOLD also uploads c_k+ - c_k
    uploaded = (history.records[-1].bytes_uploaded if history.records else 0) + len(selected) * per_client
    return RoundRecord(t, selected.tolist(), accuracy, loss, train_loss, time.perf_counter() - began, uploaded)


class ProgressBar:
    """A tqdm bar over the rounds that shows the last accuracy; closed however the run ends."""

    def __init__(self, config: FedAvgConfig, history: History, enabled: bool):
        self.bar = tqdm(total=config.rounds, initial=len(history.records), unit="round", disable=not enabled,
                        desc=f"FedAvg {config.model} {config.partition}")

    def update_round(self, record: RoundRecord) -> None:
        if record.test_accuracy is not None:
            self.bar.set_postfix(acc=f"{record.test_accuracy:.4f}", loss=f"{record.test_loss:.4f}")
        self.bar.update()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class Checkpoint:
    """A run's w_t and History in one file, to resume from after a stop.

    The file holds only tensors and plain Python values and is read with
    ``torch.load(weights_only=True)``, which refuses anything else: a crafted file
    cannot run code. The path is checked when the run starts, so a path that cannot
    be written is refused before any training.
    """

    FORMAT = "fedlib-checkpoint-1"

    def __init__(self, path: str | Path, config: FedAvgConfig, every: int):
        P.CHECKPOINT_EVERY.check("checkpoint_every", every)
        self.path = check_output(path)
        self.config, self.every = config, every

    def save(self, w_t: Weights, history: History, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save({"format": self.FORMAT, "config": asdict(self.config),
                    "weights": {k: v.detach().cpu() for k, v in w_t.items()}, "history": history.to_dict(),
                    "state": state}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def resume(self, w_0: Weights, fresh: History, device: torch.device,
               state: ServerState) -> tuple[Weights, History]:
        """The saved w_t and History if the file exists (else ``w_0`` and ``fresh``); the
        server's state between rounds is loaded into ``state``."""
        if not self.path.exists():
            return w_0, fresh
        fix = "delete it or pass another checkpoint path"
        try:
            saved = torch.load(self.path, map_location=device, weights_only=True)
        except Exception as error:                       # whatever the file holds, it is not ours
            reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
            raise InputError(f"checkpoint {self.path} is not a fedlib checkpoint that can be read safely "
                             f"({reason}); {fix}") from None
        if not isinstance(saved, dict) or saved.get("format") != self.FORMAT:
            raise InputError(f"checkpoint {self.path} is not a fedlib checkpoint ({self.FORMAT}); {fix}")
        if saved.get("config") != asdict(self.config):
            raise InputError(f"checkpoint {self.path} belongs to a run with another configuration; {fix}")
        weights = saved.get("weights")
        if not isinstance(weights, dict) or {k: tuple(v.shape) for k, v in weights.items()
                                             if isinstance(v, torch.Tensor)} != {k: tuple(v.shape) for k, v in w_0.items()}:
            raise InputError(f"checkpoint {self.path} holds weights of another model; {fix}")
        try:
            history = History.from_dict(saved.get("history"))
            state.load_state_dict(saved["state"])
        except (InputError, KeyError, TypeError, ValueError) as error:
            raise InputError(f"checkpoint {self.path} is not a complete fedlib checkpoint ({error}); {fix}") from None
        history.config["engine_used"] = fresh.config["engine_used"]
        return {k: v.to(device=device, dtype=w_0[k].dtype) for k, v in weights.items()}, history
