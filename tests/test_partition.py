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


# Exact splits, each against the construction its docstring (and the paper, for shards) describes, written
# out here with plain loops over the same seeded generator's draws, in the order the construction makes them.

def test_iid_is_the_seeded_permutation_cut_into_k_consecutive_parts():
    n, K, seed = 1003, 10, 5
    order = np.random.default_rng(seed).permutation(n)
    sizes = [n // K + (1 if k < n % K else 0) for k in range(K)]       # the first n mod K get one more
    starts = [sum(sizes[:k]) for k in range(K)]
    parts = P.iid(n, K, seed=seed)
    assert [p.tolist() for p in P.iid(n, K)] == \
        [np.random.default_rng(0).permutation(n)[start:start + size].tolist() for start, size in zip(starts, sizes)]
    assert [len(p) for p in parts] == [101, 101, 101] + [100] * 7
    for part, start, size in zip(parts, starts, sizes):
        assert part.dtype == np.int64 and part.tolist() == order[start:start + size].tolist()


def test_default_shard_size_is_n_over_k_s_rounded_down():
    assert P.default_shard_size(60000, 100, 2) == 300
    size = P.default_shard_size(1001, 10, 3)
    assert size == 33 and isinstance(size, int)


def shards_by_hand(y, K, s, size, seed):
    """The paper's construction: sort by label (ties in the order of a first random permutation), cut into
    K s shards of `size` consecutive examples, deal them by a second permutation, s per client."""
    rng = np.random.default_rng(seed)
    tie = rng.permutation(len(y))
    order = sorted(range(len(y)), key=lambda i: (y[i], tie[i]))
    shard = [order[j * size:(j + 1) * size] for j in range(K * s)]
    deal = rng.permutation(K * s).tolist()
    return [sorted(i for j in deal[k * s:(k + 1) * s] for i in shard[j]) for k in range(K)]


@pytest.mark.parametrize("K, s, size", [(5, 2, 10), (4, 3, None), (7, 1, 13)])
def test_shards_deal_the_papers_sorted_shards(K, s, size):
    y = np.random.default_rng(1).integers(0, 4, size=103)          # class sizes not multiples of the shard
    parts = P.shards(y, K, shards_per_client=s, shard_size=size, seed=7)
    expected = shards_by_hand(y.tolist(), K, s, size if size is not None else 103 // (K * s), 7)
    assert [p.tolist() for p in parts] == expected
    assert all(p.dtype == np.int64 for p in parts)
    if size is None:                                                # the default seed is 0
        assert [p.tolist() for p in P.shards(y, K, s)] == shards_by_hand(y.tolist(), K, s, 103 // (K * s), 0)


def dirichlet_by_hand(y, K, alpha, min_size, seed, max_tries=1000):
    """The PFNM split as fedlib documents it: per class in order, shares p ~ Dir(alpha), set to 0 for a client
    already holding n / K or more, then the class's shuffled examples cut at floor(cumsum(p / sum p) n_c);
    redrawn whole until every client holds min_size. Returns the parts, or the short counts of the failed draws."""
    rng = np.random.default_rng(seed)
    n, shorts = len(y), []
    for _ in range(max_tries):
        parts, sizes = [[] for _ in range(K)], [0] * K
        for c in sorted(set(y.tolist())):
            idx = rng.permutation([i for i in range(n) if y[i] == c])
            p = rng.dirichlet([alpha] * K)
            p = np.array([p[k] if sizes[k] < n / K else 0.0 for k in range(K)])
            if p.sum() == 0 or np.isnan(p).any():      # no share left (alpha 1e308 draws zeros): equal shares
                p = np.ones(K) / K
            share = np.cumsum(p / p.sum())
            cuts = [0] + [int(share[k] * len(idx)) for k in range(K - 1)] + [len(idx)]
            for k in range(K):
                parts[k] += idx[cuts[k]:cuts[k + 1]].tolist()
                sizes[k] += cuts[k + 1] - cuts[k]
        if min(sizes) >= min_size:
            return [sorted(part) for part in parts], shorts
        shorts.append(sum(size < min_size for size in sizes))
    return None, shorts


@pytest.mark.parametrize("K, alpha, min_size, seed", [
    (6, 0.5, 0, 0), (6, 0.5, 30, 1), (9, 0.2, 5, 3), (4, 50.0, 1, 1),
    (6, 0.5, 33, 0),                       # the first draw's smallest client holds exactly min_size = 33
    (9, 0.05, 0, 0),                       # two clients get nothing (min_size 0 allows it)
    (3, 1e308, 0, 0), (7, 1e308, 0, 2),    # Dirichlet draws of zeros: every class cut in K equal shares
])
def test_dirichlet_is_the_pfnm_split_it_documents(K, alpha, min_size, seed):
    y = np.random.default_rng(4).integers(0, 5, size=300)
    expected, shorts = dirichlet_by_hand(y, K, alpha, min_size, seed)
    parts = P.dirichlet(y, K, alpha=alpha, min_size=min_size, seed=seed)
    assert [p.tolist() for p in parts] == expected
    assert all(p.dtype == np.int64 for p in parts)
    if (K, seed) == (6, 1):
        assert len(shorts) == 6, "this case redraws six times (it tests the redraw)"
    if min_size == 33 or alpha == 0.05:
        assert not shorts and min(len(p) for p in parts) == min_size


def test_dirichlet_gives_up_early_by_the_average_number_of_short_clients():
    """The refusal comes at the first draw t >= 3 where (max_tries - t) exp(-s) < 1e-3, s the clients short of
    min_size per failed draw so far, and names s."""
    y = np.random.default_rng(4).integers(0, 5, size=300)
    _, shorts = dirichlet_by_hand(y, 30, 0.05, 9, 0, max_tries=40)
    t = next(t for t in range(3, 41) if (40 - t) * np.exp(-sum(shorts[:t]) / t) < 1e-3)
    assert t < 40, "the case must be refused early"
    with pytest.raises(InputError, match=f"{t} draws left on average {sum(shorts[:t]) / t:.1f} of the 30 clients"):
        P.dirichlet(y, 30, alpha=0.05, min_size=9, max_tries=40)
    # The defaults: min_size 10, max_tries 1000 (the message names both, the latter as the draws remaining).
    _, shorts = dirichlet_by_hand(y, 30, 0.05, 10, 0, max_tries=10)
    t = next(t for t in range(3, 11) if (1000 - t) * np.exp(-sum(shorts[:t]) / t) < 1e-3)
    with pytest.raises(InputError, match=f"min_size=10 at alpha=0.05: {t} draws .* the remaining {1000 - t} draws"):
        P.dirichlet(y, 30, alpha=0.05)


def test_dirichlet_draws_max_tries_times_and_no_more():
    """The case (6, 0.5, 30, seed 1) first succeeds on its 7th draw (see the test above)."""
    y = np.random.default_rng(4).integers(0, 5, size=300)
    expected, shorts = dirichlet_by_hand(y, 6, 0.5, 30, 1)
    assert len(shorts) == 6
    assert [p.tolist() for p in P.dirichlet(y, 6, alpha=0.5, min_size=30, seed=1, max_tries=7)] == expected
    with pytest.raises(InputError, match=f"6 draws left on average {sum(shorts) / 6:.1f} .* the remaining 0 draws"):
        P.dirichlet(y, 6, alpha=0.5, min_size=30, seed=1, max_tries=6)
    with pytest.raises(InputError, match="no split with min_size=30 found in 2 draws"):   # too few to refuse early
        P.dirichlet(y, 6, alpha=0.5, min_size=30, seed=1, max_tries=2)


@pytest.mark.parametrize("n, K, sigma, min_size, seed", [(1000, 7, 1.0, 10, 0), (500, 13, 0.3, 2, 3)])
def test_unbalanced_sizes_are_min_size_plus_lognormal_shares_of_the_rest(n, K, sigma, min_size, seed):
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, sigma, size=K).tolist()
    spare = n - min_size * K
    sizes = [min_size + int(w_k / sum(w) * spare) for w_k in w]
    for k in sorted(range(K), key=lambda k: -w[k])[:n - sum(sizes)]:   # the remainder, largest weights first
        sizes[k] += 1
    order = rng.permutation(n).tolist()
    expected = [sorted(order[sum(sizes[:k]):sum(sizes[:k + 1])]) for k in range(K)]
    parts = P.unbalanced(n, K, sigma=sigma, min_size=min_size, seed=seed)
    assert [p.tolist() for p in parts] == expected
    assert all(p.dtype == np.int64 for p in parts)
    if (sigma, min_size, seed) == (1.0, 10, 0):                   # the defaults
        assert [p.tolist() for p in P.unbalanced(n, K)] == expected


def test_check_split_refuses_an_example_on_two_clients():
    P.check_split([np.array([0, 2]), np.array([1, 3])], 4)
    with pytest.raises(InputError, match="^the split deals example 2 twice"):
        P.check_split([np.array([0, 2]), np.array([1]), np.array([2, 3])], 4)


def test_natural_returns_the_datasets_clients_as_int64_index_arrays():
    parts = P.make_partition("natural", np.zeros((6, 3)), 2, clients=[np.array([0, 4], dtype=np.int32), [1, 2, 5]])
    assert [p.tolist() for p in parts] == [[0, 4], [1, 2, 5]]
    assert all(p.dtype == np.int64 for p in parts)


def test_class_counts_reads_the_number_of_classes_off_the_labels():
    import torch
    y = torch.tensor([0, 3, 3, 1])                       # client 0 holds no example of the largest class, 3
    assert P.class_counts([np.array([0, 3]), np.array([1, 2])], y).tolist() == [[1, 1, 0, 0], [0, 0, 0, 2]]


@pytest.mark.parametrize("name, kwargs, direct", [
    ("iid", {}, lambda y: P.iid(len(y), 5, seed=3)),
    ("shards", {"shards_per_client": 3, "shard_size": 7}, lambda y: P.shards(y, 5, 3, 7, seed=3)),
    ("dirichlet", {"alpha": 2.0, "min_size": 4}, lambda y: P.dirichlet(y, 5, 2.0, 4, seed=3)),
    ("unbalanced", {"sigma": 0.7, "min_size": 3}, lambda y: P.unbalanced(len(y), 5, 0.7, 3, seed=3)),
])
def test_make_partition_passes_every_knob_on(name, kwargs, direct):
    y = np.random.default_rng(0).integers(0, 3, size=120)
    named = P.make_partition(name, y, 5, seed=3, **kwargs)
    assert [p.tolist() for p in named] == [p.tolist() for p in direct(y)]
    default = P.make_partition(name, y, 5, seed=3)
    assert ([p.tolist() for p in default] == [p.tolist() for p in named]) == (name == "iid")


@pytest.mark.parametrize("name, direct", [
    ("iid", lambda y: P.iid(len(y), 5, 0)),
    ("shards", lambda y: P.shards(y, 5, 2, None, 0)),
    ("dirichlet", lambda y: P.dirichlet(y, 5, 0.5, 10, 0)),
    ("unbalanced", lambda y: P.unbalanced(len(y), 5, 1.0, 10, 0)),
])
def test_make_partition_defaults_are_seed_0_alpha_0_5_min_size_10_sigma_1(name, direct):
    y = np.random.default_rng(0).integers(0, 3, size=120)
    assert [p.tolist() for p in P.make_partition(name, y, 5)] == [p.tolist() for p in direct(y)]


@pytest.mark.parametrize("num_clients, sigma, seed", [
    (100, 800.0, 0),     # exp(sigma z) itself is inf for the largest z (no floating-point warning: C's exp)
    (2, 477.35, 4512),   # both sizes finite (1.65e308 and 1.43e308), but their sum overflows float64
])
def test_lognormal_sizes_that_overflow_are_refused_without_a_numpy_warning(num_clients, sigma, seed):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # an overflow warning would fail here
        with pytest.raises(InputError, match="too large"):
            P.unbalanced(60000, num_clients, sigma=sigma, min_size=0, seed=seed)
