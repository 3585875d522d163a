"""Real MNIST runs: the accuracy the paper's setting reaches, determinism, resuming."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedlib import FedAvgConfig, run

PAPER_2NN = dict(dataset="mnist", model="2nn", partition="iid", num_clients=100, frac=0.1,
                 local_epochs=1, batch_size=10, lr=0.1, device="cpu")


def test_2nn_iid_reaches_90_percent_in_5_rounds(mnist):
    """Measured: 92.73% with seed 0, and 92.56-92.73% over seeds 0-4 (on an AVX-512 Xeon).
    Another machine's float rounding perturbs a run by less than a new seed does (same
    partition, sampling and shuffles), so 90% leaves a margin of 15 times the seed spread."""
    history = run(FedAvgConfig(rounds=5, seed=0, **PAPER_2NN), mnist, progress=False)
    assert history.final_accuracy >= 0.90, history.accuracies
    assert len(history.records) == 5 and all(len(r.clients) == 10 for r in history.records)
    assert history.records[-1].bytes_uploaded == 5 * 10 * 4 * 199_210


def test_same_seed_same_history_other_seed_other_history(mnist):
    config = FedAvgConfig(rounds=2, seed=7, partition="shards",
                          **{k: v for k, v in PAPER_2NN.items() if k != "partition"})
    a = run(config, mnist, progress=False)
    b = run(config, mnist, progress=False)
    c = run(FedAvgConfig(**{**config.__dict__, "seed": 8}), mnist, progress=False)
    strip = lambda h: [(r.round, r.clients, r.test_accuracy, r.test_loss, r.train_loss) for r in h.records]
    assert strip(a) == strip(b)
    assert FedAvgConfig.from_dict(a.config) == config      # a saved run's config rebuilds the run
    assert strip(a) != strip(c)


@pytest.mark.slow
def test_same_command_twice_gives_the_same_history(tmp_path):
    root = Path(__file__).parents[1]
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "-m", "fedlib", "train", "--rounds", "2", "--partition", "shards",
                        "--device", "cpu", "--no-progress", "--seed", "3", "--out", str(out)],
                       check=True, cwd=root, capture_output=True, timeout=300)
        records = json.loads(out.read_text())["records"]
        outputs.append([{k: v for k, v in r.items() if k != "seconds"} for r in records])
    assert outputs[0] == outputs[1]


def test_an_interrupted_run_resumes_to_the_same_history(mnist, tmp_path):
    config = FedAvgConfig(rounds=4, seed=1, **PAPER_2NN)
    full = run(config, mnist, progress=False)

    checkpoint = tmp_path / "run.ckpt"

    def crash_in_round_3(record):
        if record.round == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(config, mnist, progress=False, checkpoint=checkpoint, checkpoint_every=2, on_round=crash_in_round_3)
    resumed = run(config, mnist, progress=False, checkpoint=checkpoint, checkpoint_every=2)
    assert [r.round for r in resumed.records] == [1, 2, 3, 4]
    assert resumed.accuracies == full.accuracies
    assert [r.clients for r in resumed.records] == [r.clients for r in full.records]

    with pytest.raises(ValueError, match="another configuration"):
        run(FedAvgConfig(rounds=5, seed=1, **PAPER_2NN), mnist, progress=False, checkpoint=checkpoint)


def test_stop_at_target_ends_the_run_once_reached(mnist):
    history = run(FedAvgConfig(rounds=50, seed=0, target=0.85, stop_at_target=True, **PAPER_2NN),
                  mnist, progress=False)
    assert history.final_accuracy >= 0.85 and len(history.records) < 50
    assert all(acc < 0.85 for acc in history.accuracies[:-1])
