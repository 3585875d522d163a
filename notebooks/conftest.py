"""pytest's settings for the lessons under nbval (`make test`, `make test-kernels`).

The Makefile runs the lessons on two workers, one lesson per worker at a time (``--dist loadscope``,
``--no-loadscope-reorder``). A worker takes the next lesson when it is done with one, so the order in
which lessons are handed out decides when the last one ends: here the longest go first (by the
quick profile's times that ``notebooks/execute.py`` measured, in ``timings.json``), so that no long
lesson starts last while the other worker sits idle. The cells of a lesson keep their order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TIMINGS = Path(__file__).with_name("timings.json")


def lesson_seconds() -> dict[str, float]:
    """Each lesson's quick-profile seconds (lesson file name without .ipynb -> seconds); {} if unknown."""
    try:
        measured = json.loads(TIMINGS.read_text())["quick-cpu"]
        return {name: float(entry["seconds"]) for name, entry in measured.items()}
    except (OSError, ValueError, KeyError, TypeError):       # no or unreadable timings: keep pytest's order
        return {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seconds = lesson_seconds()
    if not seconds:
        return
    position = {}                       # a lesson's cells stay together and in order: sort is stable
    for item in items:
        position.setdefault(item.path, len(position))
    items.sort(key=lambda item: (-seconds.get(item.path.stem, 0.0), position[item.path]))
