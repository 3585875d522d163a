"""rounds_to_target the paper's way, and the History file."""

import json

import pytest

from fedlib.metrics import History, RoundRecord, rounds_to_target


def history_of(accuracies, every=1):
    records = []
    for i, acc in enumerate(accuracies):
        records.append(RoundRecord(round=(i + 1) * every, clients=[0], test_accuracy=acc, test_loss=1 - acc,
                                   train_loss=0.5, seconds=0.1, bytes_uploaded=100 * (i + 1)))
    return History(config={"model": "2nn"}, records=records)


@pytest.mark.parametrize("accuracies, target, expected", [
    ([0.5, 0.8, 0.9, 0.95], 0.9, 3.0),                  # reached exactly at round 3
    ([0.5, 0.8, 0.9, 0.95], 0.85, 2.5),                 # halfway between rounds 2 and 3
    ([0.5, 0.8, 0.9, 0.95], 0.92, 3.4),                 # 0.02 / 0.05 of the way from 3 to 4
    ([0.5, 0.8, 0.9, 0.95], 0.96, None),                # never reached
    ([0.95, 0.96], 0.9, 1.0),                           # reached in the first round
    ([0.5, 0.9, 0.6, 0.7, 0.95], 0.85, 1.875),          # best-so-far: the dip after round 2 does not matter
    ([0.5, 0.88, 0.6, 0.7, 0.95], 0.9, 4.0 + 0.02 / 0.07),  # the curve is made monotone before interpolating
])
def test_rounds_to_target(accuracies, target, expected):
    got = rounds_to_target(accuracies, target)
    assert got == pytest.approx(expected) if expected is not None else got is None
    assert rounds_to_target(history_of(accuracies), target) == got


def test_rounds_to_target_uses_evaluated_rounds_only():
    # Evaluated every 5 rounds: 0.8 at round 5, 0.9 at round 10 -> 0.85 at round 7.5.
    assert rounds_to_target(history_of([0.8, 0.9], every=5), 0.85) == pytest.approx(7.5)
    assert rounds_to_target([(5, 0.8), (10, 0.9)], 0.85) == pytest.approx(7.5)
    h = history_of([0.8, 0.9], every=2)
    h.records.insert(1, RoundRecord(3, [1], None, None, 0.4, 0.1, 150))   # a round without evaluation
    assert h.rounds == [2, 4] and rounds_to_target(h, 0.85) == pytest.approx(3.0)


def test_history_round_trip_with_config_and_versions(tmp_path):
    h = history_of([0.5, 0.7])
    h.save(tmp_path / "run.json")
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["config"] == {"model": "2nn"}
    assert {"fedlib", "torch", "numpy", "python"} <= set(saved["versions"])
    assert set(saved["records"][0]) == {"round", "clients", "test_accuracy", "test_loss", "train_loss",
                                        "seconds", "bytes_uploaded"}
    loaded = History.load(tmp_path / "run.json")
    assert loaded.records == h.records and loaded.accuracies == [0.5, 0.7]
    assert loaded.final_accuracy == 0.7 and loaded.best_accuracy == 0.7
