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


# evaluate, diverged, History's accessors and saved form, client_drift: each against its docstring, by hand.

import math

import numpy as np
import torch
from torch import nn

from fedlib.data import IGNORE_INDEX
from fedlib.metrics import client_drift, diverged, evaluate
from fedlib.params import InputError


def by_hand(logits, targets):
    """Accuracy and mean cross-entropy over the rows whose target is not IGNORE_INDEX, in float64."""
    hits, losses = 0, []
    for row, t in zip(logits.tolist(), targets.tolist()):
        if t == IGNORE_INDEX:
            continue
        hits += max(range(len(row)), key=row.__getitem__) == t
        losses.append(math.log(sum(math.exp(v) for v in row)) - row[t])
    return hits / len(losses), sum(losses) / len(losses)


def test_evaluate_is_accuracy_and_mean_loss_over_every_example_in_batches():
    torch.manual_seed(0)
    x, y = torch.randn(7, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3))    # left in training mode
    expected = by_hand(model[2](x.flatten(1)).detach(), y)
    accuracy, loss = evaluate(model, x, y, batch_size=3)                  # batches of 3, 3 and 1
    assert not model.training and accuracy == expected[0]
    assert loss == pytest.approx(expected[1], rel=1e-6)                    # float32 sums of 7 terms
    assert evaluate(model, x, y) == (accuracy, pytest.approx(loss, rel=1e-6))


class PerPosition(nn.Module):
    """A sequence model with no context: logits (N, C, T) from each position's character alone."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(5, 5)

    def forward(self, x):
        return self.table(x).permute(0, 2, 1)


def test_evaluate_counts_sequences_per_character_without_the_padding():
    torch.manual_seed(1)
    model = PerPosition()
    x = torch.randint(0, 5, (3, 4))
    y = torch.randint(0, 5, (3, 4))
    y[0, 3] = y[2, 0] = y[2, 1] = IGNORE_INDEX
    expected = by_hand(model.table(x).reshape(12, 5).detach(), y.reshape(12))
    accuracy, loss = evaluate(model, x, y, batch_size=2)
    assert accuracy == pytest.approx(expected[0], abs=0) and loss == pytest.approx(expected[1], rel=1e-6)


def record(round=1, clients=(0,), accuracy=None, test_loss=None, train_loss=0.5, seconds=0.25, uploaded=100):
    return RoundRecord(round, list(clients), accuracy, test_loss, train_loss, seconds, uploaded)


@pytest.mark.parametrize("rec, expected", [
    (record(), False),
    (record(accuracy=0.9, test_loss=0.3), False),
    (record(train_loss=math.nan), True),
    (record(train_loss=math.inf), True),
    (record(clients=(), train_loss=math.nan), False),          # no clients, no training loss
    (record(clients=(), train_loss=math.nan, accuracy=0.1, test_loss=math.nan), True),
    (record(accuracy=0.1, test_loss=math.inf), True),
])
def test_diverged_reads_the_training_and_test_losses(rec, expected):
    assert diverged(rec) is expected
    assert History({}, [record(), rec]).diverged is expected
    assert History({}, [rec, record()]).diverged is False                # only the last round counts


def test_history_accessors_read_the_evaluated_rounds():
    h = History({}, [record(1, accuracy=0.4, test_loss=1.0), record(2, seconds=1.0),
                     record(3, accuracy=0.7, test_loss=0.5, seconds=2.0), record(4, accuracy=0.6, test_loss=0.6)])
    assert [r.round for r in h.evaluated()] == h.rounds == [1, 3, 4]
    assert h.accuracies == [0.4, 0.7, 0.6] and h.final_accuracy == 0.6 and h.best_accuracy == 0.7
    assert h.seconds == 0.25 + 1.0 + 2.0 + 0.25
    empty = History({}, [record()])
    assert empty.final_accuracy is None and empty.best_accuracy is None and empty.rounds == []
    assert History({}).diverged is False and History({}).seconds == 0


def test_a_history_saves_losses_that_are_not_finite_as_null_and_reads_them_back(tmp_path):
    h = History({"num_clients": 3}, [record(1, (0, 2), 0.5, 0.7, 0.4, 0.5, 10),
                                     record(2, (1,), 0.2, math.inf, math.nan, 0.5, 20)], device="cuda:0")
    saved = h.to_dict()
    assert [(r["train_loss"], r["test_loss"]) for r in saved["records"]] == [(0.4, 0.7), (None, None)]
    assert saved["diverged"] is True and saved["device"] == "cuda:0" and saved["versions"] == h.versions
    assert (h.versions["torch"], h.versions["numpy"]) == (torch.__version__, np.__version__)
    h.save(tmp_path / "run.json")
    back = History.load(tmp_path / "run.json")
    assert back.device == "cuda:0" and back.config == {"num_clients": 3} and back.versions == h.versions
    assert back.records[0] == h.records[0] and back.records[1].clients == [1]
    assert math.isnan(back.records[1].train_loss) and math.isnan(back.records[1].test_loss)
    assert back.diverged
    older = History.from_dict({"config": {}, "records": [saved["records"][0] | {"test_loss": None}]})
    assert math.isnan(older.records[0].test_loss) and older.device == "cpu" and older.versions == {}


@pytest.mark.parametrize("field, value, fragment", [
    ("test_accuracy", True, "test_accuracy must be None"),
    ("test_accuracy", 1.5, "test_accuracy must be None"),
    ("train_loss", "0.5", "train_loss must be a number"),
    ("seconds", -1.0, "seconds must be a finite number"),
    ("bytes_uploaded", True, "bytes_uploaded must be a count"),
    ("bytes_uploaded", 5, "bytes_uploaded must be a count of bytes >= the round before's \\(10\\)"),
    ("clients", [0, 3], "clients must be distinct clients in \\[0, 3\\)"),
    ("clients", [1, 1], "clients must be distinct clients in .* increasing order, got \\[1, 1\\]"),
    ("round", True, "round must be 2"),
    ("clients", [-1, 0], "clients must be distinct clients in \\[0, 3\\)"),
    ("bytes_uploaded", 20.5, "bytes_uploaded must be a count"),
])
def test_a_saved_record_is_checked_field_by_field(field, value, fragment):
    good = History({"num_clients": 3}, [record(1, uploaded=10), record(2, uploaded=10)]).to_dict()
    History.from_dict(good)                                                # equal bytes_uploaded is fine
    good["records"][1][field] = value
    with pytest.raises(InputError, match=f"record 1's {fragment}"):
        History.from_dict(good)


@pytest.mark.parametrize("value, shown", [
    ("x" * 57, repr("x" * 57)),                       # a repr of 59 characters is shown whole
    ("x" * 58, repr("x" * 58)[:50] + "..."),          # one of 60 is cut to 50 and "..."
    (list(range(40)), repr(list(range(40)))[:50] + "..."),
])
def test_a_wrong_value_is_shown_in_the_message_up_to_59_characters(value, shown):
    saved = History({}, [record(1)]).to_dict()
    saved["records"][0]["train_loss"] = value
    with pytest.raises(InputError) as error:
        History.from_dict(saved)
    assert str(error.value).endswith(f", got {shown}")


def test_a_saved_history_is_checked_whole():
    first = History({}, [record(1, clients=(), uploaded=0)]).to_dict()      # a round without clients uploads 0
    assert History.from_dict(first).records[0].bytes_uploaded == 0
    with pytest.raises(InputError, match=r"a history has no fields \['extra'\]"):
        History.from_dict(first | {"extra": 1})
    with pytest.raises(InputError, match=r"its 'diverged' \(True\) does not match its records"):
        History.from_dict(first | {"diverged": True})


def test_loading_a_missing_or_wrong_file_names_it(tmp_path):
    with pytest.raises(InputError, match="no such run file"):
        History.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"config": {}}')
    with pytest.raises(InputError, match="not a fedlib history file: .*bad.json"):
        History.load(tmp_path / "bad.json")


def test_client_drift_is_each_updates_norm_and_its_cosine_with_the_weighted_mean():
    w_t = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    moved = [{"a": torch.tensor([4.0, 2.0]), "b": torch.tensor([[4.0]])},     # Delta = (3, 0, 4)
             {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[0.0]])}]     # Delta = (0, 1, 0)
    norms, cosines = client_drift(w_t, moved, [1, 3])
    mean = [3 / 4, 3 / 4, 4 / 4]                                              # (1 (3,0,4) + 3 (0,1,0)) / 4
    size = math.sqrt(sum(v * v for v in mean))
    assert norms == pytest.approx([5.0, 1.0], rel=1e-12)
    assert cosines == pytest.approx([(9 / 4 + 4) / (5 * size), (3 / 4) / size], rel=1e-12)


def test_rounds_to_target_takes_tuples_numpy_numbers_and_refuses_other_histories():
    assert rounds_to_target(((1, np.float32(0.5)), (np.int64(3), 0.75)), 0.625) == pytest.approx(2.0)
    assert rounds_to_target([[2, 0.5], [4, 1.0]], 1.0) == 4.0
    assert rounds_to_target(iter([0.2, 0.4]), 0.3) == pytest.approx(1.5)
    assert rounds_to_target([], 0.5) is None
    for history in ("0.5", {1: 0.5}, 0.5):
        with pytest.raises(TypeError, match="history must be a History"):
            rounds_to_target(history, 0.5)
    with pytest.raises(InputError, match="accuracies must be numbers"):
        rounds_to_target([True], 0.5)
