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
ASSERT_TAGS = {"hide-input", "remove-input", "remove-cell"}


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
    assert len(installs) == 1, "exactly one install line"
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
    assert "NBVAL_IGNORE_OUTPUT" not in source and "NBVAL_SKIP" not in source, \
        "no output is hidden from nbval: timings are sanitised instead"


def test_sanitize_file_only_touches_timings_addresses_and_progress():
    text = (ROOT / "notebooks" / "nbval_sanitize.cfg").read_text()
    sections = re.findall(r"^\[([^\]]+)\]", text, flags=re.M)
    assert sections == ["timing", "memory-address", "tqdm-progress"]
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


def test_plot_class_counts_rejects_a_vector():
    with pytest.raises(ValueError, match="counts"):
        lessons.plot_class_counts([1, 2, 3])
