"""The exact versions are written twice (pyproject.toml's extras for pip, environment.yml for
conda); this keeps the two the same."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("pinned", "test", "lessons", "book", "flower", "privacy", "lab")


def test_environment_yml_pins_exactly_what_the_extras_pin():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from_pyproject = {p for name in EXTRAS for p in extras[name]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    from_conda = {p for p in pip if re.match(r"^[A-Za-z0-9_.\[\]-]+==", p)}
    assert from_conda == from_pyproject


def test_loose_dependencies_keep_colabs_torch():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all(">=" in d and "==" not in d for d in deps)
