"""Bad input, as a careless or hostile user gives it: every case exits with status 2 and one
line naming what is wrong, before any training, and leaves no partial or replaced file; no
crafted file runs code; a bug still shows its traceback; an interrupted run can be resumed.

The runs here use a small fake MNIST (tests/test_data.write_fake_mnist), so each takes
well under a second.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedlib.runner
from fedlib.cli import main
from fedlib.files import atomic_write_text, remove_stale_temps
from fedlib.params import InputError
from fedlib.config import FedAvgConfig
from tests.helpers import one_line_error, write_fake_mnist

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--clients", "10", "--frac", "0.2", "--no-progress", "--device", "cpu"]


# --- flags out of range: every parameter, every kind of wrong value --------------------------

BAD_FLAGS = [
    ("--frac", "2"), ("--frac", "-0.5"), ("--frac", "nan"), ("--frac", "inf"),
    ("--lr", "0"), ("--lr", "-1"), ("--lr", "inf"), ("--lr", "nan"),
    ("--clients", "0"), ("--clients", "abc"), ("--clients", "1.5"),
    ("--epochs", "0"), ("--epochs", "2.5"),
    ("--batch-size", "0"), ("--batch-size", "-3"), ("--batch-size", "ten"),
    ("--rounds", "0"), ("--rounds", "1e3"),
    ("--seed", "-1"), ("--seed", str(2**70)), ("--seed", "abc"),
    ("--momentum", "1"), ("--momentum", "-0.1"), ("--momentum", "nan"),
    ("--weight-decay", "-1"), ("--weight-decay", "nan"), ("--weight-decay", "inf"),
    ("--sigma", "nan"), ("--sigma", "inf"), ("--sigma", "-1"),
    ("--alpha", "0"), ("--alpha", "inf"), ("--alpha", "nan"),
    ("--min-size", "-1"), ("--shards-per-client", "0"), ("--shard-size", "0"),
    ("--target", "0"), ("--target", "1.5"), ("--target", "nan"),
    ("--eval-every", "0"), ("--threads", "0"), ("--checkpoint-every", "0"),
    ("--model", "resnet"), ("--partition", "zipf"), ("--device", "tpu"), ("--engine", "fast"),
    ("--dataset", "imagenet"),
]


@pytest.mark.parametrize("flag, value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_a_bad_flag_value_exits_2_with_one_line_naming_the_flag(fake_data, no_training, capsys, flag, value):
    assert main(["train", *TINY, flag, value, "--out", "run.json"]) == 2
    one_line_error(capsys, f"argument {flag}:", value if value != str(2**70) else "got 1180591620717411303424")
    assert not (fake_data / "run.json").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--stop-at-target"], "stop_at_target needs a target"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--partition", "shards", "--clients", "150"], "num_clients * shards_per_client must be <="),
    (["train", "--partition", "dirichlet", "--alpha", "0.001", "--clients", "7", "--min-size", "28"], "lower min_size or raise alpha"),
    (["train", "--out", "same.ckpt", "--checkpoint", "same.ckpt"], "--out and --checkpoint must be different"),
    (["plot", "run.json"], "the following arguments are required: --out"),
    (["reproduce", "--table", "3"], "argument --table: invalid choice"),
    (["reproduce", "--table", "1", "--only", "2nn-iid-C7-E1-B10", "--list"], "unknown ['2nn-iid-C7-E1-B10']"),
    ([], "the following arguments are required: command"),
])
def test_bad_combinations_exit_2_with_one_line(fake_data, no_training, capsys, argv, fragment):
    assert main(argv[:1] + TINY + argv[1:] if argv[:1] == ["train"] else argv) == 2
    one_line_error(capsys, fragment)


def test_fedlib_threads_is_named_when_it_is_not_a_number(fake_data, no_training, capsys, monkeypatch):
    monkeypatch.setenv("FEDLIB_THREADS", "abc")
    assert main(["train", *TINY]) == 2
    one_line_error(capsys, "FEDLIB_THREADS must be an integer >= 1, got 'abc'")


def test_the_library_refuses_what_the_command_line_refuses():
    """The same Range objects check both, so inf and nan never reach a run."""
    for field, value in [("lr", float("inf")), ("weight_decay", float("nan")), ("sigma", float("nan")),
                         ("frac", float("nan")), ("alpha", float("inf")), ("seed", 2**70), ("target", float("nan"))]:
        with pytest.raises(InputError, match=field):
            FedAvgConfig(**{field: value}).validate()
    with pytest.raises(InputError, match="stop_at_target needs a target"):
        FedAvgConfig(stop_at_target=True).validate()


# --- output paths: refused before training, nothing replaced -----------------------------------

def test_an_output_that_is_not_a_regular_file_is_refused(fake_data, no_training, capsys):
    assert main(["train", "--out", "/dev/null", *TINY]) == 2
    one_line_error(capsys, "/dev/null", "it exists and is a character device")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    (fake_data / "folder").mkdir()
    assert main(["train", "--out", "folder", *TINY]) == 2
    one_line_error(capsys, "folder", "is a directory")


@pytest.mark.parametrize("target", ["/proc/fedlib-run.json", "/proc/self/fedlib/run.json"])
def test_an_output_that_cannot_be_created_is_refused_before_training(fake_data, no_training, capsys, target):
    assert main(["train", "--out", target, *TINY]) == 2
    one_line_error(capsys, f"cannot write {target}")


def test_a_checkpoint_path_that_cannot_be_written_is_refused_before_training(fake_data, no_training, capsys):
    assert main(["train", "--checkpoint", "/proc/run.ckpt", *TINY]) == 2
    one_line_error(capsys, "cannot write /proc/run.ckpt")


def test_plot_refuses_its_output_before_drawing(fake_data, capsys):
    assert main(["train", "--rounds", "1", "--out", "run.json", *TINY]) == 0
    capsys.readouterr()
    assert main(["plot", "run.json", "--out", "/dev/null"]) == 2
    one_line_error(capsys, "is a character device")
    assert main(["plot", "run.json", "run.json", "--labels", "one", "--out", "x.png"]) == 2
    one_line_error(capsys, "--labels must give one label per run (2), got 1")
    assert not (fake_data / "x.png").exists()


# --- files given as input: crafted, corrupt, of the wrong shape ----------------------------------

class Exploit:
    """A pickle that creates a file when it is loaded with pickle's full powers."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_checkpoint(path: Path, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"format": "fedlib-checkpoint-1", "payload": Exploit(marker)}, buffer)
    path.write_bytes(buffer.getvalue())


def test_a_crafted_checkpoint_is_refused_without_running_its_code(fake_data, no_training, capsys):
    marker = fake_data / "pwned"
    malicious_checkpoint(fake_data / "run.ckpt", marker)
    assert main(["train", "--checkpoint", "run.ckpt", *TINY]) == 2
    one_line_error(capsys, "run.ckpt is not a fedlib checkpoint that can be read safely")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage \x00\x01\x02", b"PK\x03\x04 truncated zip"],
                         ids=["empty", "garbage", "truncated"])
def test_an_unreadable_checkpoint_exits_2_naming_it(fake_data, no_training, capsys, content):
    (fake_data / "run.ckpt").write_bytes(content)
    assert main(["train", "--checkpoint", "run.ckpt", *TINY]) == 2
    one_line_error(capsys, "run.ckpt is not a fedlib checkpoint", "delete it or pass another checkpoint path")


def test_a_checkpoint_cut_in_half_or_of_another_run_is_refused(fake_data, capsys):
    assert main(["train", "--rounds", "2", "--checkpoint", "run.ckpt", *TINY]) == 0
    whole = (fake_data / "run.ckpt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--rounds", "3", "--checkpoint", "run.ckpt", *TINY]) == 2
    one_line_error(capsys, "belongs to a run with another configuration")
    (fake_data / "run.ckpt").write_bytes(whole[: len(whole) // 2])
    assert main(["train", "--rounds", "2", "--checkpoint", "run.ckpt", *TINY]) == 2
    one_line_error(capsys, "is not a fedlib checkpoint")


def test_a_checkpoint_that_is_a_directory_is_refused(fake_data, no_training, capsys):
    (fake_data / "run.ckpt").mkdir()
    assert main(["train", "--checkpoint", "run.ckpt", *TINY]) == 2
    one_line_error(capsys, "run.ckpt", "is a directory")


def test_reproduce_refuses_a_crafted_checkpoint_in_its_results_folder(fake_data, no_training, capsys):
    marker = fake_data / "pwned"
    folder = fake_data / "results" / ".checkpoints"
    folder.mkdir(parents=True)
    malicious_checkpoint(folder / "2nn-iid-C0.1-E1-B10-lr0.1-seed0.ckpt", marker)
    assert main(["reproduce", "--table", "1", "--only", "2nn-iid-C0.1-E1-B10", "--lr", "0.1", "--out", "results",
                 "--device", "cpu", "--no-progress"]) == 2
    one_line_error(capsys, "2nn-iid-C0.1-E1-B10-lr0.1-seed0.ckpt is not a fedlib checkpoint that can be read safely")
    assert not marker.exists()


def test_corrupt_dataset_files_exit_2_naming_the_folder(fake_data, no_training, capsys):
    raw = fake_data / "data" / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes(os.urandom(5000))
    assert main(["train", *TINY]) == 2
    one_line_error(capsys, str(raw.parent), "cannot be read as mnist", "replace them")


@pytest.mark.parametrize("content, fragment", [
    ('{"config": [], "records": []}', "'config' mapping"),
    ('{"config": {}, "records": [{"round": 1}]}', "record 0 of the history must have exactly the keys"),
    ("{not json", "Expecting property name"),
    ("[1, 2]", "'config' mapping"),
], ids=["config-list", "bad-record", "not-json", "a-list"])
def test_plot_refuses_a_file_that_is_not_a_history(fake_data, capsys, content, fragment):
    (fake_data / "bad.json").write_text(content)
    assert main(["plot", "bad.json", "--out", "x.png"]) == 2
    one_line_error(capsys, "not a fedlib history file: bad.json", fragment)
    assert not (fake_data / "x.png").exists()


def test_plot_refuses_a_directory_and_a_missing_file(fake_data, capsys):
    (fake_data / "runs").mkdir()
    assert main(["plot", "runs", "--out", "x.png"]) == 2
    one_line_error(capsys, "not a fedlib history file: runs", "Is a directory")
    assert main(["plot", "missing.json", "--out", "x.png"]) == 2
    one_line_error(capsys, "no such run file: missing.json")


def test_reproduce_names_a_result_file_of_the_wrong_shape(fake_data, capsys):
    folder = fake_data / "results"
    folder.mkdir()
    (folder / "2nn-iid-C0.1-E1-B10-lr0.1-seed0.json").write_text(json.dumps({"setting": {}, "lr": 0.1}))
    assert main(["reproduce", "--table", "1", "--summary", "--out", "results"]) == 2
    one_line_error(capsys, "2nn-iid-C0.1-E1-B10-lr0.1-seed0.json is not a reproduction result", "delete it")
    assert main(["reproduce", "--table", "1", "--only", "2nn-iid-C0.1-E1-B10", "--lr", "0.05", "0.1", "--list",
                 "--out", "results"]) == 0
    status = {line.split()[1]: line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert status.pop("2nn-iid-C0.1-E1-B10-lr0.1-seed0") == "corrupt"
    assert status and set(status.values()) == {"pending"}


@pytest.mark.parametrize("argv, fragment", [
    (["--supernodes", "0"], "argument --supernodes: must be an integer in [1, 64], got 0"),
    (["--batch-size", "abc"], "argument --batch-size: expected an integer, got 'abc'"),
    (["--supernodes", "5", "--num-clients", "3"], "--num-clients (K = 3) must be >= --supernodes (5)"),
    (["--rounds", "2", "--stop-in-round", "3"], "--stop-in-round must be in [1, 2]"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--out", "/dev/null"], "is a character device"),
])
def test_the_flower_deployment_refuses_bad_flags_with_one_line(capsys, argv, fragment):
    pytest.importorskip("flwr")
    from fedlib.flower.deploy import main as deploy

    assert deploy(argv) == 2
    one_line_error(capsys, fragment)


# --- a bug is not bad input ----------------------------------------------------------------------

def test_a_bug_keeps_its_traceback(fake_data, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal mistake")
    monkeypatch.setattr(fedlib.runner, "rounds", broken)
    with pytest.raises(ValueError, match="an internal mistake"):
        main(["train", "--rounds", "1", *TINY])


def test_a_run_that_diverges_before_its_first_evaluation_ends_cleanly(fake_data, capsys):
    """--eval-every 5 and a learning rate that diverges at once: the run stops in round 1,
    evaluates the model it stopped with, and says that it diverged (exit status 3; this used to crash)."""
    with pytest.warns(UserWarning, match="diverged in round 1"):
        assert main(["train", "--rounds", "20", "--eval-every", "5", "--lr", "1e30", *TINY]) == 3
    assert "training DIVERGED in round 1" in capsys.readouterr().out


# --- files are written whole, with the usual mode, through links, without leftovers --------------

def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    atomic_write_text(path, "old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)      # fails after the new bytes were written to the temp file
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_write_keeps_the_file_mode_and_writes_through_links(tmp_path):
    target = tmp_path / "real.json"
    atomic_write_text(target, "one")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()          # the usual mode, not 0600
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_text(link, "two")
    assert link.is_symlink() and target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "out.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.json.{dead}.0badc0de.tmp"
    live = tmp_path / f".out.json.{os.getpid()}.0badc0de.tmp"
    stale.write_text("left by a killed writer")
    live.write_text("being written by this process")
    remove_stale_temps(target)
    assert not stale.exists() and live.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- interrupting a run ----------------------------------------------------------------------------

@pytest.fixture
def slow_data(tmp_path, monkeypatch):
    """A fake MNIST of 2,000 images: a round of 10 clients at B = 5 takes ~0.1 s on a CPU."""
    write_fake_mnist(tmp_path / "data", n_train=2000, n_test=50)
    monkeypatch.setenv("FEDLIB_DATA", str(tmp_path / "data"))
    return tmp_path


ROUNDS = 60       # ~0.1 s each: the signal, sent after round 5, lands seconds before the run could end


def train_command(checkpoint: Path | None, out: Path | None, progress: bool = False) -> list[str]:
    """ROUNDS rounds, and a checkpoint interval of 1000: only the save on interrupt can hold them."""
    command = [sys.executable, "-m", "fedlib", "train", "--rounds", str(ROUNDS), "--clients", "10", "--frac", "1",
               "--batch-size", "5", "--device", "cpu"] + ([] if progress else ["--no-progress"])
    if checkpoint:
        command += ["--checkpoint", str(checkpoint), "--checkpoint-every", "1000"]
    return command + (["--out", str(out)] if out else [])


def interrupt(command: list[str], sig: int, rounds: int = 5, again: tuple[float, ...] = ()) -> tuple[int, str]:
    """Start ``command`` (with its progress bar on stderr), send it ``sig`` once the bar shows
    ``rounds`` rounds done, and again after each of the pauses ``again`` (seconds); return the exit
    status and the last line it wrote to stderr (a traceback anywhere fails the test)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = bytearray()
    deadline = time.monotonic() + 120
    bar = re.compile(rb"\| *(\d+)/" + str(ROUNDS).encode())
    while not bar.search(seen) or int(bar.findall(seen)[-1]) < rounds:
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk and time.monotonic() < deadline, f"the run ended or stalled before round {rounds}: {seen!r}"
        seen += chunk
    process.send_signal(sig)
    for pause in again:
        time.sleep(pause)
        process.send_signal(sig)                 # a no-op once the process has ended
    _, rest = process.communicate(timeout=120)
    text = (seen + rest).decode()
    assert "Traceback" not in text, text
    lines = re.split(r"[\r\n]+", text.strip())
    return process.returncode, lines[-1]


def saved_rounds(checkpoint: Path) -> int:
    return len(torch.load(checkpoint, weights_only=True)["history"]["records"])


@pytest.mark.slow
def test_ctrl_c_saves_the_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(slow_data):
    checkpoint, resumed, fresh = slow_data / "run.ckpt", slow_data / "resumed.json", slow_data / "fresh.json"
    code, err = interrupt(train_command(checkpoint, resumed, progress=True), signal.SIGINT)
    assert code == 130 and "run the same command again to resume" in err, err
    done = int(err.split("interrupted after round ")[1].split(",")[0])
    assert 0 < done < ROUNDS and saved_rounds(checkpoint) == done
    assert not resumed.exists() and not list(slow_data.glob(".*.tmp"))

    subprocess.run(train_command(checkpoint, resumed), cwd=ROOT, check=True, capture_output=True, timeout=600)
    subprocess.run(train_command(None, fresh), cwd=ROOT, check=True, capture_output=True, timeout=600)
    strip = lambda path: [{k: v for k, v in r.items() if k != "seconds"}
                          for r in json.loads(path.read_text())["records"]]
    assert strip(resumed) == strip(fresh)


@pytest.mark.parametrize("again", [(0.05,), (0.01, 0.02, 0.03, 0.05, 0.1)], ids=["twice-50ms", "six-times"])
def test_more_ctrl_c_while_saving_still_save_whole_and_print_one_line(slow_data, again):
    """A second Ctrl-C 50 ms after the first (and a volley of them) lands while the checkpoint is
    saved or the line printed: the save completes (it loads whole, with the rounds the line names)
    and one line says so. (Resuming from such a checkpoint is the test above.)"""
    checkpoint, resumed = slow_data / "run.ckpt", slow_data / "resumed.json"
    code, err = interrupt(train_command(checkpoint, resumed, progress=True), signal.SIGINT, again=again)
    assert code == 130 and "run the same command again to resume" in err, err
    done = int(err.split("interrupted after round ")[1].split(",")[0])
    assert saved_rounds(checkpoint) == done > 0 and not list(slow_data.glob(".*.tmp"))


def test_sigterm_saves_the_checkpoint_too(slow_data):
    checkpoint = slow_data / "run.ckpt"
    code, err = interrupt(train_command(checkpoint, None, progress=True), signal.SIGTERM)
    assert code == 130 and "run the same command again to resume" in err, err
    done = int(err.split("interrupted after round ")[1].split(",")[0])
    assert saved_rounds(checkpoint) == done > 0


def test_an_interrupted_run_without_checkpoint_says_nothing_was_saved(slow_data):
    code, err = interrupt(train_command(None, None, progress=True), signal.SIGINT)
    assert code == 130 and "nothing was saved (a checkpoint makes a run resumable: --checkpoint FILE" in err, err
