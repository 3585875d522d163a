"""Every lesson runs to its end in the full profile, the one a reader with a GPU gets.

The machines that test this book have no GPU, and the full profile at its real size is
hours of CPU. So each lesson runs here with ``FEDLIB_PROFILE=full`` cut down by
``FEDLIB_SCALE`` (``fedlib.lessons.size`` shrinks every round count, epoch count and
example count; the settings, targets and code paths stay those of the full profile), on
the CPU, from a fresh kernel, and must finish without an error. Its numbers mean nothing
and are not checked (``booktools.check_stored`` checks only the quick profile). Whether the
full profile fits a GPU reader's time is measured with ``../shared/gpu-check`` (see
notebooks/README.md).

A lesson whose code never asks for the profile (no ``lessons.profile()``, ``pick()``,
``cut_down()`` or ``scale()``) runs the same cells in both profiles, only with other sizes
from ``lessons.size``; nbval runs those cells in the quick profile, so a cut-down run of it
would test nothing more (lesson 7's would start Ray three more times, about 100 s). It is
skipped, with that reason; it comes back here as soon as its code reads the profile.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SCALE = "0.02"
TIMEOUT_S = 600
READS_THE_PROFILE = re.compile(r"\blessons\.(profile|pick|cut_down|scale)\(")


def reads_the_profile(path: Path) -> bool:
    """Whether a code cell of the lesson asks which profile runs (beyond ``lessons.size``)."""
    nb = nbformat.read(path, as_version=4)
    return any(READS_THE_PROFILE.search(cell.source) for cell in nb.cells if cell.cell_type == "code")


def lesson_param(path: Path):
    if reads_the_profile(path):
        return pytest.param(path, id=path.stem)
    return pytest.param(path, id=path.stem, marks=pytest.mark.skip(
        reason="its code never reads the profile: the full profile runs the quick one's cells with other sizes, "
               "and nbval runs those"))


def test_the_profile_is_read_the_way_this_module_looks_for_it(tmp_path):
    """The rule above finds a lesson that reads the profile however it asks (so none escapes it)."""
    for source, reads in [("ROUNDS = lessons.size(quick=5, full=20)", False),
                          ("if lessons.profile() == 'quick':\n    pass", True),
                          ("x = lessons.pick(quick=1, full=2)", True),
                          ("if not lessons.cut_down():  # comment", True),
                          ("n = int(100 * lessons.scale())", True)]:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        nbformat.write(nb, tmp_path / "lesson.ipynb")
        assert reads_the_profile(tmp_path / "lesson.ipynb") is reads, source


@pytest.mark.slow
@pytest.mark.parametrize("path", [lesson_param(p) for p in LESSONS])
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
