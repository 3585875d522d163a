"""Write the portable copy of every lesson: what Colab, JupyterLab and VS Code show as the book does.

The lessons (``notebooks/NN_*.ipynb``) are written in MyST Markdown for the book's build:
``{glue:text}`` pastes a number the lesson computed, ``{term}`` links the glossary, ``{cite}``
cites the bibliography, ``:::{admonition}`` folds a solution away. Only the book's build
(Sphinx with MyST-NB) understands them; Jupyter, Colab and VS Code show them as raw text.
This script writes ``portable/NN_*.ipynb`` from each lesson, with

- every ``{glue:text}`` / ``{glue}`` replaced by the text the site prints for it (MyST-NB's
  own formatting of the stored ``text/plain``, format specs such as ``:.1%`` included);
- ``{term}`` as the plain word linked to the site's glossary entry, ``{cite}`` as
  "(Author, year)" / "Author (year)" linked to the site's bibliography, ``{ref}``, ``{doc}``
  and ``{numref}`` as links to the site, ``{math}`` as ``$...$``;
- admonitions as Markdown that Jupyter and Colab render: a closed ``<details>`` for a
  dropdown (the solutions), a blockquote with a bold title for the others; labels and MyST
  comments removed, ``{math}`` directives as ``$$`` blocks;
- the solution cells and hidden checks collapsed where the platform can: Colab's form view
  (``"cellView": "form"`` and a first line ``#@title ...``) and JupyterLab's and VS Code's
  ``metadata.jupyter.source_hidden`` (``outputs_hidden`` too where the book hides the output);
- a first code cell that installs ``fedlib`` in Colab from ``_config.yml``'s
  ``repository.url`` and, anywhere else, stops with a clear message if ``fedlib`` is missing.

Everything else (the code of every other cell, the stored outputs, the tags, the cell ids) is
copied unchanged, so a portable copy runs exactly as its source (``tests/test_portable.py``
checks that, and that every committed copy is what this script writes now). Any markup this
script does not know how to convert stops it with an error naming the lesson and the markup:
nothing MyST-only is ever left in a copy silently.

Usage: python book/portable.py [--check]     (``make portable``; ``--check`` writes nothing and
exits 1 naming every copy that is missing or out of date)
"""

from __future__ import annotations

import copy
import functools
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# The copies live in portable/, a sibling of notebooks/ (the launch buttons and the README's badges
# open them there): at the same depth, so that a lesson's relative paths (../results/...) mean the
# same in its copy, run in JupyterLab or under nbval from a clone.
PORTABLE_FOLDER = "portable"
PORTABLE = ROOT / PORTABLE_FOLDER
COLAB = "https://colab.research.google.com"
GLUE_PREFIX = "application/papermill.record/"

SOLUTION_TAGS = {"hide-cell", "remove-cell"}     # the book hides input and output: a solution
CHECK_TAGS = {"hide-input", "remove-input"}      # the book hides the input only: a hidden check
HIDE_OUTPUT_TAGS = {"hide-output", "remove-output"}

# Sphinx's titles of the named admonitions (what the site prints above them).
ADMONITION_TITLES = {"note": "Note", "warning": "Warning", "tip": "Tip", "important": "Important",
                     "hint": "Hint", "caution": "Caution", "attention": "Attention", "danger": "Danger",
                     "error": "Error", "seealso": "See also"}


class PortableError(ValueError):
    """A lesson holds something this script cannot convert (or a glue name it cannot find)."""


# --- the settings ----------------------------------------------------------------------------

@functools.cache
def config(root: Path = ROOT) -> dict:
    return yaml.safe_load((root / "_config.yml").read_text())


def repository_url(root: Path = ROOT) -> str:
    """``repository.url`` of _config.yml: the one setting that the install cells, the Colab
    badges and the launch buttons are all built from."""
    return config(root)["repository"]["url"].rstrip("/")


def repository_branch(root: Path = ROOT) -> str:
    return config(root)["repository"].get("branch", "main")


def site_url(root: Path = ROOT) -> str:
    """Where the book is published, ending in '/': ``html.baseurl`` if _config.yml sets one,
    else the GitHub Pages address of ``repository.url`` (https://ORG.github.io/REPO/)."""
    base = (config(root).get("html") or {}).get("baseurl")
    if base:
        return base.rstrip("/") + "/"
    org, repo = github_parts(repository_url(root))
    return f"https://{org.lower()}.github.io/{repo}/"


def github_parts(url: str) -> tuple[str, str]:
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?", url)
    if not match:
        raise PortableError(f"repository.url must be https://github.com/ORG/REPO (Colab opens GitHub), got {url!r}")
    return match.group(1), match.group(2)


def portable_path(source: Path) -> Path:
    """notebooks/NN_name.ipynb -> portable/NN_name.ipynb."""
    return source.parent.parent / PORTABLE_FOLDER / source.name


def relative(path: Path) -> str:
    """A path as the messages and the copies name it: from the repository root."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.name


def colab_url(source: Path, root: Path = ROOT) -> str:
    """The address that opens the portable copy of ``source`` in Colab (badges, launch buttons)."""
    org, repo = github_parts(repository_url(root))
    rel = portable_path(source).relative_to(source.parent.parent).as_posix()
    return f"{COLAB}/github/{org}/{repo}/blob/{repository_branch(root)}/{rel}"


def lessons(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# --- glue: the text the site prints ------------------------------------------------------------

def glue_data(nb: nbformat.NotebookNode, where: str) -> dict[str, dict]:
    """name -> mime bundle of every value the lesson glued, read the way MyST-NB reads it
    (outputs whose metadata has ``scrapbook``; the mime prefix stripped). A name glued twice
    is an error here (MyST-NB warns, and the book builds with warnings as errors)."""
    data: dict[str, dict] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            meta = output.get("metadata", {}).get("scrapbook")
            if not meta:
                continue
            prefix = len(meta.get("mime_prefix", ""))
            if meta["name"] in data:
                raise PortableError(f"{where}: glue name {meta['name']!r} is glued twice")
            data[meta["name"]] = {mime[prefix:]: value for mime, value in output.get("data", {}).items()}
    return data


def format_glue_text(text: str, fmt: str) -> str:
    """What ``{glue:text}`key:fmt``` prints: MyST-NB's own function (the quotes of a str's repr
    stripped, then ``format(value, fmt)``), so this text is the site's by construction."""
    from myst_nb.core.variables import format_plain_text
    return format_plain_text(text, fmt)


@functools.cache
def _glue_of(path: Path) -> dict[str, dict]:
    return glue_data(nbformat.read(path, as_version=4), path.name)


def glue_text(role: str, content: str, glue: dict[str, dict], doc: Path, where: str) -> str:
    """The text of one glue role, as the site prints it (the role's ``path::key`` form reads
    another notebook's glue, as MyST-NB does)."""
    if role == "glue:text":   # parsed as MyST-NB 1.4's PasteTextRole parses it
        parts = content.rsplit(":", 1)
        key, fmt = parts if len(parts) == 2 else (parts[0], "s")
    else:                      # {glue} / {glue:any}: the text/plain output as it is
        key, fmt = content, None
    if "::" in key:
        other, key = key.split("::", 1)
        path = (ROOT / other.lstrip("/")) if other.startswith("/") else (doc.parent / other)
        glue = _glue_of(path.resolve())
    if key not in glue:
        raise PortableError(f"{where}: {{{role}}}`{content}`: no glue named {key!r} in the stored outputs "
                            "(execute the lesson: notebooks/execute.py)")
    plain = glue[key].get("text/plain")
    if plain is None:
        raise PortableError(f"{where}: glue {key!r} has no text/plain to paste")
    try:
        return format_glue_text(plain, fmt) if fmt is not None else plain
    except (ValueError, TypeError) as error:
        raise PortableError(f"{where}: glue {key!r} cannot be formatted with {fmt!r}: {error}") from None


# --- the glossary, the bibliography and the book's pages --------------------------------------

@functools.cache
def glossary_anchors(root: Path = ROOT) -> dict[str, str]:
    """lower-cased term -> the id Sphinx gives its entry on the glossary page
    (``term-`` + ``sphinx.util.nodes._make_id`` of the term as written, as
    ``sphinx.domains.std.make_glossary_term`` does; ``{term}`` matches case-insensitively)."""
    from sphinx.util.nodes import _make_id

    text = (root / "book" / "glossary.md").read_text()
    block = re.search(r"^```\{glossary\}[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    if not block:
        raise PortableError("book/glossary.md has no ```{glossary} block")
    anchors: dict[str, str] = {}
    for line in block.group(1).splitlines():
        if not line.strip() or line[0].isspace() or line.startswith(":"):
            continue
        anchor = _make_id(f"term-{line.strip()}")
        if anchor == "term" or anchor in anchors.values():
            # Sphinx would fall back to a serial number that only the build knows.
            raise PortableError(f"glossary term {line.strip()!r} has no id of its own ({anchor!r})")
        anchors[line.strip().lower()] = anchor
    return anchors


@dataclass(frozen=True)
class Reference:
    key: str
    authors: str      # "McMahan et al.", "Glorot and Bengio", "Mironov"
    year: str
    order: int        # position in the site's bibliography (pybtex's plain style sorting)


@functools.cache
def bibliography(root: Path = ROOT) -> dict[str, Reference]:
    """The references of book/references.bib, labelled as the site labels them: the last name
    of a single author, "A and B" for two, "A et al." for three or more."""
    import pybtex.database
    import pybtex.plugin
    from pybtex.richtext import Text

    files = [root / f for f in config(root).get("bibtex_bibfiles", ["book/references.bib"])]
    entries = {}
    for file in files:
        entries.update(pybtex.database.parse_file(str(file)).entries)
    style = pybtex.plugin.find_plugin("pybtex.style.formatting", config(root).get("sphinx", {}).get(
        "config", {}).get("bibtex_default_style", "plain"))()
    order = {entry.key: i for i, entry in enumerate(style.sort(entries.values()))}

    def last(person) -> str:
        return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text")

    refs = {}
    for key, entry in entries.items():
        persons = entry.persons.get("author") or entry.persons.get("editor")
        if not persons:
            raise PortableError(f"references.bib: {key} has no author")
        names = [last(p) for p in persons]
        if len(names) >= 3 or names[-1] == "others":
            authors = f"{names[0]} et al."
        elif len(names) == 2:
            authors = f"{names[0]} and {names[1]}"
        else:
            authors = names[0]
        refs[key] = Reference(key, authors, entry.fields.get("year", "n.d."), order[key])
    return refs


def cite_anchor(key: str) -> str:
    """The id of a reference on the bibliography page: _config.yml's ``bibtex_cite_id``
    ("cite-{key}") through docutils' make_id, as sphinxcontrib-bibtex makes it."""
    from docutils.nodes import make_id
    template = config().get("sphinx", {}).get("config", {}).get("bibtex_cite_id")
    if not template:
        raise PortableError("_config.yml must set sphinx.config.bibtex_cite_id (stable bibliography anchors)")
    return make_id(template.format(key=key, bibliography_count=1))


def _emphasise_et_al(authors: str) -> str:
    return authors.replace(" et al.", " *et al.*")


def citation(kind: str, content: str, where: str, markdown: bool = True) -> str:
    """``{cite:p}`` -> (Author et al., 2017; Other, 2019), ``{cite:t}`` -> Author et al. (2017),
    each linked to its entry on the site's bibliography, in the bibliography's order (the text
    the site prints, book/_ext/citation_style.py; ``markdown=False``: that text, unlinked)."""
    refs = bibliography()
    keys = [k.strip() for k in content.split(",") if k.strip()]
    missing = [k for k in keys if k not in refs]
    if missing:
        raise PortableError(f"{where}: {{{kind}}}`{content}`: not in references.bib: {missing}")
    page = site_url() + "book/bibliography.html"
    cited = sorted((refs[k] for k in keys), key=lambda r: r.order)

    def link(text: str, ref: Reference) -> str:
        return f"[{text}]({page}#{cite_anchor(ref.key)})" if markdown else text

    def authors(ref: Reference) -> str:
        return _emphasise_et_al(ref.authors) if markdown else ref.authors

    if kind in ("cite", "cite:p"):
        return "(" + "; ".join(link(f"{authors(r)}, {r.year}", r) for r in cited) + ")"
    if kind == "cite:t":
        return "; ".join(f"{authors(r)} ({link(r.year, r)})" for r in cited)
    raise PortableError(f"{where}: the citation role {{{kind}}} is not converted (use cite:p or cite:t)")


ROLE = re.compile(r"\{(?P<role>[A-Za-z0-9:_+-]+)\}`(?P<content>[^`]*)`")


def printed_glue(markdown: str, doc: Path, glue: dict[str, dict], where: str) -> list[str]:
    """The text the site prints for each glue role of a page's Markdown, in order."""
    return [glue_text(m.group("role"), m.group("content"), glue, doc, where) for m in ROLE.finditer(markdown)
            if m.group("role") in ("glue:text", "glue", "glue:any")]


def printed_citations(markdown: str, where: str) -> list[str]:
    """The text the site prints for each citation of a page's Markdown, in order."""
    return [citation(m.group("role"), m.group("content"), where, markdown=False) for m in ROLE.finditer(markdown)
            if m.group("role").startswith("cite")]


def toc_docs(root: Path = ROOT) -> list[str]:
    """The book's documents (docnames, no suffix), from _toc.yml."""
    sys.path.insert(0, str(root / "book"))
    try:
        import check_outputs
    finally:
        sys.path.pop(0)
    return [entry.removesuffix(".md").removesuffix(".ipynb") for entry in check_outputs.toc_files(root)]


def _markdown_of(docname: str, root: Path) -> str:
    md, ipynb = root / f"{docname}.md", root / f"{docname}.ipynb"
    if md.exists():
        return md.read_text()
    nb = nbformat.read(ipynb, as_version=4)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@functools.cache
def book_targets(root: Path = ROOT) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """(label -> (docname, title of the section it labels), docname -> title of the page)."""
    labels, titles = {}, {}
    for doc in toc_docs(root):
        text = _markdown_of(doc, root)
        heading = re.search(r"^#\s+(.+)$", text, flags=re.M)
        titles[doc] = heading.group(1).strip() if heading else doc
        for match in re.finditer(r"^\(([^)\s]+)\)=\s*\n+#+\s+(.+)$", text, flags=re.M):
            labels[match.group(1)] = (doc, match.group(2).strip())
    return labels, titles


# --- Markdown ------------------------------------------------------------------------------------

ROLE_OR_CODE = re.compile(r"(?P<code>`+)(?:.*?)(?P=code)|\{(?P<role>[A-Za-z0-9:_+-]+)\}`(?P<content>[^`]*)`", re.S)
EXPLICIT = re.compile(r"^(?P<text>.*?)\s*<(?P<target>[^<>]+)>$", re.S)
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]$#|~])")


def escape_text(text: str) -> str:
    """Plain text pasted into Markdown, shown as itself: Markdown's special characters escaped,
    < > & as entities (a '>' that starts a line would otherwise open a blockquote)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


@dataclass
class Context:
    """What converting one notebook's Markdown needs."""
    doc: Path                      # the source notebook (or page)
    glue: dict[str, dict]
    where: str


def _explicit(content: str) -> tuple[str | None, str]:
    match = EXPLICIT.match(content)
    return (match.group("text"), match.group("target").strip()) if match else (None, content.strip())


def _doc_target(target: str, ctx: Context) -> str:
    """A {doc} target (relative to the document, or absolute from the book root) as a docname."""
    target = target.removesuffix(".md").removesuffix(".ipynb")
    if target.startswith("/"):
        return target.lstrip("/")
    return (ctx.doc.parent / target).resolve().relative_to(ROOT).as_posix()


def convert_role(role: str, content: str, ctx: Context) -> str:
    where = f"{ctx.where}: {{{role}}}`{content}`"
    if role in ("glue:text", "glue", "glue:any"):
        return escape_text(glue_text(role, content, ctx.glue, ctx.doc, ctx.where))
    if role == "term":
        text, target = _explicit(content)
        anchor = glossary_anchors().get(target.lower())
        if anchor is None:
            raise PortableError(f"{where}: {target!r} is not a term of book/glossary.md")
        return f"[{text or target}]({site_url()}book/glossary.html#{anchor})"
    if role.startswith("cite"):
        return citation(role, content, ctx.where)
    if role in ("ref", "numref"):
        from docutils.nodes import make_id
        text, target = _explicit(content)
        labels, _ = book_targets()
        if target not in labels:
            raise PortableError(f"{where}: no label ({target})= in the book")
        doc, title = labels[target]
        if role == "numref" and text is None:
            raise PortableError(f"{where}: give {{numref}} an explicit text (the number exists only in the build)")
        return f"[{text or title}]({site_url()}{doc}.html#{make_id(target)})"
    if role == "doc":
        text, target = _explicit(content)
        doc = _doc_target(target, ctx)
        _, titles = book_targets()
        if doc not in titles:
            raise PortableError(f"{where}: {doc} is not a page of the book (_toc.yml)")
        return f"[{text or titles[doc]}]({site_url()}{doc}.html)"
    if role == "math":
        return f"${content}$"
    if role in ("sub", "sup"):
        return f"<{role}>{content}</{role}>"
    if role == "abbr":
        return _explicit(content.replace("(", "<", 1).replace(")", ">", 1))[0] or content
    raise PortableError(f"{where}: the role {{{role}}} is not converted by book/portable.py")


def convert_inline(text: str, ctx: Context) -> str:
    """Every role of a piece of Markdown converted; code spans left alone."""
    def replace(match: re.Match) -> str:
        if match.group("code"):
            return match.group(0)
        return convert_role(match.group("role"), match.group("content"), ctx)
    return ROLE_OR_CODE.sub(replace, text)


FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,}|:{3,})(?P<info>.*)$")
DIRECTIVE = re.compile(r"^\{(?P<name>[A-Za-z0-9:_-]+)\}\s*(?P<arg>.*)$")
LABEL = re.compile(r"^\s*\([^)\s]+\)=\s*$")


def _closes(line: str, fence: str) -> bool:
    match = FENCE.match(line)
    return bool(match and match.group("fence")[0] == fence[0] and len(match.group("fence")) >= len(fence)
                and not match.group("info").strip())


def _blocks(lines: list[str]) -> Iterator[tuple[str, object]]:
    """Split Markdown lines into ('text', line), ('code', [lines]), ('math', [lines]) and
    ('directive', (name, arg, options, body lines, indent))."""
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            mark, info = fence.group("fence"), fence.group("info").strip()
            end = next((j for j in range(i + 1, len(lines)) if _closes(lines[j], mark)), None)
            if end is None:
                raise PortableError(f"an unclosed fence {mark}{info}")
            body = lines[i + 1:end]
            directive = DIRECTIVE.match(info)
            if directive:
                options = {}
                while body and re.match(r"^\s*:[A-Za-z0-9_-]+:", body[0]):
                    key, _, value = body.pop(0).strip()[1:].partition(":")
                    options[key] = value.strip()
                if body and body[0].strip() == "---":
                    raise PortableError(f"YAML options of {{{directive.group('name')}}} are not converted")
                yield "directive", (directive.group("name"), directive.group("arg"), options, body,
                                    fence.group("indent"))
            elif mark[0] == ":":
                raise PortableError(f"a ::: fence without a directive: {line!r}")
            else:
                yield "code", lines[i:end + 1]
            i = end + 1
            continue
        if line.strip().startswith("$$"):
            end = i if line.strip().endswith("$$") and len(line.strip()) > 2 else next(
                (j for j in range(i + 1, len(lines)) if lines[j].strip().endswith("$$")), None)
            if end is None:
                raise PortableError("an unclosed $$ block")
            yield "math", lines[i:end + 1]
            i = end + 1
            continue
        yield "text", line
        i += 1


def _quote(lines: list[str]) -> list[str]:
    """Lines as a Markdown blockquote. A $$ block inside is put on one line: Jupyter finds the
    math before it parses the Markdown, so a '>' on an inner line would end up in the TeX."""
    out, math = [], None
    for line in lines:
        if math is not None:
            math.append(line.strip())
            if line.strip().endswith("$$"):
                out.append("> " + " ".join(math))
                math = None
        elif line.strip().startswith("$$") and not (line.strip().endswith("$$") and len(line.strip()) > 2):
            math = [line.strip()]
        else:
            out.append(("> " + line).rstrip())
    if math is not None:
        raise PortableError("an unclosed $$ block inside an admonition")
    return out


LEFTOVER = re.compile(r"\{[A-Za-z0-9:_+-]+\}`|^ {0,3}:::|^\([^)\s]+\)=\s*$", flags=re.M)


def visible_markup(markdown: str) -> list[str]:
    """MyST markup left in converted Markdown, outside code (empty when the conversion is complete)."""
    text = re.sub(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1\s*$", "", markdown, flags=re.M | re.S)
    text = re.sub(r"(`+).*?\1", "", text, flags=re.S)
    return [m.group(0) for m in LEFTOVER.finditer(text)]


def convert_markdown(source: str, ctx: Context) -> str:
    """A MyST Markdown cell as Markdown that Jupyter, JupyterLab, Colab and VS Code render."""
    text = "\n".join(_convert_lines(source.splitlines(), ctx)).strip("\n")
    left = visible_markup(text)
    if left:
        raise PortableError(f"{ctx.where}: MyST markup left after the conversion: {left}")
    return text


def _convert_lines(lines: list[str], ctx: Context) -> list[str]:
    out: list[str] = []
    for kind, block in _blocks(lines):
        if kind == "text":
            line = block
            if LABEL.match(line) or line.strip() == "+++" or line.startswith("%"):
                continue          # a target, a block break, a MyST comment: nothing to show
            out.append(convert_inline(line, ctx))
        elif kind in ("code", "math"):
            out.extend(block)
        else:
            out.extend(_convert_directive(*block, ctx=ctx))
    return out


def _convert_directive(name: str, arg: str, options: dict, body: list[str], indent: str,
                       ctx: Context) -> list[str]:
    classes = options.get("class", "").split()
    if name in ("admonition", "dropdown") or name in ADMONITION_TITLES:
        title = arg.strip() if name in ("admonition", "dropdown") else (arg.strip() or ADMONITION_TITLES[name])
        if name == "admonition" and not title:
            raise PortableError(f"{ctx.where}: an admonition without a title")
        content = _convert_lines(body, ctx)
        while content and not content[0].strip():
            content.pop(0)
        while content and not content[-1].strip():
            content.pop()
        title = convert_inline(title, ctx)
        if name == "dropdown" or "dropdown" in classes:
            # A closed <details>, as the site's dropdown; the blank lines let Jupyter and
            # Colab render the Markdown inside it.
            return [f"<details>\n<summary>{title}</summary>", "", *content, "", "</details>"]
        return _quote([f"**{title}**", "", *content])
    if name == "math":
        return ["$$", *body, "$$"]
    if name in ("code-block", "code", "sourcecode"):
        return [f"```{arg.strip()}", *body, "```"]
    raise PortableError(f"{ctx.where}: the directive {{{name}}} is not converted by book/portable.py")


# --- code cells ----------------------------------------------------------------------------------

def non_colab_branch() -> str:
    """What the install cell does outside Colab: nothing if fedlib is importable, else stop with
    a message that says how to install it (the same source in every portable copy)."""
    return (
        "else:  # JupyterLab, VS Code, a course's machine: fedlib must be installed in this kernel's environment\n"
        "    import importlib.util\n"
        "\n"
        "    if importlib.util.find_spec(\"fedlib\") is None:\n"
        "        raise ModuleNotFoundError(\"fedlib is not installed in this kernel's environment: run \"\n"
        f"                                  \"%pip install 'fedlib @ git+{repository_url()}' in a cell \"\n"
        "                                  \"(or `make setup` in a clone of the repository), then restart the kernel\")"
    )


INSTALL_URL = re.compile(r"git\+(?P<url>https://[^\s\"'@]+)")
CLONE_URL = re.compile(r"(?P<prefix>!git clone\b[^\n]*?)(?P<url>https://\S+)")


def install_cell_source(source: str, where: str) -> str:
    """The source's first code cell, with the repository URL taken from _config.yml and the
    non-Colab branch added after the Colab branch."""
    if 'if "google.colab" in sys.modules:' not in source:
        raise PortableError(f"{where}: the first code cell has no Colab branch (notebooks/README.md)")
    if re.search(r"^else\b", source, flags=re.M):
        raise PortableError(f"{where}: the first code cell already has an else branch")
    url = repository_url()
    source = INSTALL_URL.sub(lambda m: f"git+{url}", source)
    source = CLONE_URL.sub(lambda m: m.group("prefix") + url, source)
    return source.rstrip("\n") + "\n" + non_colab_branch()


def form_title(cell: nbformat.NotebookNode, exercise: str | None) -> str | None:
    """The #@title of a cell that the book hides (None for a cell it shows)."""
    tags = set(cell.metadata.get("tags", []))
    if tags & SOLUTION_TAGS:
        return f"Solution to exercise {exercise}" if exercise else "Solution"
    if tags & CHECK_TAGS:
        return "Hidden check of the lesson's results"
    return None


def convert_code_cell(cell: nbformat.NotebookNode, exercise: str | None) -> nbformat.NotebookNode:
    cell = copy.deepcopy(cell)
    tags = set(cell.metadata.get("tags", []))
    title = form_title(cell, exercise)
    if title:
        cell.source = f"#@title {title}\n{cell.source}"
        cell.metadata["cellView"] = "form"                       # Colab: show the form, hide the code
        jupyter = {"source_hidden": True}                         # JupyterLab, VS Code: input collapsed
        if tags & (SOLUTION_TAGS | HIDE_OUTPUT_TAGS):
            jupyter["outputs_hidden"] = True
        cell.metadata["jupyter"] = jupyter
    elif tags & HIDE_OUTPUT_TAGS:
        cell.metadata["jupyter"] = {"outputs_hidden": True}
    return cell


# --- one lesson ----------------------------------------------------------------------------------

EXERCISE = re.compile(r"^#{2,4}\s+Exercise\s+(\d+)", flags=re.M)


def header_note(source: Path) -> str:
    rel = relative(source)
    page = f"{site_url()}{rel.removesuffix('.ipynb')}.html"
    return (f"*This is the portable copy of `{rel}` for Colab, JupyterLab and VS Code, written by "
            f"`book/portable.py`: edit the lesson, not this copy. The same lesson on the book's site: "
            f"[{page}]({page}).*")


def portable_notebook(source: Path) -> nbformat.NotebookNode:
    """The portable copy of one lesson (see the module's docstring)."""
    nb = nbformat.read(source, as_version=4)
    where = relative(source)
    ctx = Context(doc=source, glue=glue_data(nb, where), where=where)
    out = copy.deepcopy(nb)
    exercise, first_code, first_markdown = None, True, True
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            try:
                text = convert_markdown(cell.source, ctx)
            except PortableError as error:
                raise PortableError(f"{where}, cell {i + 1}: {error}") from None
            if first_markdown:
                text = text + "\n\n" + header_note(source)
                first_markdown = False
            out.cells[i].source = text
            for match in EXERCISE.finditer(cell.source):
                exercise = match.group(1)
        elif cell.cell_type == "code":
            new = convert_code_cell(cell, exercise)
            if first_code:
                new.source = install_cell_source(cell.source, where)
                first_code = False
            out.cells[i] = new
    nbformat.validate(out)
    return out


def render(nb: nbformat.NotebookNode) -> str:
    """The file's text, exactly as nbformat.write writes it."""
    return nbformat.writes(nb) + "\n"


def stale(root: Path = ROOT) -> list[Path]:
    """The portable copies that are missing or differ from what this script writes now."""
    out_of_date = [portable_path(p) for p in lessons(root)
                   if not portable_path(p).exists() or portable_path(p).read_text() != render(portable_notebook(p))]
    readme = root / "README.md"
    if readme.exists() and readme_with_badges(readme.read_text(), root) != readme.read_text():
        out_of_date.append(readme)
    return out_of_date


def write_all(root: Path = ROOT) -> list[Path]:
    """Write every portable copy that changed (and remove copies whose lesson is gone), and
    point README.md's Colab badges at them."""
    written = []
    for source in lessons(root):
        target, text = portable_path(source), render(portable_notebook(source))
        target.parent.mkdir(exist_ok=True)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            written.append(target)
    readme = root / "README.md"
    if readme.exists() and readme_with_badges(readme.read_text(), root) != readme.read_text():
        readme.write_text(readme_with_badges(readme.read_text(), root))
        written.append(readme)
    names = {p.name for p in lessons(root)}
    for orphan in sorted((root / PORTABLE_FOLDER).glob("*.ipynb")):
        if orphan.name not in names:
            orphan.unlink()
            written.append(orphan)
    return written


BADGE = re.compile(r"(\[!\[Open in Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]\()"
                   r"(?P<url>[^)\s]*/(?P<name>[0-9][0-9]_[A-Za-z0-9_]+)\.ipynb)\)")


def readme_with_badges(text: str, root: Path = ROOT) -> str:
    """README.md with every lesson's Colab badge opening that lesson's portable copy
    (the address built from _config.yml by colab_url)."""
    names = {p.stem: p for p in lessons(root)}

    def replace(match: re.Match) -> str:
        if match.group("name") not in names:
            raise PortableError(f"README.md has a Colab badge for {match.group('name')}, which is not a lesson")
        return f"{match.group(1)}{colab_url(names[match.group('name')], root)})"
    return BADGE.sub(replace, text)


def main_check(root: Path = ROOT) -> int:
    """``--check``: 1 (naming them) if any copy or badge is missing or out of date, else 0."""
    out_of_date = stale(root)
    for path in out_of_date:
        print(f"{relative(path)} is missing or out of date: run make portable", file=sys.stderr)
    return 1 if out_of_date else 0


def main(argv: list[str]) -> int:
    try:
        if "--check" in argv:
            return main_check()
        written = write_all()
    except PortableError as error:
        print(f"portable: {error}", file=sys.stderr)
        return 1
    print(f"portable: {len(lessons())} lessons, {len(written)} copies written to "
          f"{relative(PORTABLE)}/" + "".join(f"\n  {relative(p)}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
