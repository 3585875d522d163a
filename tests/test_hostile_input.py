"""Hostile input, second round (issue 22): every class of input the first round let through, as
tables. Each case either exits with status 2 and one line naming what is wrong (before any
training, writing nothing), or is accepted and does the right thing; never a traceback, never a
silent wrong result, never a hang.

The fixtures fake_data and no_training are in conftest.py. The classes: values in range that overflow float32; integers that overflow C; splits with empty
or duplicated clients; a model and data that do not fit; output names that cannot be written (and
a full disk after the training); tampered checkpoints; history and result files; plot text;
silent loss (empty names, an output over its input, NaN in JSON, a diverged result reported as a
number); reproduction run ids; splits and rounds too large to compute; Ctrl-C during imports; the
Flower launcher; the Python API. The runs use a small fake MNIST (tests/helpers.write_fake_mnist).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import fedlib
import fedlib.runner
from fedlib import params as P
from fedlib import partition
from fedlib import reproduce as R
from fedlib.cli import main
from fedlib.client import local_update
from fedlib.config import FedAvgConfig
from fedlib.files import check_output, json_depth
from fedlib.metrics import History, rounds_to_target
from fedlib.params import InputError
from fedlib.strategies import fedavg, sample_clients
from tests.helpers import one_line_error, write_fake_mnist, write_idx

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--clients", "10", "--frac", "0.2", "--no-progress", "--device", "cpu"]


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """``fedlib argv`` exits 2 with one line holding every fragment."""
    assert main(argv) == 2
    return one_line_error(capsys, *fragments)


def train(*flags: str) -> list[str]:
    return ["train", *TINY, *flags]


# --- 1. values in range that overflow float32, 2. integers that overflow C -----------------------

LONG_INT = "1" + "0" * 5000                            # beyond Python's 4,300-digit int <-> str limit

OVERFLOWING_FLAGS = [
    (["--lr", "1e308"], "--lr: must be at most 3.40282e+38 (float32's largest)"),
    (["--lr", "1e39", "--engine", "sequential"], "--lr: must be at most 3.40282e+38"),
    (["--lr", "3.4028236e38"], "--lr: must be at most 3.40282e+38"),
    (["--strategy", "fedavgm", "--server-lr", "1e308"], "--server-lr: must be at most 3.40282e+38"),
    (["--strategy", "fedprox", "--mu", "1e308"], "--mu: must be at most 3.40282e+38"),
    (["--weight-decay", "1e308"], "--weight-decay: must be at most 3.40282e+38"),
    (["--strategy", "fedadam", "--server-tau", "1e20"], "--server-tau: must be at most 1.84467e+19 (tau^2 must fit"),
    (["--strategy", "dp-fedavg", "--dp-clip", "1e39"], "--dp-clip: must be at most 3.40282e+38"),
    (["--strategy", "dp-fedavg", "--dp-noise", "1e39"], "--dp-noise: must be at most 3.40282e+38"),
    (["--threads", "2147483648"], "--threads: must be at most 1024"),
    (["--batch-size", str(2**63)], "--batch-size: must be at most 2^63 - 1"),
    (["--epochs", str(2**63)], "--epochs: must be at most 2^63 - 1"),
    (["--rounds", str(2**64)], "--rounds: must be at most 2^63 - 1"),
    (["--clients", str(2**31)], "--clients: must be at most 2^31 - 1"),
    (["--seed", str(2**64)], "--seed: must be an integer in [0, 9223372036854775807]"),
    (["--shard-size", str(2**63)], "--shard-size: must be at most 2^63 - 1"),
    (["--eval-every", LONG_INT], "--eval-every: expected an integer, got '10000000000"),
]


@pytest.mark.parametrize("flags, fragment", OVERFLOWING_FLAGS, ids=[" ".join(f)[:40] for f, _ in OVERFLOWING_FLAGS])
def test_a_value_its_consumer_cannot_represent_exits_2(fake_data, no_training, capsys, flags, fragment):
    refused(capsys, train(*flags, "--out", "run.json"), fragment)
    assert not (fake_data / "run.json").exists()


@pytest.mark.parametrize("value", ["100000000000000000000", "2147483648", "1025", "1e20"])
def test_fedlib_threads_beyond_a_c_int_exits_2(fake_data, no_training, capsys, monkeypatch, value):
    monkeypatch.setenv("FEDLIB_THREADS", value)
    refused(capsys, train(), "FEDLIB_THREADS must be an integer >= 1", repr(value))


def test_the_largest_float32_rate_is_accepted_and_its_run_diverges_honestly(fake_data, capsys):
    """float32's largest value is a rate torch can hold: the run trains, diverges and says so."""
    with pytest.warns(UserWarning, match="diverged"):
        assert main(train("--rounds", "1", "--lr", "3.4028234e38")) == 3
    assert "training DIVERGED in round 1" in capsys.readouterr().out


@pytest.mark.parametrize("field, value", [
    ("lr", 1e39), ("lr", 10**400), ("weight_decay", 1e308), ("mu", 1e308), ("server_lr", 1e39),
    ("server_tau", 1e20), ("dp_clip", 1e39), ("dp_noise", 1e39), ("batch_size", 2**63), ("num_clients", 2**31),
    ("local_epochs", 2**63), ("seed", 2**64), ("lr", Fraction(10**400, 3)),
])
def test_the_library_refuses_what_overflows_its_consumer(field, value):
    strategy = {"mu": "fedprox", "server_lr": "fedavgm", "server_tau": "fedadam", "dp_clip": "dp-fedavg",
                "dp_noise": "dp-fedavg"}.get(field, "fedavg")
    with pytest.raises(InputError, match=field):
        FedAvgConfig(strategy=strategy, **{field: value}).validate()


def test_every_float_knob_in_range_fits_float32():
    """The range of every float knob ends where float32 does, so torch never refuses a value the
    range let through (the fuzz test checks arbitrary values; this pins the bound itself)."""
    for name, allowed in [("lr", P.LR), ("weight_decay", P.WEIGHT_DECAY), ("mu", P.MU), ("server_lr", P.SERVER_LR),
                          ("dp_clip", P.DP_CLIP), ("dp_noise", P.DP_NOISE)]:
        assert torch.tensor(allowed.high, dtype=torch.float32).isfinite(), name
        assert not allowed.contains(math.nextafter(allowed.high, math.inf)), name
    assert torch.tensor(P.SERVER_TAU.high ** 2, dtype=torch.float32).isfinite()


# --- 3. splits with empty or duplicated clients, and splits that cannot be found -------------------

@pytest.mark.parametrize("flags, fragment", [
    (["--partition", "unbalanced", "--min-size", "0", "--sigma", "10", "--batch-size", "inf"],
     "leaves client 0 without examples (n_k = 0)"),
    (["--partition", "unbalanced", "--min-size", "0", "--sigma", "1e308"], "sigma = 1e+308 is too large"),
    (["--partition", "unbalanced", "--sigma", "800"], "sigma = 800 is too large"),
    (["--partition", "dirichlet", "--clients", "50", "--alpha", "0.01", "--min-size", "0"], "without examples (n_k = 0)"),
    (["--partition", "dirichlet", "--clients", "100", "--min-size", "2"], "lower min_size or raise alpha"),
], ids=["unbalanced-empty", "sigma-1e308", "sigma-800", "dirichlet-empty", "dirichlet-impossible"])
def test_a_split_the_training_cannot_use_exits_2(fake_data, no_training, capsys, flags, fragment):
    refused(capsys, train(*flags), fragment)


def test_check_split_finds_empty_clients_foreign_and_repeated_indices():
    good = [np.array([0, 1]), np.array([2, 3])]
    partition.check_split(good, 4)
    for parts, fragment in [([np.array([0, 1]), np.array([], dtype=np.int64)], "client 1 without examples"),
                            ([np.array([0, 1]), np.array([1, 2])], "deals example 1 twice"),
                            ([np.array([0, 0]), np.array([2])], "twice"),
                            ([np.array([0, 4])], "outside the 4 training examples"),
                            ([np.array([-1, 2])], "outside")]:
        with pytest.raises(InputError, match=fragment):
            partition.check_split(parts, 4)


def test_an_impossible_dirichlet_split_of_30000_clients_answers_within_seconds():
    """The issue's hang: K = 30,000 with min_size 2 over 60,000 labels redrew for minutes."""
    labels = np.arange(60000) % 10
    began = time.perf_counter()
    with pytest.raises(InputError, match="would almost surely fail too; lower min_size or raise alpha"):
        partition.dirichlet(labels, 30000, alpha=0.5, min_size=2)
    assert time.perf_counter() - began < 30          # ~2 s on a 2-core machine shared with other work


def test_a_possible_dirichlet_split_is_the_one_it_always_was():
    """The early refusal changes no split that can be found: here the 4th draw succeeds."""
    labels = np.arange(2000) % 10
    parts = partition.dirichlet(labels, 20, alpha=0.3, min_size=20, seed=1)
    assert sum(len(p) for p in parts) == 2000 and min(len(p) for p in parts) >= 20
    partition.check_split(parts, 2000)


def test_lognormal_sizes_that_overflow_are_refused_and_others_are_a_split():
    with pytest.raises(InputError, match="too large"):
        partition.unbalanced(60000, 100, sigma=1e308, min_size=0)
    parts = partition.unbalanced(60000, 100, sigma=50.0, min_size=1)        # huge spread, still a split
    partition.check_split(parts, 60000)


# --- 4. a model and data that do not fit ---------------------------------------------------------

def test_a_model_for_other_images_exits_2(fake_data, no_training, capsys):
    refused(capsys, train("--model", "cifar-cnn"), "model 'cifar-cnn' does not fit dataset 'mnist'")


@pytest.mark.parametrize("which, shape", [("train", (200, 5, 5)), ("t10k", (50, 5, 5)), ("t10k", (50, 32, 32))])
def test_idx_files_of_another_image_size_are_not_mnist(fake_data, no_training, capsys, which, shape):
    raw = fake_data / "data" / "MNIST" / "raw"
    write_idx(raw / f"{which}-images-idx3-ubyte", np.zeros(shape))
    refused(capsys, train(), "cannot be read as mnist",
            f"its images are {shape[1]} x {shape[2]}, and mnist's are 28 x 28")


# --- 5. output names, and a full disk after the training ----------------------------------------

def long_name(length: int, suffix: str) -> str:
    return "x" * (length - len(suffix)) + suffix


# The temporary name adds 15 characters and the process id to a name: with a 7-digit id, names of
# 234 to 255 characters fit NAME_MAX (255) and their temporary names do not.
TOO_LONG = 255 - 15 - len(str(os.getpid())) + 1


@pytest.mark.parametrize("length", [TOO_LONG, 245, 255])
@pytest.mark.parametrize("flag", ["--out", "--checkpoint"])
def test_a_name_whose_temporary_file_is_too_long_exits_2_before_training(fake_data, no_training, capsys, flag,
                                                                          length):
    name = long_name(length, ".json")
    refused(capsys, train(flag, name), f"cannot write {name}", "shorten the name by")


def test_plot_refuses_a_name_whose_temporary_file_is_too_long(fake_data, capsys):
    assert main(train("--rounds", "1", "--out", "run.json")) == 0
    capsys.readouterr()
    name = long_name(250, ".png")
    refused(capsys, ["plot", "run.json", "--out", name], "shorten the name by")


def test_the_longest_name_whose_temporary_file_fits_is_written(fake_data, capsys):
    """The check is exact: the temporary name adds 1 + 1 + len(pid) + 1 + 8 + 4 characters."""
    fits = 255 - (15 + len(str(os.getpid())))
    name = long_name(fits, ".json")
    assert main(train("--rounds", "1", "--out", name)) == 0
    assert json.loads((fake_data / name).read_text())["records"]


def fail_writes_of(monkeypatch, fragment: str) -> list:
    """Make every write of a file whose name holds ``fragment`` fail as a full disk does (ENOSPC in
    the fsync after the bytes went to the temporary file); returns a list to clear to stop that."""
    armed = [True]
    real = os.fsync

    def fsync(fd):
        if armed and fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return armed


def test_a_full_disk_after_training_says_where_the_run_is_kept_and_the_rerun_writes_it(fake_data, monkeypatch,
                                                                                        capsys):
    armed = fail_writes_of(monkeypatch, "run.json")
    command = train("--rounds", "2", "--checkpoint", "run.ckpt", "--out", "run.json")
    assert main(command) == 1
    one_line_error(capsys, "cannot write run.json: No space left on device", "the run is kept in run.ckpt",
             "run the same command again")
    assert not (fake_data / "run.json").exists() and (fake_data / "run.ckpt").exists()
    assert not list(fake_data.glob(".*.tmp"))
    armed.clear()                                                   # space again
    monkeypatch.setattr(fedlib.runner, "rounds", lambda *a, **k: iter(()))   # the rerun trains nothing
    assert main(command) == 0
    assert len(json.loads((fake_data / "run.json").read_text())["records"]) == 2


def test_a_full_disk_without_a_checkpoint_says_nothing_was_kept(fake_data, monkeypatch, capsys):
    fail_writes_of(monkeypatch, "run.json")
    assert main(train("--rounds", "1", "--out", "run.json")) == 1
    one_line_error(capsys, "No space left on device", "the run was not kept (--checkpoint FILE keeps a run")


def test_a_full_disk_while_checkpointing_stops_with_one_line(fake_data, monkeypatch, capsys):
    fail_writes_of(monkeypatch, "run.ckpt")
    assert main(train("--rounds", "2", "--checkpoint", "run.ckpt", "--checkpoint-every", "1")) == 1
    one_line_error(capsys, "/run.ckpt: No space left on device", "the training stopped", "run.ckpt holds the run as it was")


def test_a_full_disk_while_plotting_exits_1_and_keeps_the_old_figure(fake_data, monkeypatch, capsys):
    assert main(train("--rounds", "1", "--out", "run.json")) == 0
    (fake_data / "curve.png").write_bytes(b"old")
    capsys.readouterr()
    fail_writes_of(monkeypatch, "curve.png")
    assert main(["plot", "run.json", "--out", "curve.png"]) == 1
    one_line_error(capsys, "cannot write curve.png: No space left on device")
    assert (fake_data / "curve.png").read_bytes() == b"old"


# --- 6. tampered checkpoints -------------------------------------------------------------------

def tampered(fake_data, change, *flags: str) -> list[str]:
    """Train 2 rounds with a checkpoint, change what it holds with ``change(saved)``, save it back;
    returns the command that resumes from it."""
    command = train("--rounds", "2", "--checkpoint", "run.ckpt", *flags)
    assert main(command) == 0
    saved = torch.load(fake_data / "run.ckpt", weights_only=True)
    change(saved)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    (fake_data / "run.ckpt").write_bytes(buffer.getvalue())
    return command


def nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


TAMPERED = [
    ("extra-non-tensor-weight", lambda s: s["weights"].update(extra="not a tensor"), (), "must hold exactly the tensors"),
    ("non-tensor-weight", lambda s: s["weights"].update({"fc1.bias": [0.0] * 200}), (), "fc1.bias] must be a dense"),
    ("meta-weight", lambda s: s["weights"].update({"fc1.bias": torch.empty(200, device="meta")}), (),
     "fc1.bias] must be a dense float tensor of shape (200,)"),
    ("sparse-weight", lambda s: s["weights"].update({"fc1.bias": torch.zeros(200).to_sparse()}), (),
     "fc1.bias] must be a dense"),
    ("integer-weight", lambda s: s["weights"].update({"fc1.bias": torch.zeros(200, dtype=torch.int64)}), (),
     "must be a dense float"),
    ("complex-weight", lambda s: s["weights"].update({"fc1.bias": torch.zeros(200, dtype=torch.complex64)}), (),
     "must be a dense float"),
    ("nan-weight", lambda s: s["weights"]["fc1.bias"].fill_(math.nan), (), "fc1.bias] holds inf or nan"),
    ("train-loss-string", lambda s: s["history"]["records"][0].update(train_loss="low"), (),
     "record 0's train_loss must be a number"),
    ("accuracy-above-1", lambda s: s["history"]["records"][1].update(test_accuracy=1.5), (),
     "record 1's test_accuracy must be None (not evaluated) or a number in [0, 1]"),
    ("six-records", lambda s: s["history"]["records"].extend(
        [dict(s["history"]["records"][-1], round=r) for r in range(3, 7)]), (), "of at most 2, got 6 records"),
    ("rounds-out-of-order", lambda s: s["history"]["records"].reverse(), (), "record 0's round must be 1"),
    ("edited-history-config", lambda s: s["history"]["config"].update(lr=0.5), (),
     "its history belongs to a run with another configuration"),
    ("edited-config", lambda s: s["config"].update(lr=0.5), (), "belongs to a run with another configuration"),
    ("tensor-in-config", lambda s: s["config"].update(lr=torch.tensor([0.1, 0.2])), (), "must be plain values"),
    ("deep-history", lambda s: s["history"].update(records=nested(100)), (), "must be plain values"),
    ("extra-key", lambda s: s.update(payload=1), (), "must hold exactly format, config, weights, history and state"),
    ("fedavg-state", lambda s: s.update(state={"m": torch.zeros(1)}), (), "fedavg's saved state must hold exactly []"),
    ("scaffold-variate-shape", lambda s: s["state"]["c"].update({"fc1.bias": torch.zeros(7)}), ("--strategy", "scaffold"),
     "the saved state c[fc1.bias] must be a dense float tensor of shape (200,)"),
    ("scaffold-key-bool", lambda s: s["state"]["c_k"].update({True: s["state"]["c"]}), ("--strategy", "scaffold"),
     "scaffold's c_k must be keyed by clients 0..9, got True"),
    ("scaffold-extra-state", lambda s: s["state"].update(extra=1), ("--strategy", "scaffold"),
     "scaffold's saved state must hold exactly ['c', 'c_k']"),
    ("fedadam-negative-v", lambda s: s["state"]["v"]["fc3.bias"].fill_(-1.0), ("--strategy", "fedadam"),
     "v (a second moment) holds negative values"),
]


@pytest.mark.parametrize("name, change, flags, fragment", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_a_tampered_checkpoint_is_refused_with_one_line(fake_data, capsys, name, change, flags, fragment):
    command = tampered(fake_data, change, *flags)
    capsys.readouterr()
    refused(capsys, command, "/run.ckpt: ", fragment, "delete it or pass another checkpoint path")


# --- 7. history and result files given to plot or found by reproduce -----------------------------

@pytest.fixture
def run_json(fake_data, capsys) -> dict:
    assert main(train("--rounds", "2", "--out", "run.json")) == 0
    capsys.readouterr()
    return json.loads((fake_data / "run.json").read_text())


def _set(path: str, value):
    def change(data):
        *keys, last = path.split(".")
        for key in keys:
            data = data[int(key)] if key.isdigit() else data[key]
        data[int(last) if last.isdigit() else last] = value
    return change


BAD_HISTORIES = [
    ("versions-text", _set("versions", "abc"), "its versions must map names to version strings"),
    ("accuracy-dict", _set("records.0.test_accuracy", {"a": 1}), "record 0's test_accuracy must be"),
    ("accuracy-text", _set("records.0.test_accuracy", "high"), "record 0's test_accuracy must be"),
    ("accuracy-nan", _set("records.1.test_accuracy", math.nan), "record 1's test_accuracy must be"),
    ("round-null", _set("records.0.round", None), "record 0's round must be 1"),
    ("round-1e999", _set("records.1.round", math.inf), "record 1's round must be 2"),
    ("round-float", _set("records.1.round", 2.0), "record 1's round must be 2"),
    ("round-bool", _set("records.0.round", True), "record 0's round must be 1"),
    ("clients-unsorted", _set("records.0.clients", [5, 3]), "record 0's clients must be distinct clients in [0, 10)"),
    ("clients-beyond-K", _set("records.0.clients", [10]), "clients in [0, 10)"),
    ("bytes-negative", _set("records.0.bytes_uploaded", -1), "record 0's bytes_uploaded must be"),
    ("bytes-decrease", _set("records.1.bytes_uploaded", 1), "record 1's bytes_uploaded must be"),
    ("seconds-inf", _set("records.0.seconds", math.inf), "record 0's seconds must be a finite number"),
    ("loss-without-evaluation", _set("records.0.test_accuracy", None), "record 0's test_loss must be"),
    ("diverged-flag-wrong", _set("diverged", True), "its 'diverged' (True) does not match its records"),
    ("extra-field", _set("payload", 1), "a history has no fields ['payload']"),
    ("config-lr-text", _set("config.lr", "abc"), "its config: lr (eta) must be a finite number > 0"),
    ("config-lr-bool", _set("config.lr", True), "its config: lr (eta) must be"),
    ("config-list", _set("config.model", ["2nn"]), "its config must map parameter names to plain values"),
    ("config-unknown", _set("config.bogus", 1), "unknown parameters ['bogus']"),
    ("config-K-zero", _set("config.num_clients", 0), "its config's num_clients must be an integer >= 1"),
]


@pytest.mark.parametrize("name, change, fragment", BAD_HISTORIES, ids=[b[0] for b in BAD_HISTORIES])
def test_plot_refuses_a_history_that_is_wrong_in_any_field(fake_data, run_json, capsys, name, change, fragment):
    change(run_json)
    (fake_data / "bad.json").write_text(json.dumps(run_json))      # allow_nan: what a careless writer makes
    refused(capsys, ["plot", "bad.json", "--out", "x.png"], "not a fedlib history file: bad.json", fragment)
    assert not (fake_data / "x.png").exists()


@pytest.mark.parametrize("text, fragment", [
    ("[" * 100_000 + "]" * 100_000, "its JSON nests 100000 deep; fedlib's files nest at most 32"),
    ('{"config": ' * 50_000 + "1" + "}" * 50_000, "nests 50000 deep"),
    ('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', "'config' mapping"),     # brackets in a string do not count
], ids=["list-100000-deep", "object-50000-deep", "brackets-in-a-string"])
def test_a_deeply_nested_file_is_refused_before_it_is_parsed(fake_data, capsys, text, fragment):
    (fake_data / "deep.json").write_text(text)
    refused(capsys, ["plot", "deep.json", "--out", "x.png"], "not a fedlib history file: deep.json", fragment)


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth('{"a": [1, "[[[\\"[", {"b": []}]}') == 4
    assert json_depth("3") == 0 and json_depth("[" * 10 + "]" * 10) == 10


@pytest.fixture
def result_dir(fake_data, monkeypatch) -> Path:
    """A results folder with one valid reproduction result (a 1-round run on the fake data)."""
    setting = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.1-E1-B10")
    data = fedlib.load_dataset("mnist", device="cpu", download=False)
    R.sweep([(setting, 0.1, 0)], fake_data / "results", device="cpu", max_rounds=1, data=data, progress=False)
    return fake_data / "results"


RESULT_FILE = "2nn-iid-C0.1-E1-B10-lr0.1-seed0.json"
BAD_RESULTS = [
    ("reached-without-rounds", {"reached": True, "rounds_to_target": None}, "its reached must be"),
    ("rounds-negative", {"rounds_to_target": -5, "reached": True}, "its rounds_to_target must be None or a number"),
    ("rounds-beyond-run", {"rounds_to_target": 7.5, "reached": True}, "its rounds_to_target must be"),
    ("lr-bool", {"lr": True}, "missing or wrong: lr"),
    ("lr-other", {"lr": 0.2}, "its lr must be a rate eta > 0, the history's"),
    ("seed-float", {"seed": 0.0}, "missing or wrong: seed"),
    ("rounds-run", {"rounds_run": 5}, "its rounds_run must be the history's 1 rounds"),
    ("best-accuracy", {"best_accuracy": 0.99}, "its best_accuracy must be the history's"),
    ("together-zero", {"together": 0}, "its together must be None or a number of runs >= 1"),
    ("extra-field", {"payload": 1}, "missing or wrong: payload"),
    ("setting-renamed", {"setting": {"table": "1", "name": "2nn-iid-C0.1-E1-B10"}}, "its setting must be a setting"),
]


@pytest.mark.parametrize("name, change, fragment", BAD_RESULTS, ids=[b[0] for b in BAD_RESULTS])
def test_reproduce_refuses_a_result_that_is_wrong_in_any_field(result_dir, capsys, name, change, fragment):
    path = result_dir / RESULT_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    refused(capsys, ["reproduce", "--table", "1", "--summary", "--out", str(result_dir)],
            f"{RESULT_FILE} is not a reproduction result", fragment, "delete it to run it again")


def test_a_valid_result_is_read_back_as_it_was_written(result_dir):
    saved = R.load_result(result_dir / RESULT_FILE)
    assert saved["lr"] == 0.1 and saved["rounds_run"] == 1 and saved["history"]["diverged"] is False


# --- 8. plot text, 9. silent loss ------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--title", "$\\foo{$"], ["--title", "costs $5 and $"], ["--labels", "$x^{$"]])
def test_plot_text_with_dollar_signs_is_drawn_as_it_is(fake_data, capsys, extra):
    assert main(train("--rounds", "1", "--out", "run.json")) == 0
    assert main(["plot", "run.json", "--out", "x.png", *extra]) == 0
    assert (fake_data / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_a_dollar_is_escaped_for_matplotlib_and_shown_literally():
    from matplotlib.figure import Figure

    from fedlib.plotting import literal

    text = Figure().text(0, 0, literal("$\\foo{$"))
    assert text._preprocess_math(text.get_text()) == ("$\\foo{$", False)        # plain text, not mathtext


@pytest.mark.parametrize("flags, fragment", [
    (["--out", ""], "--out must name a file, got an empty name"),
    (["--checkpoint", ""], "--checkpoint must name a file, got an empty name"),
    (["--out", "a\0b"], "cannot hold the character NUL"),
])
def test_an_empty_output_name_exits_2(fake_data, no_training, capsys, flags, fragment):
    refused(capsys, train(*flags), fragment)


def test_plot_refuses_to_write_over_its_input(fake_data, capsys):
    assert main(train("--rounds", "1", "--out", "run.json")) == 0
    before = (fake_data / "run.json").read_bytes()
    (fake_data / "link.json").symlink_to(fake_data / "run.json")
    capsys.readouterr()
    refused(capsys, ["plot", "run.json", "--out", "run.json"], "--out run.json is also an input")
    refused(capsys, ["plot", "run.json", "--out", "link.json"], "is also an input (run.json)")
    assert (fake_data / "run.json").read_bytes() == before


def test_reproduce_refuses_an_empty_out(fake_data, no_training, capsys):
    refused(capsys, ["reproduce", "--table", "1", "--only", "2nn-iid-C0.1-E1-B10", "--out", ""],
            "--out must name a folder, got an empty name")


def strict_json(path: Path) -> dict:
    """The file read by a strict JSON reader (one that refuses NaN and Infinity)."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("flags", [
    ["--lr", "1e30"],
    ["--strategy", "dp-fedavg", "--dp-clip", "1e30", "--dp-noise", "1e30", "--dp-reproducible"],
    ["--strategy", "fedadam", "--server-lr", "1e30"],
    ["--strategy", "fedavgm", "--server-lr", "3e38", "--server-momentum", "0.9"],
], ids=["lr", "dp-fedavg", "fedadam", "fedavgm"])
def test_a_run_whose_model_is_not_finite_says_so_in_its_summary_file_and_status(fake_data, capsys, flags):
    with pytest.warns(UserWarning, match="diverged"):
        assert main(train("--rounds", "3", "--out", "run.json", *flags)) == 3
    out = capsys.readouterr().out
    assert "training DIVERGED in round" in out and "its accuracy means nothing" in out
    saved = strict_json(fake_data / "run.json")
    assert saved["diverged"] is True
    last = saved["records"][-1]
    assert last["test_loss"] is None or math.isfinite(last["test_loss"])
    assert History.load(fake_data / "run.json").diverged


def test_a_diverged_history_reads_back_as_diverged_from_old_files_with_nan(fake_data, capsys):
    """Files written before this round hold bare NaN for the loss: they are still read (as not finite)."""
    with pytest.warns(UserWarning):
        main(train("--rounds", "1", "--out", "run.json", "--lr", "1e30"))
    data = json.loads((fake_data / "run.json").read_text())
    del data["diverged"]
    data["records"][0]["test_loss"] = math.nan
    (fake_data / "old.json").write_text(json.dumps(data))
    assert History.load(fake_data / "old.json").diverged


# --- 10. reproduction run ids ------------------------------------------------------------------

def test_a_rate_close_to_a_saved_one_is_another_run(result_dir):
    setting = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.1-E1-B10")
    assert R.run_id(setting, 0.1000001, 0) != R.run_id(setting, 0.1, 0)
    assert R.run_status(setting, 0.1, 0, result_dir) == "done"
    assert R.run_status(setting, 0.1000001, 0, result_dir) == "pending"
    assert R.saved_result(setting, 0.1000001, 0, 1, result_dir) is None


# --- 11. rounds too large for the memory --------------------------------------------------------

def test_a_round_too_large_for_the_memory_is_refused_before_it_starts(fake_data, no_training, capsys, monkeypatch):
    monkeypatch.setattr(fedlib.runner, "available_memory", lambda device: 2**30)       # 1 GiB free
    refused(capsys, train("--clients", "200", "--frac", "1", "--batch-size", "inf", "--epochs", str(10**9)),
            "m = 200 clients a round (K = 200, C = 1) would need about", "GiB on the cpu",
            "more than 80% of the 1.0 GiB available there; lower frac (C), num_clients (K)")


def test_the_estimate_of_the_issues_round_covers_what_it_took():
    """K = 4000, C = 1, B = infinity on MNIST grew to 7.3 GiB (issue 22): 4000 models of 199,210
    float32 parameters, twice (the updates and their concatenation), are 5.9 GiB, and the process was
    measured to grow up to 1.55 times such counts; the estimate covers it without crying wolf."""
    from fedlib.backends import round_bytes

    config = FedAvgConfig(num_clients=4000, frac=1.0, batch_size=None)
    need = round_bytes("vectorized", fedlib.build_model("2nn"), torch.zeros(1, 1, 28, 28), [15] * 4000, config)
    assert 7.3 * 2**30 < need < 7.3 * 2**30 * 1.5


def test_scaffolds_control_variates_count_for_every_client():
    from fedlib.backends import round_bytes

    config = FedAvgConfig(num_clients=1000, frac=0.01)
    model, x = fedlib.build_model("2nn"), torch.zeros(1, 1, 28, 28)
    alone = round_bytes("sequential", model, x, [60] * 1000, config)
    with_state = round_bytes("sequential", model, x, [60] * 1000, config, state_copies=1001)
    assert with_state - alone == pytest.approx(1.6 * 1001 * 199210 * 4, abs=1)


# --- 12. Ctrl-C at any moment ----------------------------------------------------------------------

@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_ctrl_c_while_importing_or_starting_prints_one_line(tmp_path, delay):
    """python -m fedlib imports torch first (a second or more): a Ctrl-C then, or while the data
    loads, is one line and status 130, never a traceback."""
    write_fake_mnist(tmp_path / "data", n_train=200, n_test=50)
    process = subprocess.Popen([sys.executable, "-m", "fedlib", "train", *TINY, "--rounds", "100000"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "FEDLIB_DATA": str(tmp_path / "data")})
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fedlib")


SWALLOWED_WHILE_IMPORTING = """
import os, signal, sys, time
import fedlib.__main__ as entry

class Swallow:                       # what a library's `except BaseException: pass` does during an import
    def find_spec(self, name, path=None, target=None):
        if name == "fedlib.cli":
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass
        return None

sys.meta_path.insert(0, Swallow())
sys.argv = ["fedlib", "train", *sys.argv[1:]]
sys.exit(entry.launch())
"""


def test_a_ctrl_c_that_an_import_swallows_still_stops_the_program(tmp_path):
    """The Ctrl-C in the test above sometimes landed (under load) in torch's import at a moment where
    its KeyboardInterrupt never reached fedlib, and the run trained on. The first signal is remembered:
    once the imports are done, a program that got one stops with one line and status 130."""
    write_fake_mnist(tmp_path / "data", n_train=200, n_test=50)
    done = subprocess.run([sys.executable, "-c", SWALLOWED_WHILE_IMPORTING, *TINY, "--rounds", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FEDLIB_DATA": str(tmp_path / "data")})
    assert (done.returncode, done.stderr.strip()) == (130, "fedlib: interrupted"), done.stderr


BROKEN_WHILE_IMPORTING = """
import os, signal, sys, time
import fedlib.__main__ as entry

when = sys.argv[1]

class Break:                         # an error raised while fedlib.cli is imported, after a Ctrl-C or not
    def find_spec(self, name, path=None, target=None):
        if name == "fedlib.cli":
            if when == "after-ctrl-c":
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                except KeyboardInterrupt as interrupt:   # as Python 3.11 does when the signal lands in __set_name__
                    raise RuntimeError("Error calling __set_name__ on 'Field' instance") from interrupt
            else:
                raise RuntimeError("a bug in an import")
        return None

sys.meta_path.insert(0, Break())
sys.argv = ["fedlib", "train", *sys.argv[2:]]
sys.exit(entry.launch())
"""


@pytest.mark.parametrize("when", ["after-ctrl-c", "without-ctrl-c"])
def test_an_error_raised_by_an_import_is_the_ctrl_c_only_if_one_came(tmp_path, when):
    """The Ctrl-C test above once failed with a traceback: the signal landed while torch's import created a
    class, and Python 3.11 turned the KeyboardInterrupt into "RuntimeError: Error calling __set_name__". After a
    Ctrl-C such an error is the interrupt (one line, status 130); without one it is a bug and keeps its traceback."""
    write_fake_mnist(tmp_path / "data", n_train=200, n_test=50)
    done = subprocess.run([sys.executable, "-c", BROKEN_WHILE_IMPORTING, when, *TINY, "--rounds", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FEDLIB_DATA": str(tmp_path / "data")})
    if when == "after-ctrl-c":
        assert (done.returncode, done.stderr.strip()) == (130, "fedlib: interrupted"), done.stderr
    else:
        assert done.returncode == 1 and "Traceback" in done.stderr, done.stderr
        assert done.stderr.strip().endswith("RuntimeError: a bug in an import")


def test_importing_fedlib_imports_nothing_heavy():
    """What lets python -m fedlib catch a Ctrl-C during the imports: the package is lazy."""
    code = "import sys, fedlib; print('torch' in sys.modules); fedlib.FedAvgConfig; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


# --- 13. the Flower launcher ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["--timeout", "1e-9"], "argument --timeout: must be a finite number in [1, 86400], got 1e-9"),
    (["--timeout", "1e10"], "argument --timeout: must be a finite number in [1, 86400], got 1e10"),
    (["--num-clients", "1e21"], "argument --num-clients: expected an integer, got '1e21'"),
    (["--num-clients", str(10**21)], "argument --num-clients: must be at most 2^31 - 1"),
    (["--partition", "shards", "--num-clients", "60001"], "num_clients (K) must be <= the number of examples (200)"),
    (["--partition", "shards", "--num-clients", "101"], "num_clients * shards_per_client must be <="),
    (["--lr", "1e39"], "argument --lr: must be at most 3.40282e+38"),
    (["--out", ""], "--out must name a file, got an empty name"),
    (["--out", "x" * 250 + ".json"], "shorten the name by"),
])
def test_the_flower_launcher_refuses_a_run_that_cannot_work_before_starting_anything(fake_data, capsys,
                                                                                    monkeypatch, argv, fragment):
    pytest.importorskip("flwr")
    from fedlib.flower import deploy

    monkeypatch.setattr(deploy, "LocalFederation", None)         # starting a federation would fail the test
    assert deploy.main(argv) == 2
    one_line_error(capsys, fragment)


def test_the_flower_launcher_exits_1_with_the_cause_when_no_client_sent_an_update(fake_data, capsys, monkeypatch):
    """Every client failed in every round (the issue: exit 0): one line with the cause, exit 1."""
    pytest.importorskip("flwr")
    from fedlib.flower import deploy

    class Failing:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def run(self, run_config, **kwargs):
            records = [fedlib.RoundRecord(t, [], 0.1, 2.3, math.nan, 0.1, 0) for t in (1, 2)]
            return deploy.DeployResult(History(run_config, records), [], 1.0, 2.0)

        def cause(self, log):
            return "ValueError: a client's data could not be read"

    monkeypatch.setattr(deploy, "LocalFederation", Failing)
    assert deploy.main(["--rounds", "2"]) == 1
    assert capsys.readouterr().err.strip() == ("python -m fedlib.flower.deploy: no client sent an update in any of the "
                                               "2 rounds (ValueError: a client's data could not be read)")


def test_the_flower_launcher_says_where_a_missing_dataset_goes(fake_data, capsys, monkeypatch):
    pytest.importorskip("flwr")
    from fedlib.flower import deploy

    monkeypatch.setattr(deploy, "LocalFederation", None)
    assert deploy.main(["--dataset", "cifar10"]) == 1
    err = capsys.readouterr().err
    assert "cifar10 not found under" in err and "Traceback" not in err


# --- 14. the Python API ------------------------------------------------------------------------------

def tiny_weights(*shape: int) -> dict:
    return {"w": torch.ones(*shape), "b": torch.zeros(2)}


API_CASES = [
    ("run-dict", lambda: fedlib.run({"lr": 0.1}), TypeError, "config must be a fedlib.FedAvgConfig, got dict"),
    ("run-data-name", lambda: fedlib.run(FedAvgConfig(num_clients=4, rounds=1), "mnist"), TypeError,
     "data must be a fedlib.Dataset"),
    ("run-on-round-int", lambda: fedlib.run(FedAvgConfig(), on_round=5), TypeError, "on_round must be a function"),
    ("run-many-one-config", lambda: fedlib.run_many(FedAvgConfig()), TypeError, "configs must be a list"),
    ("config-lr-text", lambda: FedAvgConfig(lr="0.1").validate(), InputError, "lr (eta) must be a finite number"),
    ("config-flag-int", lambda: FedAvgConfig(stop_at_target=1).validate(), InputError, "stop_at_target must be True"),
    ("fedavg-nan", lambda: fedavg([tiny_weights(3)], [math.nan]), InputError, "num_examples[k] (n_k) must be"),
    ("fedavg-inf", lambda: fedavg([tiny_weights(3)], [math.inf]), InputError, "num_examples[k] (n_k) must be"),
    ("fedavg-2**1100", lambda: fedavg([tiny_weights(3)] * 2, [2**1100, 1]), InputError, "must be at most 2^53"),
    ("fedavg-1e308", lambda: fedavg([tiny_weights(3)] * 2, [1e308, 1e308]), InputError, "num_examples[k] (n_k)"),
    ("fedavg-bool", lambda: fedavg([tiny_weights(3)], [True]), InputError, "num_examples[k] (n_k)"),
    ("fedavg-negative", lambda: fedavg([tiny_weights(3)] * 2, [-1, 2]), InputError, "num_examples[k] (n_k)"),
    ("fedavg-zero-sum", lambda: fedavg([tiny_weights(3)], [0]), InputError, "with a positive sum"),
    ("fedavg-broadcast", lambda: fedavg([tiny_weights(3), tiny_weights(1)], [1, 1]), InputError,
     "weights_list[1]['w'] must have weights_list[0]'s shape"),
    ("fedavg-dtype", lambda: fedavg([tiny_weights(3), {k: v.double() for k, v in tiny_weights(3).items()}], [1, 1]),
     InputError, "shape, dtype and device"),
    ("fedavg-missing-key", lambda: fedavg([tiny_weights(3), {"w": torch.ones(3)}], [1, 1]), InputError,
     "missing ['b'], extra []"),
    ("fedavg-extra-key", lambda: fedavg([tiny_weights(3), tiny_weights(3) | {"x": torch.ones(1)}], [1, 1]),
     InputError, "extra ['x']"),
    ("fedavg-bare-tensors", lambda: fedavg([torch.ones(3), torch.ones(3)], [1, 1]), TypeError,
     "weights_list[0] must be a state dict"),
    ("fedavg-one-dict", lambda: fedavg(tiny_weights(3), [1]), TypeError, "weights_list must be a list of state dicts"),
    ("fedavg-int-tensor", lambda: fedavg([{"w": torch.ones(3, dtype=torch.int64)}], [1]), TypeError,
     "must be a dense floating-point tensor"),
    ("fedavg-sparse", lambda: fedavg([{"w": torch.ones(3).to_sparse()}] * 2, [1, 1]), TypeError, "must be a dense"),
    ("fedavg-meta", lambda: fedavg([{"w": torch.empty(3, device="meta")}], [1]), TypeError, "on meta"),
    ("fedavg-n-text", lambda: fedavg([tiny_weights(3)], "1"), TypeError, "num_examples must be a list"),
    ("local-update-empty", lambda: local_update(fedlib.build_model("2nn"), torch.zeros(0, 1, 28, 28),
                                                torch.zeros(0, dtype=torch.int64), epochs=1, batch_size=10, lr=0.1),
     InputError, "a client needs n_k >= 1 examples"),
    ("sample-clients-no-rng", lambda: sample_clients(10, 0.5, None), TypeError, "rng must be a numpy.random.Generator"),
    ("sample-clients-seed", lambda: sample_clients(10, 0.5, 0), TypeError, "rng must be a numpy.random.Generator"),
    ("rounds-to-target-unsorted", lambda: rounds_to_target([(2, 0.5), (1, 0.9)], 0.8), InputError,
     "history's rounds must be finite numbers in increasing order, got 1 at position 1 after 2"),
    ("rounds-to-target-repeated", lambda: rounds_to_target([(1, 0.5), (1, 0.9)], 0.8), InputError, "increasing"),
    ("rounds-to-target-accuracy", lambda: rounds_to_target([0.5, 1.5], 0.8), InputError,
     "history's accuracies must be numbers in [0, 1], got 1.5"),
    ("rounds-to-target-nan", lambda: rounds_to_target([0.5, math.nan], 0.8), InputError, "accuracies"),
    ("rounds-to-target-target", lambda: rounds_to_target([0.5], 1.5), InputError, "target must be"),
    ("rounds-to-target-text", lambda: rounds_to_target("0.5", 0.8), TypeError, "history must be a History"),
    ("check-output-int", lambda: check_output(5), TypeError, "must be a path"),
]


@pytest.mark.parametrize("name, call, error, fragment", API_CASES, ids=[c[0] for c in API_CASES])
def test_the_api_names_the_argument_at_the_call(fake_data, no_training, name, call, error, fragment):
    with pytest.raises(error) as raised:
        call()
    assert fragment in str(raised.value)


def test_numpy_scalars_and_fractions_are_accepted_as_the_numbers_they_equal(fake_data, capsys):
    """np.int64 K, np.float32 eta, a Fraction C, np.bool_: validated, converted to int, float and bool,
    trained, saved as plain JSON, and the run's own checkpoint resumes it."""
    config = FedAvgConfig(num_clients=np.int64(10), frac=Fraction(1, 5), lr=np.float32(0.25), rounds=np.int16(2),
                          stop_at_target=np.bool_(False), seed=np.uint8(3)).validate()
    assert [type(v) for v in (config.num_clients, config.frac, config.lr, config.rounds, config.stop_at_target,
                              config.seed)] == [int, float, float, int, bool, int]
    assert config.frac == 0.2 and config.lr == 0.25
    data = fedlib.load_dataset("mnist", device="cpu", download=False)
    first = fedlib.run(config, data, progress=False, checkpoint=fake_data / "run.ckpt")
    again = fedlib.run(FedAvgConfig(num_clients=np.int64(10), frac=Fraction(1, 5), lr=np.float32(0.25),
                                    rounds=np.int16(2), stop_at_target=np.bool_(False), seed=np.uint8(3)),
                       data, progress=False, checkpoint=fake_data / "run.ckpt")
    assert again.records == first.records
    first.save(fake_data / "run.json")
    assert strict_json(fake_data / "run.json")["config"]["num_clients"] == 10


def test_a_config_value_of_the_wrong_type_is_refused_at_validation_not_at_save():
    for field, value in [("num_clients", 10.0), ("num_clients", "10"), ("lr", None), ("lr", [0.1]),
                         ("lr", torch.tensor(0.1)), ("batch_size", np.float64(10)), ("model", b"2nn"),
                         ("seed", True), ("dp_reproducible", "yes")]:
        with pytest.raises(InputError, match=field):
            FedAvgConfig(**{field: value}).validate()
