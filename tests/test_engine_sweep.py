"""Many runs in lockstep (``fedlib.run_many``, ``fedlib.engine.lockstep``) give each run its own History.

Each run trained in lockstep must be the run ``fedlib.run(config)`` makes: the same clients
every round, the same test accuracies, and weights equal up to float rounding. Checked in
float64 with the bound of ``tests/test_engine.py``: T rounds of S steps, each made of sums
of at most n terms, may move the weights by about T S n u max|w| (u = 2^-53).
"""

from __future__ import annotations

import pytest
import torch

from fedlib import Dataset, FedAvgConfig, RunInterrupted, run, run_many
from fedlib.engine.lockstep import batch_key, refusal

U64 = torch.finfo(torch.float64).eps / 2


@pytest.fixture(scope="module")
def small(mnist) -> Dataset:
    return Dataset("mnist", mnist.x_train[:2000], mnist.y_train[:2000], mnist.x_test[:1000],
                   mnist.y_test[:1000], mnist.classes).to(dtype=torch.float64)


def assert_same_run(batched, alone, steps_per_round: int, longest_sum: int) -> None:
    assert [r.clients for r in batched.records] == [r.clients for r in alone.records]
    assert batched.accuracies == alone.accuracies
    for a, b in zip(batched.records, alone.records):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-10)
    w_batched, w_alone = batched.model.state_dict(), alone.model.state_dict()
    bound_steps = len(alone.records) * steps_per_round
    for name, w in w_alone.items():
        bound = bound_steps * longest_sum * U64 * max(w.abs().max().item(), 1.0)
        assert (w_batched[name] - w).abs().max().item() <= bound, name


BASE = dict(model="2nn", num_clients=20, frac=0.2, local_epochs=1, batch_size=10, rounds=3, device="cpu",
            shard_size=50)


def test_a_sweep_gives_each_run_its_own_history(small):
    """Runs that differ in rate, seed, partition, rounds and stopping rule, trained at once."""
    configs = [FedAvgConfig(**BASE, lr=0.05, seed=1),
               FedAvgConfig(**BASE | dict(rounds=2), lr=0.2, seed=2, partition="shards"),
               FedAvgConfig(**BASE | dict(rounds=4), lr=0.1, seed=1, partition="shards", eval_every=2),
               FedAvgConfig(**BASE | dict(rounds=5), lr=0.1, seed=3, target=0.5, stop_at_target=True)]
    histories = run_many(configs, small, progress=False)
    for config, history in zip(configs, histories):
        alone = run(FedAvgConfig(**vars(config) | dict(engine="vectorized")), small, progress=False)
        assert history.config["lr"] == config.lr and history.config["seed"] == config.seed
        assert_same_run(history, alone, steps_per_round=10, longest_sum=784)
    assert len(histories[1].records) == 2
    assert len(histories[3].records) < 5            # reached its target and dropped out


def test_runs_of_different_methods_train_in_lockstep(small):
    """The server side of a method (SCAFFOLD's control variates, a server optimizer) is each run's
    own; only the clients' training is shared."""
    configs = [FedAvgConfig(**BASE, lr=0.1, seed=1, strategy="scaffold"),
               FedAvgConfig(**BASE, lr=0.1, seed=2, strategy="fedavgm", server_lr=0.5),
               FedAvgConfig(**BASE, lr=0.05, seed=3, strategy="fedadam", server_lr=0.01),
               FedAvgConfig(**BASE, lr=0.1, seed=4)]
    histories = run_many(configs, small, progress=False)
    for config, history in zip(configs, histories):
        alone = run(FedAvgConfig(**vars(config) | dict(engine="vectorized")), small, progress=False)
        assert history.config["strategy"] == config.strategy
        assert_same_run(history, alone, steps_per_round=10, longest_sum=784)


def test_a_dropout_sweep_equals_sequential_runs(small):
    """A dropout model: every client draws its masks from dropout_seed(seed, t, k), as the
    sequential engine does, so each run of the sweep is that engine's run."""
    base = BASE | dict(model="cnn-small", rounds=2, batch_size=50)
    configs = [FedAvgConfig(**base, lr=0.1, seed=4), FedAvgConfig(**base, lr=0.05, seed=5, partition="shards")]
    histories = run_many(configs, small, progress=False)
    for config, history in zip(configs, histories):
        alone = run(FedAvgConfig(**vars(config) | dict(engine="sequential")), small, progress=False)
        assert_same_run(history, alone, steps_per_round=2, longest_sum=24 * 24 * 50)


def test_an_interrupted_sweep_resumes_where_each_run_stopped(small, tmp_path):
    configs = [FedAvgConfig(**BASE | dict(rounds=4), lr=0.1, seed=s) for s in (0, 1)]
    full = run_many(configs, small, progress=False)
    paths = [tmp_path / f"run{i}.ckpt" for i in range(2)]
    calls = []

    def stop(i, record):
        calls.append(i)
        if len(calls) == 3:                        # run 0 has 2 rounds, run 1 one
            raise KeyboardInterrupt
    with pytest.raises(RunInterrupted) as stopped:
        run_many(configs, small, progress=False, checkpoints=paths, checkpoint_every=1, on_round=stop)
    assert stopped.value.saved == paths and "run the same command again to resume" in str(stopped.value)
    resumed = run_many(configs, small, progress=False, checkpoints=paths)
    for a, b in zip(resumed, full):
        assert [r.clients for r in a.records] == [r.clients for r in b.records]
        assert_same_run(a, b, steps_per_round=10, longest_sum=784)


def test_runs_that_cannot_share_steps_are_refused(small):
    base = FedAvgConfig(**BASE)
    assert batch_key(base) == batch_key(FedAvgConfig(**BASE, lr=0.3, seed=9, partition="shards",
                                                     strategy="fedadam"))
    assert batch_key(base) != batch_key(FedAvgConfig(**BASE | dict(local_epochs=2)))
    assert batch_key(base) != batch_key(FedAvgConfig(**BASE | dict(model="cnn-small")))
    assert batch_key(base) != batch_key(FedAvgConfig(**BASE, strategy="fedprox", mu=0.1))
    assert refusal(base) is None and refusal(FedAvgConfig(**BASE, strategy="scaffold")) is None
    assert "entropy" in refusal(FedAvgConfig(**BASE, strategy="dp-fedavg"))            # refused by its type
    assert "sequential" in refusal(FedAvgConfig(**BASE, engine="sequential"))
    with pytest.raises(ValueError, match="cannot be trained together"):
        run_many([base, FedAvgConfig(**BASE | dict(batch_size=20))], small, progress=False)
    with pytest.raises(ValueError, match="cannot be trained together: strategy 'dp-fedavg'"):
        run_many([base, FedAvgConfig(**BASE, strategy="dp-fedavg")], small, progress=False)
