"""Accuracy-versus-round figures, as in the paper's Figure 2 and later."""

from __future__ import annotations

from typing import Sequence

from fedlib import params as P
from fedlib.metrics import History
from fedlib.params import InputError


def describe(history: History) -> str:
    """A short label for a run: model, partition, E, B and C."""
    c = history.config
    b = "inf" if c.get("batch_size") is None else c.get("batch_size")
    return f"{c.get('model')} {c.get('partition')} E={c.get('local_epochs')} B={b} C={c.get('frac')}"


def literal(text: str) -> str:
    """``text`` as matplotlib shows it literally: its dollar signs escaped, so that a title or
    label such as ``$\\foo{$`` never reaches matplotlib's mathtext parser (which would raise)."""
    return text.replace("$", r"\$")


def plot_accuracy(histories: Sequence[History], labels: Sequence[str] | None = None, ax=None,
                  target: float | None = None, title: str = "Test accuracy per round"):
    """Draw test accuracy against communication round, one line per run; return the axes.
    Titles and labels are drawn as given (no mathtext: see :func:`literal`)."""
    if ax is None:
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(7, 4.5))
    labels = labels or [describe(h) for h in histories]
    if len(labels) != len(histories):
        raise InputError(f"labels must have one entry per run ({len(histories)}), got {len(labels)}")
    if not all(isinstance(text, str) for text in [*labels, title]):
        raise TypeError("labels and title must be text")
    if target is not None:
        P.TARGET.check("target", target)
    for history, label in zip(histories, labels):
        ax.plot(history.rounds, history.accuracies, label=literal(label),
                marker="." if len(history.rounds) < 30 else None)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel("communication round")
    ax.set_ylabel("test accuracy")
    ax.set_title(literal(title))
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def save_accuracy_plot(histories: Sequence[History], path, labels: Sequence[str] | None = None,
                       target: float | None = None, title: str = "Test accuracy per round") -> None:
    """Draw :func:`plot_accuracy` into a PNG at ``path``, written whole or not at all."""
    import io

    from matplotlib.figure import Figure

    from fedlib.files import atomic_write_bytes

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    plot_accuracy(histories, labels, ax=figure.add_subplot(), target=target, title=title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


