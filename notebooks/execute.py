"""Execute the lessons in place, each from a clean kernel, top to bottom (``make notebooks``).

The stored outputs are what the book renders and what ``pytest --nbval`` checks, so
they are produced one way only: on the CPU, in the quick profile, by this script.
After execution the notebook keeps only what is needed to read and re-run it: no
widget state, no timing or personal metadata, kernel ``python3``.

Usage: python notebooks/execute.py [--metadata-only] [NOTEBOOK ...]
(default: every notebooks/[0-9]*.ipynb; --metadata-only cleans the metadata without executing)
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
# What the IPython kernel reports, less the exact Python version; pygments_lexer ipython3
# lets the book highlight %pip lines as IPython rather than fail on them as Python.
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3", "codemirror_mode": {"name": "ipython", "version": 3},
                 "file_extension": ".py", "mimetype": "text/x-python", "nbconvert_exporter": "python"}
TIMEOUT_S = 600   # per cell; the quick profile needs seconds


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def clean_metadata(nb: nbformat.NotebookNode) -> None:
    """Keep the kernel and the language; drop everything else (widget state, authors, Colab).

    A widget's output keeps its view, which points at a widget model that is not stored;
    its random model id is replaced by one named after the cell, so that re-executing an
    unchanged lesson leaves the file unchanged.
    """
    nb.metadata = nbformat.from_dict({"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO})
    for cell in nb.cells:
        cell.metadata = nbformat.from_dict({k: v for k, v in cell.metadata.items() if k == "tags"})
        for i, output in enumerate(cell.get("outputs", [])):
            output.get("metadata", {}).pop("transient", None)
            if WIDGET_VIEW in output.get("data", {}):
                output.data[WIDGET_VIEW]["model_id"] = f"{cell.id}-widget-{i}"


def kernel_cpu_seconds() -> float:
    """CPU time (user + system) of the finished child processes, the kernels, so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def execute(path: Path) -> tuple[float, float]:
    """Run one notebook from a clean kernel in its own folder and write it back.

    Returns the wall-clock seconds and the kernel's CPU seconds (on a shared machine the
    second says more about the notebook than the first)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # store_widget_state=True only because nbclient's Output-widget hook needs it; the state
    # itself is dropped by clean_metadata.
    client = NotebookClient(nb, kernel_name="python3", timeout=TIMEOUT_S, record_timing=False,
                            store_widget_state=True, resources={"metadata": {"path": str(path.parent)}})
    began, cpu_began = time.perf_counter(), kernel_cpu_seconds()
    client.execute()
    seconds, cpu_seconds = time.perf_counter() - began, kernel_cpu_seconds() - cpu_began
    clean_metadata(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds, cpu_seconds


def main(argv: list[str]) -> int:
    metadata_only = "--metadata-only" in argv
    argv = [a for a in argv if a != "--metadata-only"]
    os.environ.setdefault("FEDLIB_PROFILE", "quick")
    os.environ.setdefault("FEDLIB_DEVICE", "cpu")
    if os.environ["FEDLIB_PROFILE"] != "quick" or os.environ["FEDLIB_DEVICE"] != "cpu":
        print("note: stored outputs are meant to be FEDLIB_PROFILE=quick FEDLIB_DEVICE=cpu", file=sys.stderr)
    paths = [Path(a) for a in argv] or sorted(HERE.glob("[0-9]*.ipynb"))
    if metadata_only:
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            clean_metadata(nb)
            nbformat.write(nb, path)
            print(f"{path.name}: metadata cleaned")
        return 0
    total = total_cpu = 0.0
    for path in paths:
        seconds, cpu_seconds = execute(path)
        total, total_cpu = total + seconds, total_cpu + cpu_seconds
        print(f"{path.name}: {seconds:.1f} s ({cpu_seconds:.1f} s of kernel CPU time)", flush=True)
    print(f"all {len(paths)} notebooks: {total:.1f} s ({total_cpu:.1f} s of kernel CPU time)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
