"""FedAvg on Flower: the app's configuration, the Ray simulation against fedlib, and a real
deployment (SuperLink + SuperNodes as processes on 127.0.0.1), including a SuperNode that stops.

Everything that starts Ray or Flower processes is marked ``flower`` (and ``slow``):
``pytest -m flower`` runs just those, ``pytest -m "not flower"`` skips them. Each one is
bounded in time by its own timeout. The module is skipped when the ``flower`` extra
(``pip install .[flower]``) is not installed.
"""

from __future__ import annotations

import dataclasses
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


# A configuration per strategy with every field set away from its default where the strategy allows:
# together they change every field of FedAvgConfig (checked below, so a new field must be added here).
GENERAL = dict(dataset="fashion-mnist", model="cnn", partition="dirichlet", num_clients=50, frac=0.3,
               local_epochs=3, batch_size=None, lr=0.05, rounds=7, seed=3, eval_every=2, device="cpu",
               engine="sequential", momentum=0.5, weight_decay=1e-4, input_scaling="unit", init="glorot-uniform",
               shards_per_client=3, shard_size=100, alpha=0.3, min_size=5, sigma=0.5, target=0.9,
               stop_at_target=True)
METHODS = [dict(strategy="fedprox", mu=0.25), dict(strategy="fedavgm", server_lr=0.7, server_momentum=0.6),
           dict(strategy="fedadam", server_lr=0.003, server_beta1=0.8, server_beta2=0.95, server_tau=1e-4),
           dict(strategy="fedyogi", server_lr=0.02), dict(strategy="dp-fedavg", dp_clip=0.7, dp_noise=1.3,
                                                          dp_reproducible=True),
           dict(strategy="scaffold", momentum=0.0, weight_decay=0.0), dict()]


def test_every_field_of_every_config_survives_the_trip_to_flower_and_back():
    configs = [FedAvgConfig(**GENERAL | method).validate() for method in METHODS]
    changed = {f.name for c in configs for f in dataclasses.fields(FedAvgConfig)
               if getattr(c, f.name) != f.default}
    assert changed == {f.name for f in dataclasses.fields(FedAvgConfig)}, "a field no config here changes"
    for config in configs + [FedAvgConfig()]:
        record = to_record(config)
        assert all(isinstance(v, (bool, int, float, str)) for v in record.values())
        back = from_record(record)
        for f in dataclasses.fields(FedAvgConfig):                # field by field, types included
            assert getattr(back, f.name) == getattr(config, f.name), f.name
            assert type(getattr(back, f.name)) is type(getattr(config, f.name)), f.name
    assert to_record(FedAvgConfig())["batch-size"] == 10 and to_record(FedAvgConfig(batch_size=None))["batch-size"] == "inf"
    assert to_record(FedAvgConfig())["mu"] == "default"


def test_the_apps_run_config_lists_every_field_with_fedlibs_defaults():
    """Flower accepts a run-config override only for a key the app's pyproject.toml lists."""
    import tomllib

    app = tomllib.loads((Path(fedlib.__file__).parent / "flower" / "pyproject.toml").read_text())
    listed = app["tool"]["flwr"]["app"]["config"]
    assert {k: v for k, v in listed.items() if k not in ("min-nodes", "history-path")} == \
        to_record(FedAvgConfig()) | {"rounds": 5}


@pytest.mark.parametrize("key, value, message", [
    ("lr", -0.1, "lr must be a finite number > 0, got -0.1"),
    ("lr", "nan", "lr must be a finite number > 0, got nan"),
    ("frac", 1.5, r"frac must be a finite number in \[0, 1\], got 1.5"),
    ("partition", "zipf", "partition must be one of"),
    ("local-epochs", 0, "local-epochs must be an integer >= 1, got 0"),
    ("batch-size", "ten", "batch-size expected an integer, got 'ten'"),
    ("stop-at-target", "yes", "stop-at-target must be true or false"),
    ("learning-rate", 0.1, "keys that are not fedlib parameters: \\['learning-rate'\\]"),
    ("mu", 0.1, "mu is a parameter of fedprox"),
])
def test_record_with_a_bad_value_names_the_parameter(key, value, message):
    with pytest.raises(InputError, match=message):
        from_record({**to_record(FedAvgConfig()), key: value})


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
def test_simulation_runs_every_method_as_fedlib_does_bit_for_bit(mnist):
    """Flower is only the backend of fedlib's loop: the strategy draws S_t from the seed, the clients
    train with local_update (with FedProx's mu and SCAFFOLD's correction sent in the message), and
    the server averages in client order. With one thread per client, as in the sequential engine
    here, every method's run on Flower equals fedlib.run's to the last bit."""
    from fedlib.flower.simulation import simulate

    base = dict(num_clients=5, frac=0.4, rounds=2, batch_size=50, seed=0, device="cpu", engine="sequential")
    configs = [FedAvgConfig(**base | dict(frac=1.0)), FedAvgConfig(**base, strategy="fedprox", mu=0.1),
               FedAvgConfig(**base, strategy="scaffold"), FedAvgConfig(**base, strategy="fedadam", server_lr=0.01)]
    previous = torch.get_num_threads()
    fedlib.set_threads(1)
    try:
        references = [fedlib.run(config, mnist, progress=False) for config in configs]
    finally:
        torch.set_num_threads(previous)
    result = simulate(configs, num_cpus=2)
    for config, reference, flower in zip(configs, references, result.histories):
        assert flower.config["strategy"] == config.strategy and flower.config["engine_used"] == "flower"
        assert [r.clients for r in flower.records] == [r.clients for r in reference.records]
        assert flower.accuracies == reference.accuracies
        assert [r.train_loss for r in flower.records] == [r.train_loss for r in reference.records]
        ours, theirs = reference.model.state_dict(), flower.model.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), config.strategy
    assert result.histories[0].records[0].clients == [0, 1, 2, 3, 4]
    assert result.ray_start_seconds > 0 and result.peak_memory_bytes > 100 * 2**20


class SilentGrid:
    """A Flower Grid that takes the ServerApp's messages and answers none (no processes)."""

    def __init__(self):
        self.sent = []

    def send_and_receive(self, messages, timeout):
        self.sent.append(len(messages))
        return []


@pytest.mark.parametrize("reproducible", [False, True], ids=["secret", "seeded"])
def test_a_secret_dp_runs_log_names_neither_its_clients_nor_how_many(reproducible, capsys, monkeypatch):
    """DP-FedAvg's sample is secret (its History records no clients): the ServerApp's log keeps it
    too, while a --dp-reproducible run, whose guarantee is void anyway, logs S_t as any other."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlib.flower.server_app import run_on_flower

    for key in ("_run_id", "_node_id", "_task_id"):      # what Flower sets in a ServerApp's process
        monkeypatch.setattr(TaskIdentity, key, 1)

    config = FedAvgConfig(num_clients=10, frac=0.5, rounds=2, seed=0, device="cpu", strategy="dp-fedavg",
                          dp_clip=1.0, dp_noise=1.0, dp_reproducible=reproducible)
    grid = SilentGrid()
    history = run_on_flower(grid, config, timeout=1, nodes={k: 100 + k for k in range(10)})
    out = capsys.readouterr().out
    assert len(history.records) == 2 and sum(grid.sent) > 0
    for record, sent in zip(history.records, grid.sent):
        t = record.round
        if reproducible:
            assert f"round {t}: S_t has {sent} clients, {sent} with a SuperNode; sent to [" in out
            assert f"round {t}: 0 updates came back, {sent} did not" in out
            assert f"round {t}: 0 clients, test accuracy" in out
        else:
            assert f"round {t}: S_t is secret; sent to its clients with a SuperNode\n" in out
            assert f"round {t}: the replies are in\n" in out
            assert f"round {t}: S_t secret, test accuracy" in out
    if not reproducible:
        assert "sent to [" not in out and "came back" not in out and " clients, test" not in out


# --- deployment: real processes --------------------------------------------------------------


def _deploy(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlib.flower.deploy", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _workdir(output: str) -> Path:
    line = next(line for line in output.splitlines() if line.startswith("# working folder "))
    return Path(line.removeprefix("# working folder "))


@pytest.mark.slow
@pytest.mark.flower
def test_deploy_three_supernodes_two_rounds_one_stopped_in_round_two(tmp_path):
    """The command line, as lesson 7 runs it: three SuperNodes, two rounds, and SuperNode 0 stopped
    (SIGTERM) as soon as round 2 has begun, after the server sent it the round's message. A stopped
    SuperNode tells the SuperLink that it leaves, so the message comes back at once as an error, and
    the round averages the two updates it got. (A SuperNode killed without warning is noticed only when
    it misses its heartbeats: 2 x 30 s in Flower 1.42.) One test for both: each deployment takes about
    a minute of two CPUs."""
    out = tmp_path / "history.json"
    done = _deploy("--supernodes", "3", "--num-clients", "100", "--rounds", "2", "--frac", "1.0",
                   "--stop-in-round", "2", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "# stopped SuperNode 0 (partition 0) while round 2 runs" in done.stdout
    history = fedlib.History.load(out)
    assert [r.round for r in history.records] == [1, 2]
    assert [r.clients for r in history.records] == [[0, 1, 2], [1, 2]]
    assert all(r.test_accuracy > 0.5 for r in history.records) and history.config["engine_used"] == "flower"
    workdir = _workdir(done.stdout)
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
    assert result.stopped == [0]
    assert first.clients == [0] and second.clients == []
    assert math.isfinite(first.train_loss) and math.isnan(second.train_loss)
    assert second.bytes_uploaded == first.bytes_uploaded
    assert second.test_accuracy == first.test_accuracy


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
    """Started with SIGINT ignored, as a shell starts a background job (and as this test may be
    started): the deployment still stops on Ctrl-C, and leaves no process and no folder behind."""
    process = subprocess.Popen([sys.executable, "-m", "fedlib.flower.deploy", "--supernodes", "2",
                                "--num-clients", "100", "--rounds", "50"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
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
        if process.poll() is None:      # SIGTERM stops the federation too; kill() would orphan it
            process.terminate()
            try:
                process.communicate(timeout=30)
            finally:
                process.kill()
    assert process.returncode == 130, "".join(lines) + rest
    workdir = _workdir("".join(lines) + rest)
    assert not workdir.exists() and processes_using(workdir) == []


def test_a_clients_reply_is_checked_before_it_is_averaged():
    """A reply names a client that was asked, w_k of w_t's names and shapes, and positive n_k and u_k;
    anything else is a failed client, never averaged."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedlib.flower.clients import reply_update

    w_t = {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}

    def reply(k=3, arrays=None, n_k=20, steps=2):
        arrays = arrays or {"w": torch.ones(2, 3), "b": torch.ones(2)}
        return RecordDict({"client": ConfigRecord({"partition-id": k}), "arrays": ArrayRecord(arrays),
                           "metrics": MetricRecord({"num-examples": n_k, "steps": steps, "train-loss": 0.5})})
    k, update = reply_update(reply(), w_t, {3, 4})
    assert k == 3 and update.num_examples == 20 and update.steps == 2 and update.weights["w"].dtype == torch.float64
    for bad in (reply(k=5), reply(arrays={"w": torch.ones(3, 2), "b": torch.ones(2)}), reply(arrays={"w": torch.ones(2, 3)}),
                reply(n_k=0), reply(steps=-1)):
        with pytest.raises(ValueError):
            reply_update(bad, w_t, {3, 4})


def test_the_clients_data_is_scaled_as_the_config_says(mnist):
    from fedlib.flower.task import client_data, evaluation_data

    unit = FedAvgConfig(input_scaling="unit", num_clients=10, device="cpu")
    x_k, _ = client_data(unit, 0)
    x_test = evaluation_data(unit)[0]
    assert 0 <= x_k.min() and x_k.max() <= 1 and 0 <= x_test.min() and x_test.max() <= 1
    x_std, _ = client_data(FedAvgConfig(num_clients=10, device="cpu"), 0)
    assert x_std.min() < 0
