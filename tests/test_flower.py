"""FedAvg on Flower: the app's configuration, the Ray simulation against fedlib, and a real
deployment (SuperLink + SuperNodes as processes on 127.0.0.1), including a SuperNode that stops.

Everything that starts Ray or Flower processes is marked ``flower`` (and ``slow``):
``pytest -m flower`` runs just those, ``pytest -m "not flower"`` skips them. Each one is
bounded in time by its own timeout. The module is skipped when the ``flower`` extra
(``pip install .[flower]``) is not installed.
"""

from __future__ import annotations

import math
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
from fedlib.params import InputError  # noqa: E402
from fedlib.config import FedAvgConfig  # noqa: E402

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
    ("lr", -0.1, "lr must be a finite number > 0, got -0.1"),
    ("lr", "nan", "lr must be a finite number > 0, got nan"),
    ("frac", 1.5, r"frac must be a finite number in \[0, 1\], got 1.5"),
    ("partition", "zipf", "partition must be one of"),
    ("local-epochs", 0, "local-epochs must be an integer >= 1, got 0"),
    ("batch-size", "ten", "batch-size expected an integer, got 'ten'"),
])
def test_record_with_a_bad_value_names_the_parameter(key, value, message):
    with pytest.raises(InputError, match=message):
        from_record({**to_record(FedAvgConfig()), key: value})


def test_a_round_summary_names_the_clients_that_replied_and_weighs_their_loss():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedlib.flower.server_app import round_summary

    def reply(k: int, n_k: int, loss: float) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"num-examples": n_k, "train-loss": loss}),
                           "client": ConfigRecord({"partition-id": k})})
    clients, loss = round_summary([reply(7, 300, 1.0), reply(2, 100, 2.0)])
    assert clients == [2, 7] and loss == pytest.approx((300 * 1.0 + 100 * 2.0) / 400)
    clients, loss = round_summary([])                 # every sampled node failed
    assert clients == [] and math.isnan(loss)


def test_the_run_config_file_carries_any_value_safely():
    import tomllib

    from fedlib.flower.deploy import toml_run_config

    values = {"partition": 'iid" lr=5 rounds="9', "history-path": "/tmp/a b\\c.json", "lr": 0.1, "rounds": 2,
              "stop": False}
    assert tomllib.loads(toml_run_config(values)) == values        # no key injected through a quote
    with pytest.raises(InputError, match="keys must be"):
        toml_run_config({"a b": 1})
    with pytest.raises(InputError, match="must be finite"):
        toml_run_config({"lr": float("inf")})


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
def test_a_round_in_which_every_node_fails_records_no_clients():
    """The only SuperNode is stopped in round 2: the round gets no reply at all. Its record
    has no clients and a nan training loss (not round 1's again), adds no uploaded bytes,
    and the global model stays w_1, so its accuracy is round 1's."""
    from fedlib.flower.deploy import LocalFederation

    with LocalFederation(1, num_clients=100, log="none") as federation:
        result = federation.run({"rounds": 2, "frac": 1.0}, stop_in_round=2, timeout=300)
    first, second = result.history.records
    assert first.clients == [0] and second.clients == []
    assert math.isfinite(first.train_loss) and math.isnan(second.train_loss)
    assert second.bytes_uploaded == first.bytes_uploaded
    assert second.test_accuracy == first.test_accuracy
    assert any("Received 0 results and 1 failures" in line for line in result.log)


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
