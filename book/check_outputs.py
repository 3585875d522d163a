"""Check that every lesson in _toc.yml is stored with its outputs.

The book renders the outputs committed in the notebooks and never runs them
(``execute_notebooks: "off"`` in _config.yml), so a lesson committed without outputs
would appear as bare code. Run before the build (``make book`` does):

    python book/check_outputs.py [BOOK_ROOT]

It exits with status 1 and names every lesson that has a code cell that was not run,
a code cell that ended in an error, or no output at all. A cell tagged
``skip-execution`` may stay unrun, and one tagged ``raises-exception`` may show an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]


def toc_files(root: Path = ROOT) -> list[str]:
    """The ``file:`` entries of ``root/_toc.yml`` in reading order, the root page first."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files: list[str] = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []):
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return files


def resolve(entry: str, root: Path = ROOT) -> Path | None:
    """The source file of a toc entry, which may omit its suffix; None if there is none."""
    path = root / entry
    candidates = [path] if path.suffix in (".ipynb", ".md") else [
        path.with_name(path.name + suffix) for suffix in (".ipynb", ".md")]
    return next((p for p in candidates if p.exists()), None)


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The notebooks listed in the table of contents, in reading order."""
    paths = [resolve(entry, root) for entry in toc_files(root)]
    return [p for p in paths if p is not None and p.suffix == ".ipynb"]


def output_problems(path: Path) -> list[str]:
    """What is missing from the stored outputs of one notebook (empty if nothing)."""
    nb = nbformat.read(path, as_version=4)
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
    problems = []
    unrun = [i for i, c in code
             if c.get("execution_count") is None and "skip-execution" not in c.metadata.get("tags", [])]
    if unrun:
        problems.append(f"{len(unrun)} of {len(code)} code cells were not run (cells {_cells(unrun)})")
    errors = [i for i, c in code
              if any(o.output_type == "error" for o in c.get("outputs", []))
              and "raises-exception" not in c.metadata.get("tags", [])]
    if errors:
        problems.append(f"cells {_cells(errors)} end in an error")
    if code and not any(c.get("outputs") for _, c in code):
        problems.append("no code cell has any output")
    return problems


def _cells(indices: list[int], shown: int = 5) -> str:
    """'3, 4, 7' or '3, 4, 7, 9, 12, ... (8 in all)': notebook cell numbers, counted from 1."""
    text = ", ".join(str(i + 1) for i in indices[:shown])
    return text + (f", ... ({len(indices)} in all)" if len(indices) > shown else "")


def main(argv: list[str]) -> int:
    root = Path(argv[1]).resolve() if len(argv) > 1 else ROOT
    missing = [entry for entry in toc_files(root) if resolve(entry, root) is None]
    failed = {path: output_problems(path) for path in toc_notebooks(root)}
    failed = {path: problems for path, problems in failed.items() if problems}
    for entry in missing:
        print(f"_toc.yml lists {entry}, which does not exist", file=sys.stderr)
    for path, problems in failed.items():
        print(f"{path.relative_to(root)} is not stored with its outputs: {'; '.join(problems)}",
              file=sys.stderr)
    if missing or failed:
        print("Run the lessons first (make notebooks), then build the book.", file=sys.stderr)
        return 1
    print(f"check_outputs: all {len(toc_notebooks(root))} lessons in _toc.yml have their outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
