"""Sphinx extension: write each inline script into a page once.

Works around a Sphinx 7.4 bug (Jupyter Book 1.x needs Sphinx 7): a script given only as a
body, with no file, that an extension registers after the builder has started is written
into every page twice (once as filename None, once as ''). For sphinx-thebe's
``const THEBE_JS_URL = ...`` the second copy is a JavaScript error on every page.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx


def drop_repeated_scripts(app: Sphinx, pagename: str, templatename: str,
                          context: dict[str, Any], doctree: Any) -> None:
    """Keep the first of the page's scripts that share file, priority and attributes."""
    seen, unique = set(), []
    for script in context.get("script_files", []):
        key = (getattr(script, "filename", script) or "", getattr(script, "priority", None),
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("html-page-context", drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
