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

import numpy as np


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
    limit: str = ""        # high is not the parameter's own bound but what its consumer can represent: why

    def describe(self, none_word: str = "None") -> str:
        """The allowed values in words, e.g. 'a finite number in [0, 1)' or 'an integer >= 1'
        (``none_word``: how None is written, 'inf' on the command line). A representability
        limit is left out (see :meth:`refusal`)."""
        what = "an integer" if self.kind is int else "a finite number"
        show = (lambda v: str(int(v))) if self.kind is int else (lambda v: f"{v:g}")
        if self.limit:
            text = Range(self.kind, self.low, None, self.low_open).describe()
        elif self.low is not None and self.high is not None:
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
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        try:
            if not math.isfinite(value):
                return False
        except OverflowError:                  # an int or Fraction too large for a float
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def over_limit(self, value: object) -> bool:
        """Whether ``value`` is a number of the right kind above the representability limit."""
        if not self.limit or isinstance(value, (bool, np.bool_)) \
                or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        try:
            return math.isfinite(value) and value > self.high
        except OverflowError:                  # an int too large for a float
            return value > 0

    def limit_text(self) -> str:
        """The representability limit in words, for help texts: ' (at most 1024: why)', or ''."""
        return f" (at most {_BIG.get(self.high) or f'{self.high:g}'}: {self.limit})" if self.limit else ""

    def refusal(self, value: object, none_word: str = "None") -> str:
        """Why ``value`` is refused: 'must be <what is allowed>', or for a number beyond what the
        consumer can represent, 'must be at most <the limit> (<why>)'."""
        if self.over_limit(value):
            return f"must be at most {_BIG.get(self.high) or f'{self.high:g}'} ({self.limit})"
        return f"must be {self.describe(none_word)}"

    def check(self, name: str, value: object) -> None:
        """Raise InputError naming ``name`` and the allowed range unless ``value`` is in it."""
        if not self.contains(value):
            label = f"{name} ({self.symbol})" if self.symbol else name
            raise InputError(f"{label} {self.refusal(value)}, got {shown(value)}")

    def convert(self, name: str, value: object) -> int | float | None:
        """``value`` checked and as a plain Python int or float: numpy scalars, Fractions and the
        like are accepted when they are in range and become the number they equal (an int, or the
        nearest float), so that what a run saves is plain JSON and reads back as itself."""
        self.check(name, value)
        if value is None:
            return None
        converted = int(value) if self.kind is int else float(value)
        self.check(name, converted)            # a Fraction may round onto an open bound
        return converted if type(value) not in (int, float) else value

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
            raise InputError(f"expected {kind}, got {shown(text)}") from None
        if not self.contains(value):
            raise InputError(f"{self.refusal(value, self.none_words[0])}, got {text if len(text) <= 60 else shown(text)}")
        return value


def shown(value: object) -> str:
    """A value as a message shows it: its repr, cut short (a 5,000-digit int is not a message)."""
    try:
        text = repr(value)
    except ValueError:                          # an int beyond Python's 4,300-digit conversion limit
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= 60 else f"{text[:40]}... ({type(value).__name__} of {len(text)} characters)"


# --- the bounds the consumers of the numbers set ---------------------------------------------------
# Every rate, weight and scale of a run becomes a float32 tensor (``torch.full``, the optimizers'
# scalars, the vectorized engine's per-model rates): torch refuses a Python float above float32's
# largest finite value with "value cannot be converted to type float without overflow". So these
# parameters are finite numbers <= FLOAT32_MAX; what the training then makes of lr * gradient is its
# own business (a run that overflows diverges, and says so).
FLOAT32_MAX = float(np.finfo(np.float32).max)        # 3.4028234663852886e+38
# FedAdam and FedYogi start v at tau^2, a float32 tensor: tau <= sqrt(FLOAT32_MAX) keeps tau^2 finite.
TAU_MAX = math.sqrt(FLOAT32_MAX)                     # 1.8446743e+19
INT64_MAX = 2**63 - 1         # torch's sizes and split lengths, numpy's integer arguments (C int64_t)
_BIG = {INT64_MAX: "2^63 - 1", 2**31 - 1: "2^31 - 1", 2**53: "2^53"}      # how describe() shows them
F32 = "float32's largest"
I64 = "a C int64"
SEED_MAX = INT64_MAX          # what torch.manual_seed and numpy's SeedSequence both take
# torch.set_num_threads takes a C int, but OpenMP allocates every thread's state at the first
# parallel region: 2^31 - 1 threads asked libgomp for 432 GiB and aborted the process. 1024 is more
# threads than any machine fedlib runs on has cores (and more than the cores only slows it down).
THREADS_MAX = 1024
# K: S_t is drawn with numpy's choice, which allocates all K candidates when m = C K is a large share
# of them; each client holds at least one example, so K beyond 2^31 - 1 is never a split of a dataset
# that fits in memory.
CLIENTS_MAX = 2**31 - 1

# One Range per parameter: everything that checks or parses a parameter uses these.
NUM_CLIENTS = Range(int, 1, CLIENTS_MAX, symbol="K", limit="numpy's sampling of S_t allocates K entries")
FRAC = Range(float, 0, 1, symbol="C")
LOCAL_EPOCHS = Range(int, 1, INT64_MAX, symbol="E", limit=I64)
BATCH_SIZE = Range(int, 1, INT64_MAX, none="B = infinity (the whole local dataset)", symbol="B", limit=I64)
LR = Range(float, 0, FLOAT32_MAX, low_open=True, symbol="eta", limit=F32)
MOMENTUM = Range(float, 0, 1, high_open=True)
WEIGHT_DECAY = Range(float, 0, FLOAT32_MAX, limit=F32)
ROUNDS = Range(int, 1, INT64_MAX, limit=I64)
SEED = Range(int, 0, SEED_MAX)
EVAL_EVERY = Range(int, 1, INT64_MAX, limit=I64)
SHARDS_PER_CLIENT = Range(int, 1, INT64_MAX, limit=I64)
SHARD_SIZE = Range(int, 1, INT64_MAX, none="n / (K * shards_per_client)", none_words=("auto",), limit=I64)
# alpha and sigma are used in float64 (numpy's Dirichlet and lognormal draws): any finite value;
# fedlib.partition refuses a draw that overflows float64 (a sigma so large that exp(sigma z) is inf).
ALPHA = Range(float, 0, low_open=True)
MIN_SIZE = Range(int, 0, INT64_MAX, limit=I64)
SIGMA = Range(float, 0)
TARGET = Range(float, 0, 1, low_open=True, none="no target", none_words=("none",))
THREADS = Range(int, 1, THREADS_MAX, limit="OpenMP allocates every thread's state at once")
CHECKPOINT_EVERY = Range(int, 1, INT64_MAX, limit=I64)
# Beyond FedAvg (lessons 8 and 9): FedProx, the server optimizers, DP-FedAvg (fedlib.strategies).
MU = Range(float, 0, FLOAT32_MAX, symbol="mu", limit=F32)
SERVER_LR = Range(float, 0, FLOAT32_MAX, low_open=True, symbol="eta_g", limit=F32)
SERVER_MOMENTUM = Range(float, 0, 1, high_open=True, symbol="beta")
SERVER_BETA = Range(float, 0, 1, high_open=True)
SERVER_TAU = Range(float, 0, TAU_MAX, low_open=True, symbol="tau", limit="tau^2 must fit float32")
DP_CLIP = Range(float, 0, FLOAT32_MAX, low_open=True, symbol="S", limit=F32)
DP_NOISE = Range(float, 0, FLOAT32_MAX, symbol="z", limit=F32)
# n_k, the weight of a client in FedAvg's average n_k / m_t, computed in float64: a count up to 2^53
# is exact there (and no client holds more examples than that).
NUM_EXAMPLES = Range(int, 0, 2**53, limit="exact in float64")
