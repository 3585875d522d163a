"""Sphinx extension: a lesson's Colab and Binder launch buttons open its portable copy.

sphinx-book-theme builds the launch links from ``repository.url``, ``repository.branch`` and the
page's own path, so they would open ``notebooks/NN_name.ipynb``, whose MyST markup ({glue:text},
{term}, :::{admonition}) Colab and Jupyter show as raw text. The theme has no setting for
another folder, so this rewrites the links after the theme made them (html-page-context,
priority 502, after the theme's 501) to the copy that ``book/portable.py`` writes,
``portable/NN_name.ipynb`` (the address comes from ``portable.colab_url``, which the
README's badges are checked against too). A lesson without a portable copy fails the build.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

BOOK = Path(__file__).resolve().parents[1]


def _portable():
    """book/portable.py as a module (it is a script beside the book, not an installed package)."""
    if "portable" in sys.modules:
        return sys.modules["portable"]
    spec = importlib.util.spec_from_file_location("portable", BOOK / "portable.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["portable"] = module     # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


portable = _portable()


def open_portable_copies(app: Sphinx, pagename: str, templatename: str,
                         context: dict[str, Any], doctree: Any) -> None:
    source = portable.ROOT / f"{pagename}.ipynb"
    if source not in portable.lessons():
        return
    copy = portable.portable_path(source)
    if not copy.exists():
        raise ExtensionError(f"{copy.relative_to(portable.ROOT)} is missing: run make portable")
    old = source.relative_to(portable.ROOT).as_posix()
    new = copy.relative_to(portable.ROOT).as_posix()
    for group in context.get("header_buttons", []):
        if group.get("label") != "launch-buttons":
            continue
        for button in group.get("buttons", []):
            if button.get("text") == "Colab":
                button["url"] = portable.colab_url(source)
            elif button.get("text") == "Binder":
                button["url"] = button["url"].replace(f"urlpath=tree/{old}", f"urlpath=tree/{new}")


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("html-page-context", open_portable_copies, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
