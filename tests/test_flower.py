"""FedAvg on Flower: the app's configuration, the Ray simulation against fedlib, and a real
deployment (SuperLink + SuperNodes as processes on 127.0.0.1), including a SuperNode that stops.

Everything that starts Ray or Flower processes is marked ``flower`` (and ``slow``):
``pytest -m flower`` runs just those, ``pytest -m "not flower"`` skips them. Each one is
bounded in time by its own timeout. The module is skipped when the ``flower`` extra
(``pip install .[flower]``) is not installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

import fedlib  # noqa: E402
from fedlib.flower.task import from_record, to_record  # noqa: E402
from fedlib.server import FedAvgConfig  # noqa: E402

def processes_using(workdir: Path) -> list[str]:
    """Command lines of live processes whose FLWR_HOME lies in ``workdir`` (what a federation started)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ", "status"]):
        env = proc.info.get("environ") or {}
        if env.get("FLWR_HOME", "").startswith(str(workdir)) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(" ".join(proc.info["cmdline"] or []))
    return found


# --- configuration: fast, no processes ------------------------------------------------------


def test_record_round_trip_keeps_every_knob():
    config = FedAvgConfig(partition="shards", num_clients=50, frac=0.2, local_epochs=5, batch_size=None,
                          lr=0.05, rounds=7, seed=3, device="cpu", engine="sequential")
    record = to_record(config)
    assert record["batch-size"] == "inf" and record["local-epochs"] == 5 and "shard-size" not in record
    assert all(isinstance(v, (bool, int, float, str)) for v in record.values())
    assert from_record(record) == config


@pytest.mark.parametrize("key, value, message", [
    ("lr", -0.1, r"lr \(eta\) must be > 0"),
    ("frac", 1.5, r"frac \(C\) must be in \[0, 1\]"),
    ("partition", "zipf", "partition must be one of"),
    ("local-epochs", 0, r"epochs \(E\) must be >= 1"),
])
def test_record_with_a_bad_value_names_the_parameter(key, value, message):
    with pytest.raises(ValueError, match=message):
        from_record({**to_record(FedAvgConfig()), key: value})


# --- simulation (Ray) ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.flower
def test_simulation_with_all_clients_reproduces_fedlib(mnist):
    """With C = 1 nothing is sampled, so Flower and fedlib run the very same computation:
    same w_0, same partition, same per-client shuffles, the same n_k-weighted sum in the same
    client order. Both train with one thread (float results depend on the thread count), and
    then the two runs agree bit for bit."""
    from fedlib.flower.simulation import simulate

    config = FedAvgConfig(num_clients=5, frac=1.0, rounds=2, batch_size=50, seed=0, device="cpu",
                          engine="sequential")
    previous = torch.get_num_threads()
    fedlib.set_threads(1)
    try:
        reference = fedlib.run(config, mnist, progress=False)
    finally:
        torch.set_num_threads(previous)
    result = simulate(config, num_cpus=2)
    flower = result.history
    assert [r.clients for r in flower.records] == [[0, 1, 2, 3, 4]] * 2
    assert flower.accuracies == reference.accuracies
    ours, theirs = reference.model.state_dict(), flower.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [r.train_loss for r in flower.records] == pytest.approx([r.train_loss for r in reference.records],
                                                                   rel=1e-9)
    assert result.ray_start_seconds > 0 and result.peak_memory_bytes > 100 * 2**20


@pytest.mark.slow
@pytest.mark.flower
def test_simulation_of_the_paper_setting_is_close_to_fedlib(mnist):
    """K = 100, C = 0.1, IID, 2NN, E = 1, B = 10: Flower samples its 10 clients per round with
    its own random generator, so the curves differ by sampling noise only. After 5 rounds the
    test accuracies agree within 2 points (measured gap: a few tenths of a point)."""
    from fedlib.flower.simulation import simulate

    config = FedAvgConfig(num_clients=100, frac=0.1, rounds=5, seed=0, device="cpu")
    reference = fedlib.run(config, mnist, progress=False)
    flower = simulate(config, num_cpus=2).history
    assert [len(r.clients) for r in flower.records] == [10] * 5
    assert abs(flower.final_accuracy - reference.final_accuracy) <= 0.02
    assert flower.final_accuracy > 0.9


# --- deployment: real processes --------------------------------------------------------------


def _deploy(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlib.flower.deploy", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _workdir(output: str) -> Path:
    line = next(line for line in output.splitlines() if line.startswith("# working folder "))
    return Path(line.removeprefix("# working folder "))


@pytest.mark.slow
@pytest.mark.flower
def test_deploy_three_supernodes_two_rounds(tmp_path):
    out = tmp_path / "history.json"
    done = _deploy("--supernodes", "3", "--num-clients", "100", "--rounds", "2", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    history = fedlib.History.load(out)
    assert [r.round for r in history.records] == [1, 2]
    assert [r.clients for r in history.records] == [[0, 1, 2], [0, 1, 2]]
    assert history.final_accuracy > 0.7
    assert "Received 3 results and 0 failures" in done.stdout
    workdir = _workdir(done.stdout)
    assert not workdir.exists() and processes_using(workdir) == []


@pytest.mark.slow
@pytest.mark.flower
def test_run_finishes_without_a_stopped_supernode():
    """SuperNode 0 is stopped (SIGTERM) as soon as round 2 has begun, after the strategy sent it
    the round's message. A stopped SuperNode tells the SuperLink that it leaves, so the message
    comes back at once as an error ("Node Unavailable"), and FedAvg averages the two replies it
    got. (A round that began later would sample only the SuperNodes still connected.) (A SuperNode killed without warning is noticed only when
    it misses its heartbeats: 2 x 30 s in Flower 1.42.)"""
    from fedlib.flower.deploy import LocalFederation

    with LocalFederation(3, num_clients=100, log="none") as federation:
        result = federation.run({"rounds": 2, "frac": 1.0}, stop_in_round=2, timeout=300)
        workdir = federation.workdir
    history = result.history
    assert result.stopped == [0]
    assert [r.round for r in history.records] == [1, 2]
    assert history.records[0].clients == [0, 1, 2]
    assert history.records[1].clients == [1, 2]
    assert any("Sampled 3 nodes (out of 3)" in line for line in result.log)
    assert any("Received 2 results and 1 failures" in line for line in result.log)
    assert any("Node Unavailable" in line for line in result.log)
    assert all(r.test_accuracy > 0.5 for r in history.records)
    assert not workdir.exists() and processes_using(workdir) == []


@pytest.mark.slow
@pytest.mark.flower
def test_deploy_cleans_up_when_the_run_fails():
    """A run the ServerApp rejects (a negative learning rate) raises, and still leaves no process."""
    from fedlib.flower.deploy import LocalFederation

    with pytest.raises(RuntimeError, match="without writing its history"):
        with LocalFederation(1, num_clients=100, log="none") as federation:
            workdir = federation.workdir
            federation.run({"rounds": 1, "lr": -1.0}, timeout=120)
    assert not workdir.exists() and processes_using(workdir) == []


@pytest.mark.slow
@pytest.mark.flower
def test_deploy_cleans_up_on_ctrl_c():
    process = subprocess.Popen([sys.executable, "-m", "fedlib.flower.deploy", "--supernodes", "2",
                                "--num-clients", "100", "--rounds", "50"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("# the SuperLink answers"):
                break
        time.sleep(3)  # the SuperNodes are starting
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, "".join(lines) + rest
    workdir = _workdir("".join(lines) + rest)
    assert not workdir.exists() and processes_using(workdir) == []
