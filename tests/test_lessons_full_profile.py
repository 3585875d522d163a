"""Every lesson runs to its end in the full profile, the one a reader with a GPU gets.

The machines that test this book have no GPU, and the full profile at its real size is
hours of CPU. So each lesson runs here with ``FEDLIB_PROFILE=full`` cut down by
``FEDLIB_SCALE`` (``fedlib.lessons.size`` shrinks every round count, epoch count and
example count; the settings, targets and code paths stay those of the full profile), on
the CPU, from a fresh kernel, and must finish without an error. Its numbers mean nothing
and are not checked (``booktools.check_stored`` checks only the quick profile). Whether the
full profile fits a GPU reader's time is measured with ``../shared/gpu-check`` (see
notebooks/README.md).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SCALE = "0.02"
TIMEOUT_S = 600


@pytest.mark.slow
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs_in_the_cut_down_full_profile(path, monkeypatch):
    monkeypatch.setenv("FEDLIB_PROFILE", "full")
    monkeypatch.setenv("FEDLIB_SCALE", SCALE)
    monkeypatch.setenv("FEDLIB_DEVICE", "cpu")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, kernel_name="python3", timeout=TIMEOUT_S,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()               # raises CellExecutionError, naming the cell, on any error
    described = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                        for out in cell.outputs)
    assert f"profile: full, device: cpu (cut down to {SCALE} of its sizes)" in described
