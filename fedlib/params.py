"""The range of every parameter, written once, and the error that bad input raises.

Each parameter of a run (K, C, E, B, eta, ...) has one :class:`Range` here. The library
checks its arguments against it (:meth:`Range.check`, raising :class:`InputError`), and
the command line parses its flags with it (:meth:`Range.parse`), so the two can never
disagree about what is allowed.

:class:`InputError` is a ``ValueError`` raised for input a user got wrong: a parameter
out of its range, a file that is not what it should be. The command line turns it into
one line and exit status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


class InputError(ValueError):
    """A parameter or a file given by the user is invalid; the message says which and why."""


@dataclass(frozen=True)
class Range:
    """The numbers a parameter may take: ``kind`` (int or float) between ``low`` and ``high``.

    low_open/high_open exclude the bound itself. Floats must be finite (no inf, no nan).
    none: what ``None`` means for this parameter (e.g. "B = infinity"), or "" if None is
    not allowed. symbol: the paper's name, shown in messages (``lr (eta) must be ...``).
    """

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: str = ""
    symbol: str = ""
    none_words: tuple[str, ...] = ("inf", "infinity", "none", "all")   # what means None on the command line

    def describe(self, none_word: str = "None") -> str:
        """The allowed values in words, e.g. 'a finite number in [0, 1)' or 'an integer >= 1'
        (``none_word``: how None is written, 'inf' on the command line)."""
        what = "an integer" if self.kind is int else "a finite number"
        show = (lambda v: str(int(v))) if self.kind is int else (lambda v: f"{v:g}")
        if self.low is not None and self.high is not None:
            text = (f"{what} in {'(' if self.low_open else '['}{show(self.low)}, "
                    f"{show(self.high)}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{what} {'>' if self.low_open else '>='} {show(self.low)}"
        elif self.high is not None:
            text = f"{what} {'<' if self.high_open else '<='} {show(self.high)}"
        else:
            text = what
        return text + (f", or {none_word} for {self.none}" if self.none else "")

    def contains(self, value: object) -> bool:
        if value is None:
            return bool(self.none)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check(self, name: str, value: object) -> None:
        """Raise InputError naming ``name`` and the allowed range unless ``value`` is in it."""
        if not self.contains(value):
            label = f"{name} ({self.symbol})" if self.symbol else name
            raise InputError(f"{label} must be {self.describe()}, got {value!r}")

    def parse(self, text: str) -> int | float | None:
        """A command-line value: the number in ``text``, or None for 'inf'/'none' where allowed.

        Raises InputError (without naming the flag: argparse adds it) for anything else.
        """
        if self.none and text.strip().lower() in self.none_words:
            return None
        try:
            value = self.kind(text)
        except ValueError:
            kind = "an integer" if self.kind is int else "a number"
            raise InputError(f"expected {kind}, got {text!r}") from None
        if not self.contains(value):
            raise InputError(f"must be {self.describe(none_word=self.none_words[0])}, got {text}")
        return value


# One Range per parameter: everything that checks or parses a parameter uses these.
SEED_MAX = 2**63 - 1          # what torch.manual_seed and numpy's SeedSequence both take
NUM_CLIENTS = Range(int, 1, symbol="K")
FRAC = Range(float, 0, 1, symbol="C")
LOCAL_EPOCHS = Range(int, 1, symbol="E")
BATCH_SIZE = Range(int, 1, none="B = infinity (the whole local dataset)", symbol="B")
LR = Range(float, 0, low_open=True, symbol="eta")
MOMENTUM = Range(float, 0, 1, high_open=True)
WEIGHT_DECAY = Range(float, 0)
ROUNDS = Range(int, 1)
SEED = Range(int, 0, SEED_MAX)
EVAL_EVERY = Range(int, 1)
SHARDS_PER_CLIENT = Range(int, 1)
SHARD_SIZE = Range(int, 1, none="n / (K * shards_per_client)", none_words=("auto",))
ALPHA = Range(float, 0, low_open=True)
MIN_SIZE = Range(int, 0)
SIGMA = Range(float, 0)
TARGET = Range(float, 0, 1, low_open=True, none="no target", none_words=("none",))
THREADS = Range(int, 1)
CHECKPOINT_EVERY = Range(int, 1)
# Beyond FedAvg (lessons 8 and 9): FedProx, the server optimizers, DP-FedAvg (fedlib.strategies).
MU = Range(float, 0, symbol="mu")
SERVER_LR = Range(float, 0, low_open=True, symbol="eta_g")
SERVER_MOMENTUM = Range(float, 0, 1, high_open=True, symbol="beta")
SERVER_BETA = Range(float, 0, 1, high_open=True)
SERVER_TAU = Range(float, 0, low_open=True, symbol="tau")
DP_CLIP = Range(float, 0, low_open=True, symbol="S")
DP_NOISE = Range(float, 0, symbol="z")
