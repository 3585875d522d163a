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

FedSGD is the same loop with E=1 and B=infinity. :func:`run` is this loop with a
test-set evaluation after each round and a :class:`~fedlib.metrics.History`.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fedlib.client import ClientResult, Weights, check_hyperparameters, local_update
from fedlib.data import DATASETS, Dataset, load_dataset
from fedlib.engine import sequential_is_faster, vectorized_local_updates, vectorized_unsupported_reason
from fedlib.metrics import History, RoundRecord, atomic_write_bytes, evaluate
from fedlib.models import MODELS, build_model, model_bytes
from fedlib.partition import PARTITIONS, make_partition
from fedlib.runtime import derive_seed, get_device

ENGINES = ("auto", "vectorized", "sequential")


def fedavg(weights_list: Sequence[Weights], num_examples: Sequence[int]) -> Weights:
    """The n_k-weighted average of the clients' weights: sum_k (n_k / m_t) w_k.

    weights_list: one state dict per client of the round; num_examples: their n_k.
    Weighting by n_k / m_t (m_t = the examples of this round's clients) is the
    form of the paper's erratum.
    """
    if len(weights_list) == 0:
        raise ValueError("weights_list must hold at least one client's weights, got none")
    if len(weights_list) != len(num_examples):
        raise ValueError(f"num_examples must have one n_k per client ({len(weights_list)}), got {len(num_examples)}")
    if any(n < 0 for n in num_examples) or sum(num_examples) <= 0:
        raise ValueError(f"num_examples must be >= 0 with a positive sum, got {list(num_examples)}")
    m_t = float(sum(num_examples))
    return {name: sum((n_k / m_t) * w_k[name] for w_k, n_k in zip(weights_list, num_examples))
            for name in weights_list[0]}


def num_selected(num_clients: int, frac: float) -> int:
    """m = max(C * K, 1): how many clients take part in each round."""
    return max(int(frac * num_clients), 1)


def sample_clients(num_clients: int, frac: float, rng: np.random.Generator) -> np.ndarray:
    """S_t: m = max(C * K, 1) distinct clients drawn uniformly without replacement."""
    if num_clients < 1:
        raise ValueError(f"num_clients (K) must be >= 1, got {num_clients}")
    if not 0 <= frac <= 1:
        raise ValueError(f"frac (C) must be in [0, 1], got {frac}")
    return np.sort(rng.choice(num_clients, size=num_selected(num_clients, frac), replace=False))


@dataclass
class FedAvgConfig:
    """Every knob of a FedAvg run, with the paper's names and MNIST defaults.

    num_clients: K; frac: C (0 means one client per round); local_epochs: E;
    batch_size: B (None = infinity); lr: eta. The partition's own parameters
    (shards_per_client, shard_size, alpha, min_size, sigma) are read only by the
    partition that uses them. One ``seed`` drives partitioning, client sampling,
    shuffling, dropout and initialisation.
    """

    dataset: str = "mnist"
    model: str = "2nn"
    partition: str = "iid"
    num_clients: int = 100
    frac: float = 0.1
    local_epochs: int = 1
    batch_size: int | None = 10
    lr: float = 0.1
    rounds: int = 10
    seed: int = 0
    eval_every: int = 1
    device: str = "auto"
    engine: str = "auto"
    momentum: float = 0.0
    weight_decay: float = 0.0
    shards_per_client: int = 2
    shard_size: int | None = None
    alpha: float = 0.5
    min_size: int = 10
    sigma: float = 1.0
    target: float | None = None
    stop_at_target: bool = False

    def validate(self) -> "FedAvgConfig":
        """Raise ValueError naming the first parameter outside its allowed range."""
        choices = {"dataset": DATASETS, "model": tuple(MODELS), "partition": PARTITIONS,
                   "engine": ENGINES, "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients (K) must be >= 1, got {self.num_clients}")
        if not 0 <= self.frac <= 1:
            raise ValueError(f"frac (C) must be in [0, 1], got {self.frac}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.target is not None and not 0 < self.target <= 1:
            raise ValueError(f"target must be in (0, 1], got {self.target}")
        check_hyperparameters(self.local_epochs, self.batch_size, self.lr, self.momentum, self.weight_decay)
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "FedAvgConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    reason = vectorized_unsupported_reason(model)
    if engine == "vectorized" and reason:
        raise ValueError(f"engine='vectorized' cannot run this model: {reason}; use 'sequential'")
    if engine == "auto" and reason:
        warnings.warn(f"engine='auto' falls back to 'sequential': {reason}", stacklevel=2)
        return "sequential"
    if engine == "auto":
        return "sequential" if sequential_is_faster(model) else "vectorized"
    return engine


def client_generator(seed: int, t: int, k: int) -> torch.Generator:
    """Client k's shuffling stream in round t, derived from the run's one seed, so both
    engines (and a resumed run) draw exactly the same minibatches."""
    return torch.Generator().manual_seed(derive_seed(seed, 2, t, int(k)))


def client_updates(model: nn.Module, w_t: Weights, data: Dataset, client_indices: list[torch.Tensor],
                   selected: np.ndarray, config: FedAvgConfig, t: int) -> list[ClientResult]:
    """ClientUpdate(k, w_t) for every k in S_t, one client after another."""
    results = []
    for k in selected:
        idx = client_indices[k]
        results.append(local_update(model, data.x_train[idx], data.y_train[idx], weights=w_t,
                                    epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
                                    momentum=config.momentum, weight_decay=config.weight_decay,
                                    generator=client_generator(config.seed, t, k)))
    return results


def run_round(model: nn.Module, w_t: Weights, data: Dataset, client_indices: list[torch.Tensor],
              selected: np.ndarray, config: FedAvgConfig, t: int, engine: str = "sequential"
              ) -> tuple[Weights, float]:
    """One round: local updates of the clients in S_t, then their n_k-weighted average.

    Returns w_{t+1} and the clients' mean training loss (weighted by n_k).
    """
    torch.manual_seed(derive_seed(config.seed, 3, t))       # dropout masks of this round
    if engine == "vectorized":                               # all clients at once, same batches
        shuffles = [client_generator(config.seed, t, k) for k in selected]
        result = vectorized_local_updates(model, data.x_train, data.y_train, [client_indices[k] for k in selected],
                                          shuffles, weights=w_t, epochs=config.local_epochs,
                                          batch_size=config.batch_size, lr=config.lr,
                                          momentum=config.momentum, weight_decay=config.weight_decay)
        return result.average(), result.mean_train_loss()
    results = client_updates(model, w_t, data, client_indices, selected, config, t)
    n = [r.num_examples for r in results]
    w_next = fedavg([r.weights for r in results], n)
    train_loss = sum(r.train_loss * n_k for r, n_k in zip(results, n)) / sum(n)
    return w_next, train_loss


def _save_checkpoint(path: Path, config: FedAvgConfig, weights: Weights, history: History) -> None:
    buffer = io.BytesIO()
    torch.save({"config": asdict(config), "weights": {k: v.cpu() for k, v in weights.items()},
                "history": history.to_dict()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path, config: FedAvgConfig, device: torch.device) -> tuple[Weights, History] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location=device, weights_only=False)
    if state["config"] != asdict(config):
        raise ValueError(f"checkpoint {path} belongs to a run with another configuration; "
                         "delete it or pass a different checkpoint path")
    return state["weights"], History.from_dict(state["history"])


def run(config: FedAvgConfig, data: Dataset | None = None, *, progress: bool = True,
        checkpoint: str | Path | None = None, checkpoint_every: int = 10,
        on_round: Callable[[RoundRecord], None] | None = None) -> History:
    """Train with FedAvg as ``config`` says and return the run's History.

    data: a dataset already loaded (else it is loaded by name); the model trains in
    the dtype of its images (float32; the tests pass float64). checkpoint: a file
    the global weights and history are saved to every ``checkpoint_every`` rounds;
    if it exists when the run starts, the run resumes from it and gives the same
    history as an uninterrupted run. on_round: called with each round's record.
    A run whose training loss becomes inf or nan (too large an lr) stops in that
    round with a warning: nothing can be learned from then on.
    """
    config.validate()
    device = get_device(config.device)
    data = (data or load_dataset(config.dataset)).to(device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.num_classes, data.input_shape)
    model = model.to(device=device, dtype=data.x_train.dtype)      # float32, or float64 for exact tests
    engine = resolve_engine(config.engine, model)
    partition = make_partition(config.partition, data.y_train, config.num_clients, config.seed,
                               shards_per_client=config.shards_per_client, shard_size=config.shard_size,
                               alpha=config.alpha, min_size=config.min_size, sigma=config.sigma)
    client_indices = [torch.as_tensor(p, device=device) for p in partition]
    w_t = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history = History(config=asdict(config), device=str(device))
    history.config["engine_used"] = engine

    resumed = _load_checkpoint(Path(checkpoint), config, device) if checkpoint else None
    if resumed:
        w_t, history = resumed
    start = len(history.records) + 1
    uploaded = history.records[-1].bytes_uploaded if history.records else 0
    reached = config.target is not None and any(a >= config.target for a in history.accuracies)

    bar = tqdm(range(start, config.rounds + 1), initial=start - 1, total=config.rounds,
               desc=f"FedAvg {config.model} {config.partition}", disable=not progress, unit="round")
    for t in bar:
        if reached and config.stop_at_target:
            break
        began = time.perf_counter()
        selected = sample_clients(config.num_clients, config.frac, np.random.default_rng(derive_seed(config.seed, 1, t)))
        w_t, train_loss = run_round(model, w_t, data, client_indices, selected, config, t, engine)
        uploaded += len(selected) * model_bytes(model)
        accuracy = loss = None
        if t % config.eval_every == 0 or t == config.rounds:
            model.load_state_dict(w_t)
            accuracy, loss = evaluate(model, data.x_test, data.y_test)
            bar.set_postfix(acc=f"{accuracy:.4f}", loss=f"{loss:.4f}")
            reached = reached or (config.target is not None and accuracy >= config.target)
        record = RoundRecord(t, selected.tolist(), accuracy, loss, train_loss, time.perf_counter() - began, uploaded)
        history.records.append(record)
        if on_round:
            on_round(record)
        if not math.isfinite(train_loss):        # diverged: the weights are inf/nan from now on
            warnings.warn(f"training diverged in round {t} (train loss {train_loss}); the run stops here. "
                          f"A smaller lr (now {config.lr}) usually helps.", stacklevel=2)
            if checkpoint:
                _save_checkpoint(Path(checkpoint), config, w_t, history)
            break
        if checkpoint and (t % checkpoint_every == 0 or t == config.rounds or (reached and config.stop_at_target)):
            _save_checkpoint(Path(checkpoint), config, w_t, history)
    bar.close()
    model.load_state_dict(w_t)
    history.model = model
    return history
