"""Partitions: disjoint, complete where they should be, the right sizes and labels."""

import numpy as np
import pytest

from fedlib import partition as P
from fedlib.params import InputError


@pytest.fixture(scope="module")
def labels():
    """60,000 labels with MNIST-like class sizes (6,000 each), in random order."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10), 6000))


def assert_disjoint(parts, n):
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "a example is on two clients"
    assert allidx.min() >= 0 and allidx.max() < n


def test_iid_equal_sizes_cover_everything(labels):
    parts = P.iid(60000, 100, seed=1)
    assert len(parts) == 100 and all(len(p) == 600 for p in parts)
    assert_disjoint(parts, 60000)
    assert sorted(np.concatenate(parts).tolist()) == list(range(60000))
    # IID: every client sees (nearly) all ten digits.
    counts = P.class_counts(parts, labels, 10)
    assert (counts > 0).sum(1).min() >= 9
    assert counts.sum() == 60000


def test_iid_uneven_split_differs_by_at_most_one():
    sizes = [len(p) for p in P.iid(1003, 10)]
    assert max(sizes) - min(sizes) == 1 and sum(sizes) == 1003


def test_shards_are_the_papers_split(labels):
    parts = P.shards(labels, 100, shards_per_client=2, shard_size=300, seed=0)
    assert all(len(p) == 600 for p in parts)
    assert_disjoint(parts, 60000)
    assert len(np.concatenate(parts)) == 60000
    counts = P.class_counts(parts, labels, 10)
    labels_per_client = (counts > 0).sum(1)
    # Two shards of sorted data: at most 2 digits per client (a shard can straddle
    # two digits only when 300 does not divide the class size; here it does).
    assert labels_per_client.max() <= 2
    assert (labels_per_client == 1).sum() < 20     # most clients hold two different digits


def test_shards_deterministic_and_seed_dependent(labels):
    a = P.shards(labels, 100, seed=3)
    b = P.shards(labels, 100, seed=3)
    c = P.shards(labels, 100, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.1])
def test_dirichlet_partition_properties(labels, alpha):
    parts = P.dirichlet(labels, 20, alpha=alpha, min_size=10, seed=0)
    assert_disjoint(parts, 60000)
    assert len(np.concatenate(parts)) == 60000
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_small_alpha_is_more_skewed(labels):
    def mean_entropy(alpha):
        counts = P.class_counts(P.dirichlet(labels, 20, alpha=alpha, seed=0), labels, 10).astype(float)
        q = counts / counts.sum(1, keepdims=True)
        return float(np.mean(-(q * np.log(np.where(q > 0, q, 1))).sum(1)))
    assert mean_entropy(0.1) < mean_entropy(1.0) < mean_entropy(100.0)
    assert mean_entropy(100.0) > 0.95 * np.log(10)   # near uniform over 10 classes


def test_unbalanced_sizes_vary_and_cover_everything():
    parts = P.unbalanced(60000, 100, sigma=1.0, min_size=10, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 60000 and sizes.min() >= 10
    assert sizes.max() > 5 * np.median(sizes) / 2     # a real spread, not equal sizes
    assert_disjoint(parts, 60000)
    equal = P.unbalanced(60000, 100, sigma=0.0, min_size=0)
    assert {len(p) for p in equal} == {600}


def test_class_counts_by_hand():
    y = np.array([0, 1, 1, 2, 2, 2])
    counts = P.class_counts([np.array([0, 1]), np.array([2, 3, 4, 5])], y, 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 3]]


@pytest.mark.parametrize("call, message", [
    (lambda y: P.iid(100, 0), r"num_clients \(K\) must be an integer >= 1, got 0"),
    (lambda y: P.iid(10, 11), r"num_clients \(K\) must be <= the number of examples \(10\)"),
    (lambda y: P.iid(-5, 2), "n must be an integer >= 1"),
    (lambda y: P.shards(y, 100, shards_per_client=3, shard_size=300),
     "num_clients \\* shards_per_client \\* shard_size must be <="),
    (lambda y: P.shards(y, 100, shard_size=-1), "shard_size must be an integer >= 1"),
    (lambda y: P.shards(y, 100, shards_per_client=0), "shards_per_client must be an integer >= 1"),
    (lambda y: P.make_partition("shards", y, 40000, shards_per_client=2),   # the default shard_size is not blamed
     r"num_clients \* shards_per_client must be <= the number of examples \(60000\), got 40000 \* 2"),
    (lambda y: P.dirichlet(y, 10, alpha=0), "alpha must be a finite number > 0"),
    (lambda y: P.dirichlet(y, 10, alpha=-1.0), "alpha must be a finite number > 0"),
    (lambda y: P.dirichlet(y, 10, alpha=float("inf")), "alpha must be a finite number > 0, got inf"),
    (lambda y: P.dirichlet(y, 10, alpha=float("nan")), "alpha must be a finite number > 0, got nan"),
    (lambda y: P.dirichlet(y, 10, alpha=1.0, min_size=-1), "min_size must be an integer >= 0"),
    (lambda y: P.dirichlet(y, 100, alpha=1.0, min_size=1000), "min_size \\* num_clients"),
    (lambda y: P.unbalanced(1000, 10, sigma=-1), "sigma must be a finite number >= 0"),
    (lambda y: P.unbalanced(1000, 10, sigma=float("nan")), "sigma must be a finite number >= 0, got nan"),
    (lambda y: P.unbalanced(1000, 10, sigma=float("inf")), "sigma must be a finite number >= 0, got inf"),
    (lambda y: P.unbalanced(1000, 10, min_size=-3), "min_size must be an integer >= 0"),
    (lambda y: P.make_partition("pathological", y, 10), "partition must be one of"),
])
def test_impossible_requests_raise_input_error(labels, call, message):
    with pytest.raises(InputError, match=message):
        call(labels)


def test_make_partition_shards_defaults_to_papers_shard_size(labels):
    parts = P.make_partition("shards", labels, 100, seed=0)
    assert {len(p) for p in parts} == {600}


def test_shards_has_one_shard_size_rule_whichever_way_it_is_called():
    """shards() and make_partition("shards") use the same default shard size, n / (K s): with
    K = 50 on 60,000 examples each client holds 2 shards of 600 (this used to be 300 one way)."""
    labels = np.repeat(np.arange(10), 6000)
    direct = P.shards(labels, 50, seed=3)
    named = P.make_partition("shards", labels, 50, seed=3)
    assert [len(p) for p in direct] == [len(p) for p in named] == [1200] * 50
    assert all(np.array_equal(a, b) for a, b in zip(direct, named))
    assert P.default_shard_size(60000, 100, 2) == 300
