"""Execute the lessons in place, each from a clean kernel, top to bottom (``make notebooks``).

The stored outputs are what the book renders and what ``pytest --nbval`` checks, so
they are produced one way only: on the CPU, in the quick profile, by this script.
After execution the notebook keeps only what is needed to read and re-run it: no
widget state, no timing or personal metadata, kernel ``python3``.

It also measures how long each lesson took and keeps it in ``notebooks/timings.json``
(with the machine and the date), which then writes the **Time:** line at the top of
every lesson and the table of times in ``book/setup.md``: the times a reader sees are
always the last measurement, never a number typed by hand. The Time line is a reader's
time: the lesson's words at an average reading rate (READING_WPM, cited), plus the quick
profile's measured run, plus the measured install in Colab (``colab-install``, written by
``notebooks/measure_install.py``). Times measured on a GPU (``../shared/gpu-check``, the
full profile) go into the same file under ``full-gpu``; what was not measured says so.

Usage: python notebooks/execute.py [--metadata-only | --times-only] [NOTEBOOK ...]
(default: every notebooks/[0-9]*.ipynb; --metadata-only cleans the metadata without
executing; --times-only rewrites the time lines and the table from timings.json)
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMINGS = HERE / "timings.json"
SETUP_PAGE = HERE.parent / "book" / "setup.md"
TIME_LINE = re.compile(r"^\*\*Time:\*\*.*$", flags=re.M)
TABLE = re.compile(r"(<!-- lesson-times:start -->\n).*?(<!-- lesson-times:end -->)", flags=re.S)
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


def stale_checks(log: Path) -> list[str]:
    """The hidden checks whose ``stored=`` value no longer is what the lesson computed (more than
    a tenth of their tolerance away): the number to write into the check after re-executing."""
    if not log.exists():
        return []
    stale = []
    for line in log.read_text().splitlines():
        check = json.loads(line)
        if abs(check["value"] - check["stored"]) > 0.1 * check["within"]:
            stale.append(f"  {check['what']}: stored={check['stored']:g}, now {check['value']:.6g}")
    return stale


def execute(path: Path) -> tuple[float, float]:
    """Run one notebook from a clean kernel in its own folder and write it back.

    Returns the wall-clock seconds and the kernel's CPU seconds (on a shared machine the
    second says more about the notebook than the first). Warns about hidden checks whose
    stored value has gone stale."""
    nb = nbformat.read(path, as_version=4)
    log = path.with_name(f".{path.stem}.checks.jsonl")
    log.unlink(missing_ok=True)
    os.environ["FEDLIB_CHECKS_LOG"] = str(log)
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
    stale = stale_checks(log)
    log.unlink(missing_ok=True)
    if stale:
        print(f"{path.name}: hidden checks whose stored value is stale (update them, then re-execute):\n"
              + "\n".join(stale), file=sys.stderr, flush=True)
    return seconds, cpu_seconds


def cpu_name() -> str:
    """The processor, as /proc/cpuinfo names it, with the number of cores."""
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"


def load_timings() -> dict:
    return json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}


def record_time(path: Path, seconds: float) -> None:
    """Store one lesson's quick-profile time in timings.json and rewrite the times shown
    (under a lock: several lessons may be executed at once)."""
    with open(HERE / ".timings.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        timings = load_timings()
        timings.setdefault("quick-cpu", {})[path.stem] = {
            "seconds": round(seconds, 1), "machine": cpu_name(), "date": datetime.date.today().isoformat()}
        TIMINGS.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
        write_times([path], timings)


def minutes(seconds: float) -> str:
    """'under a minute', 'about 2 minutes': what a reader plans with."""
    if seconds < 60:
        return "under a minute"
    count = max(1, math.ceil(seconds / 60))
    return f"about {count} minutes"


def measured(kind: str, seconds: float, machine: str, date: str, **_) -> str:
    return f"{minutes(seconds)} in the {kind} (measured: {seconds:.0f} s on {machine}, {date})"


# Reading: the average silent reading rate of adults for English non-fiction, 238 words a minute
# (Brysbaert 2019, a meta-analysis of 190 studies; most adults read 175 to 300). A lesson is
# read more slowly than that when a reader works through it, so the reading time is a floor.
READING_WPM = 238
ROLE = re.compile(r"\{[a-z:]+\}`([^`<]*?)\s*(?:<[^`]*>)?`")
CHECK_TAGS = {"hide-input", "remove-input", "remove-cell"}


def reading_words(path: Path) -> int:
    """The words a reader reads in a lesson: the words of its Markdown (a role counted as the text
    it shows, the Time line itself left out, link targets and HTML tags left out) and those of
    the code cells a reader sees (identifiers and numbers; the hidden checks left out)."""
    nb = nbformat.read(path, as_version=4)
    words = 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            text = TIME_LINE.sub("", cell.source)
            text = ROLE.sub(lambda m: m.group(1) or "x", text)
            text = re.sub(r"\]\([^)]*\)|<[^>]+>|^:[a-z-]+:.*$|^:::.*$", " ", text, flags=re.M)
            words += sum(1 for token in text.split() if re.search(r"[A-Za-z0-9]", token))
        elif cell.cell_type == "code" and not CHECK_TAGS & set(cell.metadata.get("tags", [])):
            words += len(re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?", cell.source))
    return words


def colab_install(path: Path, timings: dict) -> tuple[float | None, str]:
    """What the lesson's install cell costs in Colab, from timings.json: (seconds or None, what)."""
    source = next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    installs = timings.get("colab-install", {})
    steps = re.findall(r'install --quiet "(fedlib(?:\[[a-z,]+\])?) @', source)
    no_deps = re.findall(r"install --quiet --no-deps (\S+==\S+)", source)    # lesson 10's plays
    steps += no_deps
    if "git clone" in source:
        steps.append("git clone --depth 1")
    if not steps or any(step not in installs for step in steps):
        return None, "not measured"
    seconds = sum(installs[step]["seconds"] for step in steps)
    what = "".join(f", {name.split('==')[0]}" for name in no_deps)
    what += " and cloning the repository for its results" if "git clone" in source else ""
    return seconds, f"{steps[0]}{what}"


def time_line(path: Path, timings: dict) -> str:
    """The **Time:** line at the top of a lesson: a reader's time, from the lesson's words and the
    measurements in timings.json (never a guess: what was not measured says so)."""
    lesson = path.stem
    words = reading_words(path)
    reading = words / READING_WPM * 60
    quick = timings.get("quick-cpu", {}).get(lesson)
    full = timings.get("full-gpu", {}).get(lesson)
    install, what = colab_install(path, timings)
    parts = [f"reading, {minutes(reading)} ({words:,} words of text and code at {READING_WPM} words a minute, "
             f"the average silent reading rate for non-fiction {{cite:p}}`brysbaert2019many`)"]
    parts.append("running it, " + (measured("quick profile on a CPU", **quick) if quick else
                                   "the quick profile on a CPU has not been timed yet"))
    if install is None:
        parts.append("in Colab, installing fedlib: not measured")
    else:
        where = ("from a local package mirror, and the plays downloaded from the package index" if ", " in what
                 else "from a local package mirror")            # lesson 10's plays: measure_install.py's NO_DEPS
        parts.append(f"in Colab, installing {what}, once per runtime: {minutes(install)} (measured: {install:.0f} s "
                     f"{where}, see Setting up)")
    total = reading + (quick["seconds"] if quick else 0) + (install or 0)
    counted = "reading, running and installing" if quick and install is not None else "what was measured"
    second = "The full profile on a GPU: " + (
        f"{minutes(full['seconds'])} (measured: {full['seconds']:.0f} s on {full['machine']}, {full['date']})"
        if full else "not measured (see Setting up)")
    return f"**Time:** {minutes(total)} in all ({counted}): " + "; ".join(parts) + f". {second}."


def times_table(timings: dict, paths: list[Path]) -> str:
    """The table of lesson times in book/setup.md, from the lessons' words and timings.json."""
    kinds = {"quick-cpu": "quick profile, CPU", "quick-gpu": "quick profile, GPU", "full-gpu": "full profile, GPU"}
    rows = ["| lesson | reading | " + " | ".join(kinds.values()) + " | install in Colab |",
            "| --- | --- |" + " --- |" * len(kinds) + " --- |"]
    machines = set()
    for path in paths:
        words = reading_words(path)
        cells = [f"{words:,} words, {minutes(words / READING_WPM * 60).removeprefix('about ')}"]
        for kind, label in kinds.items():
            entry = timings.get(kind, {}).get(path.stem)
            cells.append("not measured" if entry is None else f"{entry['seconds']:.0f} s")
            if entry:
                machines.add(f"the {label.split(',')[0]} on {entry['machine']} ({entry['date']})")
        install, what = colab_install(path, timings)
        cells.append("not measured" if install is None else f"{install:.0f} s ({what})")
        rows.append(f"| {path.stem} | " + " | ".join(cells) + " |")
    installs = timings.get("colab-install", {})
    install_note = "" if not installs else (
        "\n\nThe installs in Colab were measured by `notebooks/measure_install.py` on "
        + "; ".join(sorted({f"{e['machine']} ({e['date']})" for e in installs.values()})) + ": "
        + ", ".join(f"`{name}` {e['seconds']:.0f} s" + (f" ({e['megabytes']:g} MB)" if "megabytes" in e else "")
                    for name, e in sorted(installs.items()))
        + ". Each pip install of fedlib ran in "
        + next(e["conditions"] for n, e in sorted(installs.items()) if n.startswith("fedlib"))
        + ("; the clone " + installs["git clone --depth 1"]["conditions"] if "git clone --depth 1" in installs else "")
        + "".join(f"; `{n}` (installed with --no-deps) in {e['conditions']}"
                  for n, e in sorted(installs.items()) if not n.startswith(("fedlib", "git clone")))
        + ". Colab downloads the same packages and the repository over its network, so there it takes longer "
        "by the time that download needs.")
    return ("\n".join(rows) + "\n\nMeasured: " + ("; ".join(sorted(machines)) or "nothing yet") + "."
            + f" Reading is counted at {READING_WPM} words a minute, the average silent reading rate of "
            "adults for English non-fiction {cite:p}`brysbaert2019many` (text and the code a reader sees; "
            "working through a lesson takes longer)." + install_note + "\n")


def write_times(paths: list[Path], timings: dict) -> None:
    """Rewrite the **Time:** line of each lesson and the table in book/setup.md."""
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0]
        line = time_line(path, timings)
        if TIME_LINE.search(first.source):
            first.source = TIME_LINE.sub(line, first.source)
        else:
            first.source = first.source.rstrip("\n") + "\n\n" + line
        nbformat.write(nb, path)
    lessons = sorted(HERE.glob("[0-9]*.ipynb"))
    page = SETUP_PAGE.read_text()
    if TABLE.search(page):
        SETUP_PAGE.write_text(TABLE.sub(lambda m: m.group(1) + times_table(timings, lessons) + m.group(2), page))


def main(argv: list[str]) -> int:
    metadata_only = "--metadata-only" in argv
    times_only = "--times-only" in argv
    argv = [a for a in argv if a not in ("--metadata-only", "--times-only")]
    os.environ.setdefault("FEDLIB_PROFILE", "quick")
    os.environ.setdefault("FEDLIB_DEVICE", "cpu")
    if os.environ["FEDLIB_PROFILE"] != "quick" or os.environ["FEDLIB_DEVICE"] != "cpu":
        print("note: stored outputs are meant to be FEDLIB_PROFILE=quick FEDLIB_DEVICE=cpu", file=sys.stderr)
    paths = [Path(a).resolve() for a in argv] or sorted(HERE.glob("[0-9]*.ipynb"))
    if times_only:
        write_times(paths, load_timings())
        return 0
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
        record_time(path, seconds)
        print(f"{path.name}: {seconds:.1f} s ({cpu_seconds:.1f} s of kernel CPU time)", flush=True)
    print(f"all {len(paths)} notebooks: {total:.1f} s ({total_cpu:.1f} s of kernel CPU time)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
