"""The command line: exit codes, one-line errors, outputs written whole."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlib.cli import main
from tests.helpers import write_fake_mnist


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--frac", "2"], "--frac: must be a finite number in [0, 1], got 2"),
    (["train", "--frac", "-0.5"], "--frac: must be a finite number in [0, 1], got -0.5"),
    (["train", "--clients", "0"], "--clients: must be an integer >= 1, got 0"),
    (["train", "--batch-size", "ten"], "--batch-size: expected an integer, got 'ten'"),
    (["train", "--lr", "0"], "--lr: must be a finite number > 0, got 0"),
    (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["train", "--partition", "shards", "--clients", "70000"], "num_clients (K) must be <= the number of examples (100), got 70000"),
    (["train", "--partition", "shards", "--clients", "60", "--shards-per-client", "2"],
     "num_clients * shards_per_client must be <= the number of examples (100), got 60 * 2"),
    (["train", "--rounds", "1", "--bogus"], "unrecognized arguments: --bogus"),
    (["plot", "missing.json", "--out", "x.png"], "no such run file: missing.json"),
    ([], "the following arguments are required: command"),
])
def test_bad_usage_exits_2_with_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, n_train=100)
    monkeypatch.setenv("FEDLIB_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_train_then_plot(tmp_path, monkeypatch, capsys):
    write_fake_mnist(tmp_path, n_train=200, n_test=50)
    monkeypatch.setenv("FEDLIB_DATA", str(tmp_path))
    out = tmp_path / "runs" / "a.json"
    assert main(["train", "--clients", "10", "--frac", "0.2", "--rounds", "3", "--batch-size", "inf",
                 "--target", "0.01", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("final accuracy") and "rounds to 0.01: 1.0" in summary and str(out) in summary
    saved = json.loads(out.read_text())
    assert saved["config"]["batch_size"] is None and saved["config"]["num_clients"] == 10
    assert [r["round"] for r in saved["records"]] == [1, 2, 3]
    assert all(len(r["clients"]) == 2 for r in saved["records"])

    png = tmp_path / "curves.png"
    assert main(["plot", str(out), str(out), "--labels", "a", "b", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_rejects_a_file_that_is_not_a_history(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["plot", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a fedlib history file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_dataset_exits_1_without_traceback(tmp_path):
    env = dict(os.environ, FEDLIB_DATA=str(tmp_path / "nothing"))
    # The files are missing and torchvision's download fails as it does offline.
    proc = subprocess.run([sys.executable, "-c",
                           "import sys, torchvision.datasets.mnist as m;"
                           "m.download_and_extract_archive = lambda *a, **k: (_ for _ in ()).throw(OSError('offline'));"
                           "from fedlib.cli import main; sys.exit(main(['train', '--rounds', '1']))"],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "nothing") in proc.stderr and "FEDLIB_DATA" in proc.stderr


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedlib", "train", "--epochs", "0"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedlib train: argument --epochs: must be an integer >= 1, got 0"
