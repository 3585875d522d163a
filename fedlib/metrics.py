"""Measuring a run: test accuracy, the per-round history, rounds to a target.

A :class:`History` holds one :class:`RoundRecord` per round together with the full
configuration and the library versions, and saves to / loads from JSON.
:func:`rounds_to_target` reads off how many rounds a run needed, the paper's way.
"""

from __future__ import annotations

import math
import numbers
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedlib.data import IGNORE_INDEX
from fedlib.files import atomic_write_text, load_json, to_json
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
    uploads its whole model (float32) once per round. A strategy whose sample is secret
    (DP-FedAvg, ``secret_sample``) records no clients, no training loss (nan) and the expected
    uploads, q K clients a round.
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
        """The History as plain JSON values: a loss that is not a finite number (a diverged round's,
        or the training loss of a round without clients) is None, and ``diverged`` says whether
        the run ended because its training diverged (:func:`diverged`)."""
        records = [asdict(r) | {"train_loss": _finite_or_none(r.train_loss),
                                "test_loss": _finite_or_none(r.test_loss)} for r in self.records]
        return {"config": self.config, "versions": self.versions, "device": self.device, "records": records,
                "diverged": self.diverged}

    @classmethod
    def from_dict(cls, data: object) -> "History":
        """A History from its saved form, checked field by field (:func:`check_history`);
        InputError names the first field that is wrong."""
        return cls(**check_history(data))

    def save(self, path: str | os.PathLike) -> None:
        """Write the history as strict JSON (no bare NaN), whole or not at all."""
        atomic_write_text(path, to_json(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "History":
        """Read a history saved by :meth:`save`; InputError names a file that is not one."""
        try:
            return cls.from_dict(load_json(path))
        except FileNotFoundError:
            raise InputError(f"no such run file: {path}") from None
        except InputError as error:
            raise InputError(f"not a fedlib history file: {path} ({error})") from None


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _real(value: object) -> bool:
    """A JSON number: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: object) -> bool:
    """A real number of any type (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_history(data: object) -> dict[str, Any]:
    """The fields of a saved History, checked one by one: InputError names the first that is wrong.

    config: a run's configuration, a mapping of parameter names to plain values (text, numbers,
    True/False, None), its num_clients K an integer >= 1 if given (the readers above this floor check it
    whole: ``fedlib.config.saved_config``); versions: names to version strings;
    device: a string; records: one per round, rounds 1, 2, ... in order, each with exactly
    RoundRecord's fields: clients distinct indices in [0, K) in increasing order, test_accuracy
    None or in [0, 1], test_loss None where the round was not evaluated, train_loss and test_loss
    finite numbers or None for "not a finite number" (also NaN or Infinity, as older files wrote
    it), seconds finite and >= 0, bytes_uploaded a count that never decreases; diverged (optional:
    older files lack it) must agree with the records. Returns History's keyword arguments.
    """
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) \
            or not isinstance(data.get("records"), list):  # pragma: no mutate block
        raise InputError("a history must be a mapping with a 'config' mapping and a 'records' list")
    unknown = sorted(map(str, set(data) - {"config", "versions", "device", "records", "diverged"}))
    if unknown:  # pragma: no mutate block
        raise InputError(f"a history has no fields {unknown}")
    config = data["config"]
    if not all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float))) for k, v in config.items()):  # pragma: no mutate block
        raise InputError("its config must map parameter names to plain values (text, numbers, True/False, None)")
    num_clients = config.get("num_clients", math.inf)         # K bounds the clients' indices
    if num_clients != math.inf and (not _count(num_clients) or num_clients < 1):  # pragma: no mutate block
        raise InputError(f"its config's num_clients must be an integer >= 1, got {num_clients!r}")
    versions = data.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items()):  # pragma: no mutate block
        raise InputError("its versions must map names to version strings")
    device = data.get("device", "cpu")
    if not isinstance(device, str):  # pragma: no mutate block
        raise InputError(f"its device must be text, got {type(device).__name__}")
    names = [f.name for f in fields(RoundRecord)]
    records, uploaded = [], 0
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict) or set(r) != set(names):  # pragma: no mutate block
            raise InputError(f"record {i} of the history must have exactly the keys {sorted(names)}")
        records.append(_check_record(i, r, num_clients, uploaded))
        uploaded = r["bytes_uploaded"]
    history = {"config": config, "records": records, "versions": dict(versions), "device": device}
    flag = data.get("diverged")
    if flag is not None and (not isinstance(flag, bool) or flag != (bool(records) and diverged(records[-1]))):  # pragma: no mutate block
        raise InputError(f"its 'diverged' ({flag!r}) does not match its records")
    return history


def _check_record(i: int, r: dict, num_clients: int, uploaded: int) -> "RoundRecord":
    """One saved RoundRecord, checked (see :func:`check_history`)."""
    def wrong(field: str, allowed: str) -> InputError:
        shown = repr(r[field])
        return InputError(f"record {i}'s {field} must be {allowed}, got {shown if len(shown) < 60 else shown[:50] + '...'}")

    if not _count(r["round"]) or r["round"] != i + 1:  # pragma: no mutate block
        raise wrong("round", f"{i + 1} (records are rounds 1, 2, ... in order)")
    clients = r["clients"]
    if not isinstance(clients, list) or not all(_count(k) and k < num_clients for k in clients) \
            or any(a >= b for a, b in zip(clients, clients[1:])):  # pragma: no mutate block
        raise wrong("clients", f"distinct clients in [0, {num_clients}) in increasing order")
    accuracy, test_loss, train_loss = r["test_accuracy"], r["test_loss"], r["train_loss"]
    if accuracy is not None and not (_real(accuracy) and 0 <= accuracy <= 1):  # pragma: no mutate block
        raise wrong("test_accuracy", "None (not evaluated) or a number in [0, 1]")
    if test_loss is not None and (accuracy is None or not _real(test_loss)):  # pragma: no mutate block
        raise wrong("test_loss", "a number or None in an evaluated round, None in another")
    if train_loss is not None and not _real(train_loss):  # pragma: no mutate block
        raise wrong("train_loss", "a number, or None where it is not finite")
    if not _real(r["seconds"]) or not 0 <= r["seconds"] < math.inf:  # pragma: no mutate block
        raise wrong("seconds", "a finite number >= 0")
    if not _count(r["bytes_uploaded"]) or r["bytes_uploaded"] < uploaded:  # pragma: no mutate block
        raise wrong("bytes_uploaded", f"a count of bytes >= the round before's ({uploaded})")
    if accuracy is not None and test_loss is None:
        test_loss = math.nan                                  # evaluated, and not a finite number
    return RoundRecord(r["round"], list(clients), accuracy, test_loss,
                       math.nan if train_loss is None else train_loss, r["seconds"], r["bytes_uploaded"])


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
    or (round, accuracy) pairs with increasing rounds. target in (0, 1]; accuracies in [0, 1]
    (InputError otherwise, naming the first that is not).
    """
    from fedlib import params as P

    P.TARGET.check("target", target)
    if target is None:  # pragma: no mutate block
        raise InputError("target must be a finite number in (0, 1], got None")
    if isinstance(history, History):
        points = list(zip(history.rounds, history.accuracies))
    elif isinstance(history, (str, bytes, dict)) or not isinstance(history, Iterable):
        raise TypeError(f"history must be a History, a list of accuracies or (round, accuracy) pairs, "
                        f"got {type(history).__name__}")
    else:
        items = list(history)
        if items and isinstance(items[0], (tuple, list)):
            if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in items):  # pragma: no mutate block
                raise InputError("history's pairs must each be (round, accuracy)")
            points = [tuple(p) for p in items]
        else:
            points = list(enumerate(items, start=1))
    for i, (rnd, acc) in enumerate(points):
        if not _number(rnd) or not math.isfinite(rnd) or (i and rnd <= points[i - 1][0]):  # pragma: no mutate block
            raise InputError(f"history's rounds must be finite numbers in increasing order, got {rnd!r} "
                             f"at position {i}" + (f" after {points[i - 1][0]!r}" if i else ""))
        if not (_number(acc) and 0 <= acc <= 1):  # pragma: no mutate block
            raise InputError(f"history's accuracies must be numbers in [0, 1], got {acc!r} at round {rnd!r}")
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
