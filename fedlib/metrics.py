"""Measuring a run: test accuracy, the per-round history, rounds to a target.

A :class:`History` holds one :class:`RoundRecord` per round together with the full
configuration and the library versions, and saves to / loads from JSON.
:func:`rounds_to_target` reads off how many rounds a run needed, the paper's way.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedlib.data import IGNORE_INDEX
from fedlib.files import atomic_write_text
from fedlib.params import InputError
from fedlib.version import __version__


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """Accuracy and mean cross-entropy loss of ``model`` on (x, y), in large batches.

    x: (N, C, H, W); y: (N,). Sequences: x (N, T) character ids, y (N, T) the next
    characters; then both are per character, over every target but ``IGNORE_INDEX``
    (padding), not per sequence. No autograd, dropout off (``model.eval()``).
    """
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    counted = torch.zeros((), dtype=torch.int64, device=y.device)
    total_loss = torch.zeros((), device=y.device)
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        real = target != IGNORE_INDEX
        total_loss += F.cross_entropy(logits, target, reduction="sum")      # skips IGNORE_INDEX itself
        correct += ((logits.argmax(1) == target) & real).sum()
        counted += real.sum()
    return correct.item() / counted.item(), total_loss.item() / counted.item()


@dataclass
class RoundRecord:
    """What happened in one round t.

    test_accuracy / test_loss are None in rounds that were not evaluated
    (see ``eval_every``). bytes_uploaded is cumulative: every selected client
    uploads its whole model (float32) once per round.
    """

    round: int
    clients: list[int]
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float
    seconds: float
    bytes_uploaded: int


def versions() -> dict[str, str]:
    """Versions that decide the numbers a run produces."""
    return {"fedlib": __version__, "torch": str(torch.__version__), "numpy": str(np.__version__),
            "python": platform.python_version()}


def diverged(record: RoundRecord) -> bool:
    """Whether training broke down in this round: its clients' mean training loss is inf or nan,
    or the global model it produced is (its test loss, when evaluated, is inf or nan; a run
    evaluates every round whose weights are not finite). A round without clients, which only
    DP-FedAvg's sampling allows, has no training loss and has not diverged."""
    return (bool(record.clients) and not math.isfinite(record.train_loss)) \
        or (record.test_loss is not None and not math.isfinite(record.test_loss))


@dataclass
class History:
    """The whole record of a run: its configuration, versions and one record per round."""

    config: dict[str, Any]
    records: list[RoundRecord] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=versions)
    device: str = "cpu"
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the final global model, not saved

    def evaluated(self) -> list[RoundRecord]:
        """The records of the rounds in which the global model was evaluated."""
        return [r for r in self.records if r.test_accuracy is not None]

    @property
    def rounds(self) -> list[int]:
        """Evaluated round numbers (x axis of an accuracy curve)."""
        return [r.round for r in self.evaluated()]

    @property
    def accuracies(self) -> list[float]:
        """Test accuracy at each evaluated round."""
        return [r.test_accuracy for r in self.evaluated()]

    @property
    def final_accuracy(self) -> float | None:
        acc = self.accuracies
        return acc[-1] if acc else None

    @property
    def best_accuracy(self) -> float | None:
        acc = self.accuracies
        return max(acc) if acc else None

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    @property
    def diverged(self) -> bool:
        """Whether the run's last round diverged (:func:`diverged`), which ends a run."""
        return bool(self.records) and diverged(self.records[-1])

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "versions": self.versions, "device": self.device,
                "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "History":
        """A History from its saved form; InputError says what is wrong with a malformed one."""
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict) \
                or not isinstance(data.get("records"), list):
            raise InputError("a history must be a mapping with a 'config' mapping and a 'records' list")
        names = {f.name for f in fields(RoundRecord)}
        for i, r in enumerate(data["records"]):
            if not isinstance(r, dict) or set(r) != names:
                raise InputError(f"record {i} of the history must have exactly the keys {sorted(names)}")
        return cls(config=data["config"], records=[RoundRecord(**r) for r in data["records"]],
                   versions=dict(data.get("versions", {})), device=str(data.get("device", "cpu")))

    def save(self, path: str | os.PathLike) -> None:
        """Write the history as JSON, whole or not at all."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "History":
        """Read a history saved by :meth:`save`; InputError names a file that is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"no such run file: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"not a fedlib history file: {path} ({error})") from None
        try:
            return cls.from_dict(data)
        except InputError as error:
            raise InputError(f"not a fedlib history file: {path} ({error})") from None


def client_drift(w_t: dict[str, torch.Tensor], client_weights: Sequence[dict[str, torch.Tensor]],
                 num_examples: Sequence[int]) -> tuple[list[float], list[float]]:
    """How far each client of a round moved from w_t, and how much the clients agree.

    Returns, per client k: ||Delta_k||, the L2 norm of Delta_k = w_k - w_t over all its
    parameters, and cos(Delta_k, Delta), the cosine between Delta_k and the round's n_k-weighted
    average update Delta (1: the client moved where the average moved; 0: at right angles).
    """
    def flat(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(w[name] - w_t[name]).flatten().double() for name in w_t])
    deltas = [flat(w_k) for w_k in client_weights]
    total = float(sum(num_examples))
    average = sum(d * (n_k / total) for d, n_k in zip(deltas, num_examples))
    norms = [d.norm().item() for d in deltas]
    cosines = [F.cosine_similarity(d, average, dim=0).item() for d in deltas]
    return norms, cosines


def rounds_to_target(history: History | Sequence[float] | Iterable[tuple[int, float]],
                     target: float) -> float | None:
    """Rounds needed to reach ``target`` test accuracy, computed as in the paper.

    The accuracy curve is first made monotone (best accuracy so far), then the
    crossing is linearly interpolated between the last evaluated round below the
    target and the first at or above it. Returns None when the target is never
    reached. ``history`` may be a History, a list of accuracies for rounds 1, 2, ...,
    or (round, accuracy) pairs.
    """
    if isinstance(history, History):
        points = list(zip(history.rounds, history.accuracies))
    else:
        items = list(history)
        points = [tuple(p) for p in items] if items and isinstance(items[0], (tuple, list)) \
            else list(enumerate(items, start=1))
    best = -np.inf
    previous = None
    for rnd, acc in points:
        best = max(best, acc)
        if best >= target:
            if previous is None or previous[1] == best:
                return float(rnd)
            r0, a0 = previous
            return float(r0 + (target - a0) / (best - a0) * (rnd - r0))
        previous = (rnd, best)
    return None
