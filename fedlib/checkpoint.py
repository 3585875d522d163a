"""A run's checkpoint: w_t, its History and the strategy's state, to resume from after a stop.

The file holds only tensors and plain Python values and is read with
``torch.load(weights_only=True)``, which refuses anything else: a crafted file cannot run
code. What it holds is then checked like any input a user can hand us: the configuration
must be the run's own, every weight tensor dense, floating point, finite and of the model's
shape, the History well formed with one record per round done, and the strategy's state of
the right shapes (the strategy checks it). Anything else in the file (another key, a
value that is not plain data, nesting deeper than a checkpoint has) is refused too. The path
is checked when the run starts, so a path that cannot be written is refused before any training.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from fedlib import params as P
from fedlib.client import Weights
from fedlib.config import FedAvgConfig
from fedlib.files import MAX_JSON_DEPTH, atomic_write_bytes, check_output
from fedlib.metrics import History
from fedlib.params import InputError
from fedlib.strategies import checked_tensors

# Rounds between two checkpoints of a run (it is also saved when it ends and when it is
# interrupted): the default of fedlib.run, the command line and the reproduction's runs.
CHECKPOINT_EVERY = 10
FORMAT = "fedlib-checkpoint-2"


class Checkpoint:
    """A run's checkpoint file: :meth:`save` after a round, :meth:`load` to resume."""

    def __init__(self, path: str | Path, config: FedAvgConfig, every: int = CHECKPOINT_EVERY):
        P.CHECKPOINT_EVERY.check("checkpoint_every", every)
        self.path = check_output(path)
        self.config, self.every = config, every

    def due(self, t: int) -> bool:
        """Whether round t is one after which the run saves (every ``every`` rounds)."""
        return t % self.every == 0

    def save(self, w_t: Weights, history: History, state: dict) -> None:
        """Write w_t, the History so far and the strategy's state, whole or not at all."""
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "config": asdict(self.config),
                    "weights": {k: v.detach().cpu() for k, v in w_t.items()}, "history": history.to_dict(),
                    "state": _to_cpu(state)}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def load(self, w_0: Weights) -> tuple[Weights, History, dict] | None:
        """The saved (w_t, History, strategy state), checked against the run (``w_0``: its initial
        weights, for the names, shapes and dtypes); None if there is no file yet."""
        if not self.path.exists():
            return None
        fix = "delete it or pass another checkpoint path"
        try:
            with warnings.catch_warnings():              # torch's notes on what it checks: our message says it
                warnings.simplefilter("ignore")
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:                       # whatever the file holds, it is not ours
            reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
            raise InputError(f"checkpoint {self.path} is not a fedlib checkpoint that can be read safely "
                             f"({reason}); {fix}") from None
        try:
            if not isinstance(saved, dict) or saved.get("format") != FORMAT:
                raise InputError(f"it is not a fedlib checkpoint ({FORMAT})")
            if set(saved) != {"format", "config", "weights", "history", "state"}:
                raise InputError(f"it must hold exactly format, config, weights, history and state, got "
                                 f"{sorted(map(str, saved))}")
            if not plain(saved["config"]) or not plain(saved["history"]):
                raise InputError("its config and history must be plain values (text, numbers, lists, mappings)")
            if saved["config"] != asdict(self.config):
                raise InputError("it belongs to a run with another configuration")
            weights = checked_weights(saved["weights"], w_0)
            history = History.from_dict(saved["history"])
            if history.config != asdict(self.config) | {"engine_used": history.config.get("engine_used")}:
                raise InputError("its history belongs to a run with another configuration")
            rounds = [r.round for r in history.records]
            if rounds != list(range(1, len(rounds) + 1)) or len(rounds) > self.config.rounds:
                raise InputError(f"its history must hold rounds 1, 2, ... of at most {self.config.rounds}, "
                                 f"got {len(rounds)} records")
            state = saved["state"]
            if not isinstance(state, dict):
                raise InputError("it holds no strategy state")
        except InputError as error:
            raise InputError(f"checkpoint {self.path}: {error}; {fix}") from None
        except RecursionError:
            raise InputError(f"checkpoint {self.path}: it nests too deep to be a fedlib checkpoint; {fix}") from None
        return weights, history, state


def checked_weights(weights: object, like: Weights) -> Weights:
    """Saved weights, checked tensor by tensor against the model's (``like``): the same names,
    dense, floating point, finite, the same shapes; returned on ``like``'s device and dtype."""
    return checked_tensors(weights, like, "its weights")


def plain(value: object, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` is made of JSON's values only (mappings with text keys, lists, text,
    numbers, True/False/None), nested at most ``max_depth`` deep; walked without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return False
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
        elif item is not None and not isinstance(item, (str, bool, int, float)):
            return False
    return True


def _to_cpu(value):
    """A strategy's state with every tensor on the CPU (nested dicts of tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
