"""The book: it builds with warnings as errors, and its pages work in a real browser.

``test_book_in_browser`` builds the site from the notebooks' stored outputs (the commands
of ``make book``), serves ``_build/html`` on 127.0.0.1 and opens every page in headless
Chromium (Debian's ``chromium`` package, driven by Playwright) with every request that
leaves the site blocked except MathJax's, which the test serves from a local copy of the
same version: the pages are checked as a reader sees them, their math typeset.
Screenshots of the landing page (whole) and of the top of the first lesson (launch menu
open) go to ``_build/screenshots/``.
The lessons are the notebooks that ``_toc.yml`` lists, in its order.

``test_portable_lessons_in_browser`` renders each portable lesson (``portable/``, written by
``book/portable.py``) with nbconvert's lab template as JupyterLab shows it (a cell whose source
or output JupyterLab collapses is collapsed: ``book/nbconvert/portable``), and checks in the
same browser what a student in Jupyter or Colab would see: no MyST markup, every number the
site pastes, the math typeset, the solutions closed, every figure. Its screenshots (the top of the first lesson,
and its first solution) go to ``_build/screenshots/portable-*.png``. The site's pages get the
same markup, math and pasted-number checks in ``test_book_in_browser``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest
import yaml
from playwright.sync_api import Page, sync_playwright

from tests.test_portable import portable   # book/portable.py, the generator of the portable lessons

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own download is not used
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# The only thing a page fetches from outside the site: MathJax 3, which typesets the math (the site's
# pages load it from this CDN, and so do the portable lessons rendered here, as JupyterLab 4 uses
# MathJax 3). The test serves the same version's files from the package sphinx-mathjax-offline in
# the CDN's place, so the math is typeset as a reader online sees it; everything else is blocked.
MATHJAX_CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/"
MATHJAX = Path(importlib.metadata.distribution("sphinx-mathjax-offline").locate_file(
    "sphinx-mathjax-offline/static/mathjax"))
COLAB = "https://colab.research.google.com"


# What must never be visible: MyST markup that only the book's build understands.
MYST_MARKUP = ("{glue", "{term}", "{cite}", "{cite:", ":::", "{admonition}", "{ref}", "{doc}", "{numref}", "{math}")


def _load_check_outputs():
    """book/check_outputs.py as a module (it is a script, not part of the fedlib package)."""
    spec = importlib.util.spec_from_file_location("check_outputs", ROOT / "book" / "check_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_outputs = _load_check_outputs()


def lessons() -> list[Path]:
    """The lesson notebooks, as _toc.yml lists them."""
    return [p for p in check_outputs.toc_notebooks(ROOT) if p.parent.name == "notebooks"]


def notebook_title(path: Path) -> str:
    """The text of the first ``# `` heading of a notebook."""
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    raise AssertionError(f"{path.name} has no '# ' title")


def stored_figures(path: Path) -> int:
    """How many images (plots) the notebook's stored outputs hold."""
    return sum(any(mime.startswith("image/") for mime in output.get("data", {}))
               for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
               for output in cell.get("outputs", []))


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def markdown_of(path: Path) -> str:
    """A page's Markdown: a .md page, or the Markdown cells of a notebook."""
    if path.suffix == ".md":
        return path.read_text()
    return "\n\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")


def site_pages() -> list[Path]:
    """Every page of the book, lessons and prose, as _toc.yml lists them."""
    return [p for p in (check_outputs.resolve(e, ROOT) for e in check_outputs.toc_files(ROOT)) if p is not None]


def expected_glue(path: Path) -> list[str]:
    """The numbers (and other values) the site pastes into a page, as MyST-NB prints them."""
    glue = portable.glue_data(nbformat.read(path, as_version=4), path.name) if path.suffix == ".ipynb" else {}
    return portable.printed_glue(markdown_of(path), path, glue, path.name)


# Sphinx's smartquotes print ' and " as curly quotes on the site; the glued value holds straight ones.
STRAIGHT_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def plain_quotes(text: str) -> str:
    return text.translate(STRAIGHT_QUOTES)


def markup_shown(text: str) -> list[str]:
    return [m for m in MYST_MARKUP if m in text]


def offline(allowed: str, blocked: list[str]):
    """A Playwright route handler: the site's own requests pass, MathJax's come from MATHJAX,
    anything else is recorded in ``blocked`` and refused."""
    def route(route) -> None:
        url = route.request.url
        local = MATHJAX / url.removeprefix(MATHJAX_CDN).split("?")[0] if url.startswith(MATHJAX_CDN) else None
        if url.startswith((allowed, "data:")):
            route.continue_()
        elif local is not None and local.is_file():
            route.fulfill(path=local)
        else:
            blocked.append(url)
            route.abort()
    return route


# The text of `selector`'s elements as a reader sees it once MathJax has run, without code (whose
# dollars are code) and without typeset math: any TeX delimiter left in it is math that was not typeset.
UNTYPESET_TEX = r"""selector => [...document.querySelectorAll(selector)].map(root => {
    const copy = root.cloneNode(true);
    copy.querySelectorAll('code, pre, mjx-container, script, style').forEach(e => e.remove());
    return copy.textContent; }).join('\n').match(/\$|\\\(|\\\[/g) || []"""


def typeset_problems(page: Page, where: str, selector: str) -> list[str]:
    """Wait for MathJax to typeset the page; what it could not typeset or showed as an error."""
    if page.locator(f'script[src^="{MATHJAX_CDN}"]').count() == 0:
        return []                               # a page without math loads no MathJax
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
    page.evaluate("() => MathJax.startup.promise")
    problems = []
    errors = page.locator("mjx-merror").all_text_contents()
    if errors:
        problems.append(f"{where}: MathJax could not typeset {errors[:3]}")
    left = page.evaluate(UNTYPESET_TEX, selector)
    if left:
        problems.append(f"{where}: {len(left)} pieces of TeX are shown as source, not typeset")
    return problems


def test_every_notebook_is_in_the_toc():
    """A lesson in notebooks/ that _toc.yml does not list would silently be left out of the book."""
    listed = set(lessons())
    unlisted = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb") if p not in listed)
    assert not unlisted, f"add these to _toc.yml (under Lessons): {unlisted}"


def test_check_outputs_names_lessons_without_outputs(tmp_path, capsys):
    toc = tmp_path / "_toc.yml"
    (tmp_path / "notebooks").mkdir()
    ran = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Ran"),
        nbformat.v4.new_code_cell("1 + 1", execution_count=1, outputs=[
            nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)])])
    nbformat.write(ran, tmp_path / "notebooks" / "01_ran.ipynb")
    toc.write_text("format: jb-book\nroot: notebooks/01_ran\n")
    assert check_outputs.main(["check_outputs.py", str(tmp_path)]) == 0

    toc.write_text("format: jb-book\nroot: notebooks/01_ran\n"
                   "chapters:\n  - file: notebooks/02_not_run\n  - file: notebooks/03_missing\n")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]),
                   tmp_path / "notebooks" / "02_not_run.ipynb")
    capsys.readouterr()
    assert check_outputs.main(["check_outputs.py", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "notebooks/02_not_run.ipynb is not stored with its outputs: 1 of 1 code cells were not run" in err
    assert "_toc.yml lists notebooks/03_missing, which does not exist" in err
    assert "01_ran" not in err


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve a folder on a free port of 127.0.0.1 (quietly); yield its address."""
    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """Build the book as `make book` does, and serve it on a free port of 127.0.0.1."""
    assert CHROMIUM.exists(), "needs Debian's chromium: apt-get install -y chromium"
    check = subprocess.run([sys.executable, "book/check_outputs.py"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # Same command as the Makefile's `book` target: warnings are errors, every page rebuilt.
    build = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", ".",
                            "-W", "-n", "--keep-going", "--all"],
                           cwd=ROOT, capture_output=True, text=True)
    assert build.returncode == 0, f"the book does not build:\n{build.stdout[-6000:]}\n{build.stderr[-6000:]}"
    with serve(HTML) as url:
        yield url


def check_images(page: Page, where: str) -> tuple[int, list[str]]:
    """How many images the page's article shows, and which did not load."""
    images = page.locator("article.bd-article img")
    broken = []
    for i in range(images.count()):
        image = images.nth(i)
        image.scroll_into_view_if_needed()
        loaded = image.evaluate(
            "img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0"
            " && img.getBoundingClientRect().width > 0")
        if not loaded:
            broken.append(f"{where}: image {image.get_attribute('src')} did not load")
    return images.count(), broken


def heading(page: Page) -> str:
    """The visible text of the page's first h1, without Sphinx's '#' permalink."""
    h1 = page.locator("article.bd-article h1").first
    assert h1.is_visible()
    return h1.evaluate("h => { const c = h.cloneNode(true);"
                       " c.querySelectorAll('.headerlink').forEach(a => a.remove());"
                       " return c.textContent.trim(); }")


@pytest.mark.slow
def test_book_in_browser(site: str):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo, branch = config["repository"]["url"].rstrip("/"), config["repository"]["branch"]
    lesson_paths = lessons()
    assert lesson_paths, "_toc.yml lists no lessons"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    blocked: list[str] = []

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.route("**/*", offline(site, blocked))
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"{page.url}: script error {exc}"))

        # The landing page: index.html redirects to it.
        response = page.goto(f"{site}/index.html")
        assert response.status == 200
        page.wait_for_url("**/book/intro.html")
        response = page.goto(page.url)
        assert response.status == 200
        assert heading(page), "the landing page has no title"
        pasted = page.locator(".pasted-text").all_inner_texts()
        assert pasted and all(t.strip() for t in pasted), "numbers glued from the lessons are missing"
        page.screenshot(path=SCREENSHOTS / "landing.png", full_page=True)

        for name, must_show in [("setup", "fedlib_data"), ("glossary", "client drift"),
                                ("bibliography", "communication-efficient learning")]:
            response = page.goto(f"{site}/book/{name}.html")
            if response.status != 200 or must_show not in page.locator("article").inner_text().lower():
                problems.append(f"book/{name}.html: status {response.status}, or '{must_show}' not shown")

        for number, notebook in enumerate(lesson_paths):
            rel = notebook.relative_to(ROOT)
            response = page.goto(f"{site}/{rel.with_suffix('.html').as_posix()}")
            if response.status != 200:
                problems.append(f"{rel}: status {response.status}")
                continue
            title = heading(page)
            if not set(words(notebook_title(notebook))) <= set(words(title)):
                problems.append(f"{rel}: shows the title {title!r}, not {notebook_title(notebook)!r}")

            page.locator(".dropdown-launch-buttons button").click()
            colab = page.locator(f'.dropdown-launch-buttons a[href^="{COLAB}"]')
            # The Colab button opens the lesson's portable copy (book/_ext/portable_launch.py).
            expected = portable.colab_url(notebook)
            assert expected == (f"{COLAB}/github/{repo.removeprefix('https://github.com/')}/blob/{branch}/"
                                f"{portable.PORTABLE_FOLDER}/{notebook.name}")
            if colab.count() != 1 or not colab.is_visible():
                problems.append(f"{rel}: no visible Colab launch button")
            elif colab.get_attribute("href") != expected:
                problems.append(f"{rel}: Colab opens {colab.get_attribute('href')}, not {expected}")
            sources = page.locator(".dropdown-source-buttons a").evaluate_all("as => as.map(a => a.href)")
            if repo not in sources or not any(s.startswith(f"{repo}/issues/new") for s in sources):
                problems.append(f"{rel}: repository and issue buttons missing, found {sources}")
            if number == 0:  # the top of the page, with the launch menu open, its math typeset
                typeset_problems(page, str(rel), "article.bd-article")     # (its problems: every page, below)
                page.screenshot(path=SCREENSHOTS / f"{notebook.stem}.png")
            count, broken = check_images(page, str(rel))
            problems += broken
            if count < stored_figures(notebook):
                problems.append(f"{rel}: shows {count} images, the notebook holds {stored_figures(notebook)} figures")
            # Text content, not inner text: a citation in a collapsed solution is not visible until opened.
            shown = [" ".join(t.split()) for t in
                     page.locator("article.bd-article .bibtex-citation").all_text_contents()]
            cited = portable.printed_citations(markdown_of(notebook), str(rel))
            if shown != cited:
                problems.append(f"{rel}: the site prints the citations {shown}, the portable copy {cited}")

        # Every page: no MyST markup visible, every pasted value there (solutions included).
        for path in site_pages():
            rel = path.relative_to(ROOT).with_suffix(".html").as_posix()
            page.goto(f"{site}/{rel}")
            article = page.locator("article.bd-article")
            visible, text = article.inner_text(), plain_quotes(article.text_content())
            if markup_shown(visible):
                problems.append(f"{rel}: shows MyST markup {markup_shown(visible)}")
            problems += typeset_problems(page, rel, "article.bd-article")
            missing = [v for v in expected_glue(path) if plain_quotes(v) not in text]
            if missing:
                problems.append(f"{rel}: the pasted values {missing} are not on the page")

        # The anchors that the portable lessons link to exist on the site.
        page.goto(f"{site}/book/glossary.html")
        for anchor in portable.glossary_anchors().values():
            if page.locator(f"[id='{anchor}']").count() != 1:
                problems.append(f"book/glossary.html has no #{anchor}")
        page.goto(f"{site}/book/bibliography.html")
        for key in portable.bibliography():
            if page.locator(f"[id='{portable.cite_anchor(key)}']").count() != 1:
                problems.append(f"book/bibliography.html has no #{portable.cite_anchor(key)}")
        browser.close()

    assert not blocked, f"pages fetch from outside the site: {sorted(set(blocked))}"
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def portable_site() -> Iterator[str]:
    """Each portable lesson rendered as JupyterLab shows it (nbconvert's lab template, with the
    collapsed cells collapsed: book/nbconvert/portable), served on a free port of 127.0.0.1."""
    from nbconvert import HTMLExporter

    out = ROOT / "_build" / "portable"
    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="portable", extra_template_basedirs=[str(ROOT / "book" / "nbconvert")],
                            mathjax_url=f"{MATHJAX_CDN}tex-mml-chtml.js")
    for source in portable.lessons():
        nb = nbformat.read(portable.portable_path(source), as_version=4)
        for cell in nb.cells:   # glue records have no mime type Jupyter renders: it shows nothing for them
            cell["outputs"] = [o for o in cell.get("outputs", []) if "scrapbook" not in o.get("metadata", {})]
        body, _ = exporter.from_notebook_node(nb)
        (out / f"{source.stem}.html").write_text(body)
    with serve(out) as url:
        yield url


@pytest.mark.slow
def test_portable_lessons_in_browser(portable_site: str):
    """What a student who opens a portable lesson in Jupyter sees, its math typeset by MathJax 3 as
    JupyterLab does. Other external requests (nbconvert's pages load require.js from a CDN, which
    these pages do not need) are blocked."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    blocked: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.route("**/*", offline(portable_site, blocked))
        page = context.new_page()
        for number, source in enumerate(portable.lessons()):
            name = f"portable/{source.name}"
            assert page.goto(f"{portable_site}/{source.stem}.html").status == 200
            markdown = page.locator(".jp-RenderedMarkdown")
            visible = page.locator("body").inner_text()
            text = "\n".join(markdown.all_text_contents())
            if markup_shown(visible) or markup_shown(text):
                problems.append(f"{name}: shows MyST markup {markup_shown(visible) or markup_shown(text)}")
            problems += typeset_problems(page, name, ".jp-RenderedMarkdown")
            missing = [v for v in expected_glue(source) if v not in text]
            if missing:
                problems.append(f"{name}: the values the site pastes, {missing}, are not on the page")

            # Solutions: closed <details>, their text not visible until opened.
            solutions = page.locator(".jp-RenderedMarkdown details")
            lesson = nbformat.read(source, as_version=4)
            expected = len(re.findall(r"^:::\{admonition\}.*\n:class: dropdown", markdown_of(source), flags=re.M))
            if solutions.count() != expected or expected == 0:
                problems.append(f"{name}: {solutions.count()} collapsible solutions, expected {expected}")
            for i in range(solutions.count()):
                details = solutions.nth(i)
                if details.evaluate("d => d.open") or details.locator(":scope > :not(summary)").first.is_visible():
                    problems.append(f"{name}: solution {i + 1} is open")
            # Solution and check cells: their code is collapsed, as JupyterLab collapses it.
            hidden = [c for c in lesson.cells if c.cell_type == "code" and set(c.metadata.get("tags", [])) & (
                portable.SOLUTION_TAGS | portable.CHECK_TAGS)]
            collapsed = page.locator("details.portable-collapsed-input")
            if collapsed.count() != len(hidden) or not hidden:
                problems.append(f"{name}: {collapsed.count()} collapsed code cells, expected {len(hidden)}")
            for i in range(collapsed.count()):
                if collapsed.nth(i).evaluate("d => d.open") or collapsed.nth(i).locator(".jp-InputArea-editor").is_visible():
                    problems.append(f"{name}: the code of hidden cell {i + 1} is visible")
            # Every figure is there and decodes (some sit in collapsed solution outputs).
            images = page.locator("img")
            broken = images.evaluate_all("is => is.filter(i => !(i.complete && i.naturalWidth > 0)).length")
            if images.count() != stored_figures(source) or broken:
                problems.append(f"{name}: {images.count()} images ({broken} broken), the lesson holds "
                                f"{stored_figures(source)} figures")
            if number == 0:   # what a student sees: the top of the lesson, and its first solution
                page.screenshot(path=SCREENSHOTS / f"portable-{source.stem}.png")
                solutions.first.scroll_into_view_if_needed()
                page.evaluate("window.scrollBy(0, -300)")
                page.screenshot(path=SCREENSHOTS / f"portable-{source.stem}-solution.png")
        browser.close()
    from nbconvert import HTMLExporter
    assert set(blocked) <= {HTMLExporter().require_js_url}, f"the pages fetch {sorted(set(blocked))}"
    assert not problems, "\n".join(problems)
