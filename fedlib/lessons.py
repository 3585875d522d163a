"""What the lesson notebooks share: how big their experiments are, where they run,
and the pictures several lessons draw.

One switch decides the size of every experiment in the lessons:

- ``quick``: minutes on a laptop CPU. The notebooks are stored, rendered in the
  book and tested (nbval) with this profile.
- ``full``: the paper's scale (more rounds, more configurations, the CNN trained
  in earnest), meant for a GPU, for example in Colab.

The default (``auto``) is ``full`` when the lesson runs on a GPU and ``quick``
otherwise. A reader chooses in the first cell of every lesson (``PROFILE = "quick"``,
passed to :func:`set_profile`); without a choice there, the environment variable
``FEDLIB_PROFILE=quick|full`` decides, and ``FEDLIB_DEVICE=auto|cpu|cuda`` overrides
the device (``make notebooks`` sets both to produce the stored outputs on the CPU).

``FEDLIB_SCALE`` (a number in (0, 1], default 1) shrinks the full profile's sizes
(:func:`size`) so that a test can run its code paths, the ones a GPU reader runs, on a
CPU in seconds; what such a cut-down run computes means nothing, so the checks of
trained numbers are skipped then (:func:`cut_down`).

Numbers that come out of training (accuracies, losses, rounds to a target) depend on
float rounding, which differs between CPUs, kernels and GPUs. nbval therefore does not
compare them as text (their cells are tagged ``nbval-ignore-output``); a hidden cell
checks each with ``booktools.check_stored`` (the book's tooling, not part of fedlib), within a
tolerance that says why.
"""

from __future__ import annotations

import math
import os
from typing import Sequence, TypeVar

import numpy as np
import torch

from fedlib.runtime import DEVICES, get_device

PROFILES = ("quick", "full")
CHOICES = ("auto",) + PROFILES
T = TypeVar("T")
_chosen = "auto"      # the reader's PROFILE from a lesson's first cell


def device() -> torch.device:
    """The device every lesson computes on: ``$FEDLIB_DEVICE`` if set, else cuda if available, else cpu."""
    chosen = os.environ.get("FEDLIB_DEVICE") or "auto"
    if chosen not in DEVICES:
        raise ValueError(f"FEDLIB_DEVICE must be one of {DEVICES}, got {chosen!r}")
    return get_device(chosen)


def set_profile(choice: str = "auto") -> str:
    """Take the reader's choice from a lesson's first cell and return the profile that runs.

    choice: ``"quick"`` (minutes anywhere), ``"full"`` (the paper's scale, for a GPU) or
    ``"auto"`` (``$FEDLIB_PROFILE`` if set, else full on a GPU and quick on a CPU).
    """
    global _chosen
    if choice not in CHOICES:
        raise ValueError(f"PROFILE must be one of {CHOICES}, got {choice!r}")
    _chosen = choice
    return profile()


def profile() -> str:
    """The profile that runs: the reader's :func:`set_profile` choice, else ``$FEDLIB_PROFILE``,
    else ``full`` on a GPU and ``quick`` on a CPU."""
    if _chosen != "auto":
        return _chosen
    chosen = os.environ.get("FEDLIB_PROFILE")
    if not chosen:
        return "full" if device().type == "cuda" else "quick"
    if chosen not in PROFILES:
        raise ValueError(f"FEDLIB_PROFILE must be one of {PROFILES}, got {chosen!r}")
    return chosen


def pick(quick: T, full: T) -> T:
    """The value for the active profile: ``pick(quick=["iid"], full=["iid", "shards"])``."""
    return quick if profile() == "quick" else full


def scale() -> float:
    """``$FEDLIB_SCALE``, the factor that shrinks the full profile's sizes (default 1)."""
    text = os.environ.get("FEDLIB_SCALE") or "1"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ValueError(f"FEDLIB_SCALE must be a number in (0, 1], got {text!r}")
    return value


def cut_down() -> bool:
    """Whether this is a scaled-down full profile (a test of its code paths, not a result)."""
    return profile() == "full" and scale() < 1


def size(quick: int, full: int, minimum: int = 1) -> int:
    """A count (rounds, epochs, examples) for the active profile: ``size(quick=15, full=300)``.

    In the full profile it is multiplied by :func:`scale`, never below ``minimum``.
    """
    if profile() == "quick":
        return quick
    return max(minimum, round(full * scale()))


def describe() -> str:
    """One line saying which profile runs on which device, e.g. ``profile: quick, device: cpu``."""
    text = f"profile: {profile()}, device: {device().type}"
    return text + f" (cut down to {scale():g} of its sizes)" if cut_down() else text


def glue(name: str, value: object) -> None:
    """Record ``value`` under ``name`` so that the book's pages can quote it, showing nothing.

    This is MyST-NB's ``glue(name, value, display=False)`` (the output format its
    ``{glue:text}`` role reads), written out so that the lessons do not need MyST-NB
    installed, in Colab for example.
    """
    from IPython.core.formatters import format_display_data
    from IPython.display import display

    prefix = "application/papermill.record/"
    bundle, metadata = format_display_data(value)
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    display({prefix + mime: data for mime, data in bundle.items()}, raw=True, metadata=metadata)


def show_digits(images: torch.Tensor, labels: Sequence[int], ncols: int = 10, title: str | None = None,
                size: float = 0.9):
    """Draw MNIST images (N, 1, 28, 28) in a grid, each titled with its label; return the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("images must hold at least one image, got none")
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * 1.15 * nrows + (0.4 if title else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].detach().cpu().squeeze(0), cmap="gray_r")
            ax.set_title(str(int(labels[i])), fontsize=9, pad=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_class_counts(counts: np.ndarray, ax=None, title: str = "Examples per client and class"):
    """Draw a (K, num_classes) matrix of example counts as a clients x classes picture; return the axes.

    Each row is a client, each column a class, the colour how many examples of that
    class the client holds: an IID split is an even smear, a non-IID one a few bright
    cells per row.
    """
    import matplotlib.pyplot as plt

    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be a (K, num_classes) matrix, got shape {counts.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 5))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    ax.set_xticks(range(counts.shape[1]))
    ax.set_xlabel("class (digit)")
    ax.set_ylabel("client k")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label="examples")
    return ax
