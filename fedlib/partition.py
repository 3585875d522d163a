"""Splitting one dataset among K clients.

Every function returns a partition: a list of K int64 index arrays, one per
client, into the training set. The same ``seed`` always gives the same split.

- :func:`iid`: shuffle, then equal parts (the paper: K=100 clients x 600 images).
- :func:`shards`: the paper's pathological non-IID split (sort by label,
  200 shards of 300, two shards per client: most clients see only two digits).
- :func:`dirichlet`: per class, the class's shares over the K clients drawn from
  Dir(alpha, ..., alpha) (the split of PFNM, Yurochkin et al. 2019, reused by FedMA,
  Wang et al. 2020, and NIID-Bench, Li et al. 2022; not Hsu et al. 2019's per-client
  draw); small alpha is very skewed, large alpha near IID; client sizes come out unequal.
- :func:`unbalanced`: IID labels but client sizes n_k drawn from a lognormal.
- ``natural`` (:func:`make_partition` only): the dataset's own clients, for a dataset that
  has them (``Dataset.clients``: Shakespeare's speaking roles). The paper's IID version of
  that task is :func:`iid` over its sequences with as many clients.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlib import params as P
from fedlib.params import InputError

Partition = list[np.ndarray]


def _as_numpy(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    return np.asarray(labels)


def _check_clients(num_clients: int, n: int) -> None:
    P.NUM_CLIENTS.check("num_clients", num_clients)
    if num_clients > n:  # pragma: no mutate block
        raise InputError(f"num_clients (K) must be <= the number of examples ({n}), got {num_clients}")


def iid(n: int, num_clients: int, seed: int = 0) -> Partition:
    """Shuffle ``n`` example indices and cut them into ``num_clients`` (K) equal parts.

    When K does not divide n, the first n mod K clients get one example more.
    """
    P.Range(int, 1).check("n", n)
    _check_clients(num_clients, n)
    order = np.random.default_rng(seed).permutation(n)
    return [part.astype(np.int64) for part in np.array_split(order, num_clients)]


def default_shard_size(n: int, num_clients: int, shards_per_client: int) -> int:
    """n / (K * shards_per_client), rounded down: the paper's 300 for MNIST's 60,000 examples, K = 100 and
    2 shards each, so that the K clients' shards cover the whole training set."""
    P.NUM_CLIENTS.check("num_clients", num_clients)
    P.SHARDS_PER_CLIENT.check("shards_per_client", shards_per_client)
    if num_clients * shards_per_client > n:  # pragma: no mutate block
        raise InputError(f"num_clients * shards_per_client must be <= the number of examples ({n}), "
                         f"got {num_clients} * {shards_per_client}")
    return n // (num_clients * shards_per_client)


def shards(labels, num_clients: int, shards_per_client: int = 2, shard_size: int | None = None,
           seed: int = 0) -> Partition:
    """The paper's pathological non-IID split.

    Sort the examples by label, cut them into ``num_clients * shards_per_client``
    shards of ``shard_size`` consecutive examples (None: :func:`default_shard_size`), and deal
    each client ``shards_per_client`` shards at random. With the defaults on MNIST
    (100 x 2 shards of 300) most clients hold examples of only two digits.
    """
    y = _as_numpy(labels)
    _check_clients(num_clients, len(y))
    P.SHARDS_PER_CLIENT.check("shards_per_client", shards_per_client)
    if shard_size is None:
        shard_size = default_shard_size(len(y), num_clients, shards_per_client)
    P.SHARD_SIZE.check("shard_size", shard_size)
    num_shards = num_clients * shards_per_client
    if num_shards * shard_size > len(y):  # pragma: no mutate block
        raise InputError(
            f"num_clients * shards_per_client * shard_size must be <= the number of examples "
            f"({len(y)}), got {num_clients} * {shards_per_client} * {shard_size} = {num_shards * shard_size}")
    rng = np.random.default_rng(seed)
    # Ties are broken at random so that, within a digit, which images land in which shard is random.
    by_label = np.lexsort((rng.permutation(len(y)), y))[: num_shards * shard_size]
    shard_ids = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    pieces = by_label.reshape(num_shards, shard_size)
    return [np.sort(pieces[ids].ravel()).astype(np.int64) for ids in shard_ids]


def dirichlet(labels, num_clients: int, alpha: float, min_size: int = 10, seed: int = 0,
              max_tries: int = 1000) -> Partition:
    """Label-skewed split, per class: for each class c, its examples go to the K clients in
    proportions p_c ~ Dir(alpha, ..., alpha).

    This is the split of the PFNM code (Yurochkin et al. 2019,
    github.com/IBM/probabilistic-federated-neural-matching), reused by FedMA (Wang et al.
    2020) and NIID-Bench (Li et al. 2022, partition 'noniid-labeldir'). It is not the
    Dirichlet split of Hsu et al. (2019), which draws each client's class proportions
    q ~ Dir(alpha * p) over the classes.

    Classes are dealt in order, and a client already holding its fair share n/K gets no
    share of the classes dealt after (the balancing step of that code), so the last classes
    can miss some clients even at large alpha. The whole draw is repeated until every client
    holds at least ``min_size`` examples; after ``max_tries`` failed draws an InputError
    (a ValueError) is raised. So alpha -> 0 does not give each client a single class: each
    class goes almost whole to one client, most clients stay (nearly) empty, and the split
    is refused. Client sizes n_k are unequal, more so for small alpha.

    A split that cannot succeed is refused early, within seconds even for K = 30,000: if the
    failed draws so far left on average s clients short of ``min_size``, a draw leaves none
    short with probability about exp(-s) (the short clients are many nearly independent rare
    events: a Poisson count), so once the draws still allowed are expected to find a split
    less than once in a thousand times, trying them is pointless. Any split this returns is
    the one the full ``max_tries`` loop would return.
    """
    y = _as_numpy(labels)
    n = len(y)
    _check_clients(num_clients, n)
    P.ALPHA.check("alpha", alpha)
    P.MIN_SIZE.check("min_size", min_size)
    if min_size * num_clients > n:  # pragma: no mutate block
        raise InputError(f"min_size * num_clients must be <= the number of examples ({n}), "
                         f"got {min_size} * {num_clients}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    short = 0                                   # clients short of min_size, summed over the failed draws
    for tries in range(1, max_tries + 1):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < n / num_clients)
            if not (np.isfinite(p).all() and p.sum() > 0):   # every client full (or alpha beyond float64)
                p = np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(int)[:-1]
            for k, piece in enumerate(np.split(idx, cuts)):
                if len(piece):
                    pieces[k].append(piece)
            sizes += np.diff(np.concatenate(([0], cuts, [len(idx)])))
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(part)).astype(np.int64) if part else np.zeros(0, dtype=np.int64)
                    for part in pieces]
        short += int((sizes < min_size).sum())
        if tries >= 3 and (max_tries - tries) * math.exp(-short / tries) < 1e-3:  # pragma: no mutate block
            raise InputError(f"no split with min_size={min_size} at alpha={alpha}: {tries} draws left on average "
                             f"{short / tries:.1f} of the {num_clients} clients short of it, so the remaining "
                             f"{max_tries - tries} draws would almost surely fail too; lower min_size or raise alpha")
    raise InputError(f"no split with min_size={min_size} found in {max_tries} draws at alpha={alpha}; "
                     "lower min_size or raise alpha")


def unbalanced(n: int, num_clients: int, sigma: float = 1.0, min_size: int = 10,
               seed: int = 0) -> Partition:
    """IID labels with unequal client sizes: n_k proportional to a lognormal(0, sigma) draw.

    sigma=0 gives equal sizes; sigma=1 gives a spread of roughly 10x between the
    5th and 95th percentile client. Every client gets at least ``min_size`` examples
    and all n examples are used.
    """
    P.Range(int, 1).check("n", n)
    _check_clients(num_clients, n)
    P.SIGMA.check("sigma", sigma)
    P.MIN_SIZE.check("min_size", min_size)
    if min_size * num_clients > n:  # pragma: no mutate block
        raise InputError(f"min_size * num_clients must be <= n ({n}), got {min_size} * {num_clients}")
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore", under="ignore"):
        weights = rng.lognormal(0.0, sigma, size=num_clients)
        total = weights.sum()
    if not (np.isfinite(total) and total > 0 and (weights > 0).all()):  # pragma: no mutate block
        raise InputError(f"sigma = {sigma:g} is too large: the lognormal client sizes exp(sigma z) overflow or "
                         f"underflow float64 (exp(709) is its largest), so n_k cannot be drawn; a sigma of a few "
                         f"units already gives sizes 1000s of times apart")
    spare = n - min_size * num_clients
    sizes = min_size + np.floor(weights / weights.sum() * spare).astype(int)
    sizes[np.argsort(-weights)[: n - sizes.sum()]] += 1     # hand out the rounding remainder
    order = rng.permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]


def check_split(parts: Partition, n: int, what: str = "the split") -> None:
    """Raise InputError unless ``parts`` is a split the training can use: every client holds at
    least one example (ClientUpdate needs n_k >= 1), every index is one of the n examples, and no
    example is dealt to two clients."""
    seen = np.zeros(n, dtype=bool)
    for k, part in enumerate(parts):
        part = np.asarray(part)
        if len(part) == 0:  # pragma: no mutate block
            raise InputError(f"{what} leaves client {k} without examples (n_k = 0), and ClientUpdate needs n_k >= 1: "
                             "raise min_size (>= 1) or lower sigma or num_clients (K)")
        if part.ndim != 1 or not np.issubdtype(part.dtype, np.integer) or part.min() < 0 or part.max() >= n:  # pragma: no mutate block
            raise InputError(f"{what} gives client {k} indices outside the {n} training examples")
        if seen[part].any() or len(np.unique(part)) != len(part):  # pragma: no mutate block
            raise InputError(f"{what} deals example {int(part[seen[part]][0]) if seen[part].any() else int(part[0])} "
                             f"twice (client {k} and another)")
        seen[part] = True


def natural(clients: Partition | None, num_clients: int, n: int) -> Partition:
    """The dataset's own clients as a partition, checked: K of them, indices into the n examples."""
    if clients is None:  # pragma: no mutate block
        raise InputError("partition 'natural' needs a dataset with its own clients (Dataset.clients, e.g. "
                         "shakespeare); this one has none: use 'iid', 'shards', 'dirichlet' or 'unbalanced'")
    if num_clients != len(clients):  # pragma: no mutate block
        raise InputError(f"num_clients (K) must be the dataset's number of clients ({len(clients)}) for "
                         f"partition 'natural', got {num_clients}")
    parts = [np.asarray(part, dtype=np.int64) for part in clients]
    if any(len(p) and (p.min() < 0 or p.max() >= n) for p in parts):  # pragma: no mutate block
        raise InputError(f"the dataset's clients must index its {n} training examples")
    return parts


def class_counts(partition: Partition, labels, num_classes: int | None = None) -> np.ndarray:
    """A (K, num_classes) matrix: how many examples of each class each client holds."""
    y = _as_numpy(labels)
    if num_classes is None:
        num_classes = int(y.max()) + 1
    return np.stack([np.bincount(y[idx], minlength=num_classes) for idx in partition])


PARTITIONS = ("iid", "shards", "dirichlet", "unbalanced", "natural")


def make_partition(name: str, labels, num_clients: int, seed: int = 0, *, shards_per_client: int = 2,
                   shard_size: int | None = None, alpha: float = 0.5, min_size: int = 10,
                   sigma: float = 1.0, clients: Partition | None = None) -> Partition:
    """Build a partition by name (the lookup the command line and ``run`` use).

    For ``shards``, ``shard_size=None`` means :func:`default_shard_size`, as in :func:`shards`.
    ``natural`` returns ``clients``, the dataset's own partition (``Dataset.clients``);
    num_clients must be their number. ``shards`` and ``dirichlet`` split by a label per
    example, so they refuse labels with more than one per example (Shakespeare's
    sequences have a target character at every position).
    """
    y = _as_numpy(labels)
    if name == "natural":
        return natural(clients, num_clients, len(y))
    if name in ("shards", "dirichlet") and y.ndim > 1:  # pragma: no mutate block
        raise InputError(f"partition {name!r} splits by each example's label, and these examples have "
                         f"{y.shape[1:]} labels each: use 'iid', 'unbalanced' or 'natural'")
    if name == "iid":
        return iid(len(y), num_clients, seed)
    if name == "shards":
        return shards(y, num_clients, shards_per_client, shard_size, seed)
    if name == "dirichlet":
        return dirichlet(y, num_clients, alpha, min_size, seed)
    if name == "unbalanced":
        return unbalanced(len(y), num_clients, sigma, min_size, seed)
    raise InputError(f"partition must be one of {PARTITIONS}, got {name!r}")
