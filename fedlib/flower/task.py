"""What the Flower app's server and clients share: the run configuration and the data.

Flower passes configuration around as flat records of scalars (``UserConfig`` from
``pyproject.toml`` or ``flwr run --run-config``, ``ConfigRecord`` inside messages),
with dashed keys such as ``local-epochs``. :func:`to_record` and :func:`from_record`
translate between those records and fedlib's :class:`~fedlib.server.FedAvgConfig`,
so the Flower app is configured with exactly the knobs of the earlier lessons.

:func:`client_data` is a client's local dataset: its index array from fedlib's
partition, applied to the MNIST tensors read from ``FEDLIB_DATA`` (never
downloaded). It is cached, so a process that hosts many virtual clients (a Ray
actor in simulation) reads MNIST and computes the partition only once.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from functools import lru_cache
from typing import Mapping

import torch

from fedlib.config import FedAvgConfig
from fedlib.data import Dataset, load_dataset
from fedlib.params import InputError

# FedAvgConfig fields a Flower run uses; device and engine are fixed (CPU, one client
# at a time), targets and eval_every have no meaning for Flower's strategy loop.
RECORD_FIELDS = ("dataset", "model", "partition", "num_clients", "frac", "local_epochs", "batch_size",
                 "lr", "rounds", "seed", "momentum", "weight_decay", "shards_per_client", "shard_size",
                 "alpha", "min_size", "sigma")


def to_record(config: FedAvgConfig) -> dict[str, bool | int | float | str]:
    """A FedAvgConfig as a flat Flower record: dashed keys, no None values.

    B = infinity (``batch_size=None``) is written as the string ``"inf"``, as on
    fedlib's command line; ``shard_size=None`` (derived from the partition) is left out.
    """
    record: dict[str, bool | int | float | str] = {}
    for name in RECORD_FIELDS:
        value = getattr(config, name)
        if name == "batch_size" and value is None:
            value = "inf"
        if value is not None:
            record[name.replace("_", "-")] = value
    return record


def from_record(record: Mapping[str, object], base: FedAvgConfig | None = None) -> FedAvgConfig:
    """The FedAvgConfig a Flower record describes (unknown keys are ignored).

    Keys missing from ``record`` keep their value in ``base`` (default: fedlib's
    defaults). Each value is parsed as the command line parses it (``"inf"`` for
    B = infinity), so InputError names the key and its allowed range.
    """
    values = asdict(base or FedAvgConfig())
    knobs = {f.name: f.metadata for f in fields(FedAvgConfig)}
    for name in RECORD_FIELDS:
        key = name.replace("_", "-")
        if key not in record:
            continue
        value, allowed = record[key], knobs[name]["range"]
        if allowed is None:
            values[name] = str(value)
            continue
        try:
            values[name] = allowed.parse(str(value))
        except InputError as error:
            raise InputError(f"{key} {error}") from None
    values.update(device="cpu", engine="sequential")
    return FedAvgConfig(**values).validate()


@lru_cache(maxsize=1)
def _dataset(name: str) -> Dataset:
    return load_dataset(name, device="cpu", download=False)


@lru_cache(maxsize=4)
def _partition(config_key: tuple) -> list:
    config = FedAvgConfig(**dict(config_key))
    return config.split(_dataset(config.dataset).y_train)


def client_data(config: FedAvgConfig, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client k's local data (x_k of shape (n_k, 1, 28, 28), y_k of shape (n_k,)).

    The same partition, from the same seed, as ``fedlib.run`` makes for this configuration.
    """
    if not 0 <= partition_id < config.num_clients:
        raise InputError(f"partition_id must be in [0, {config.num_clients - 1}] (K = num_clients), "
                         f"got {partition_id}")
    data = _dataset(config.dataset)
    key = tuple((name, getattr(config, name)) for name in
                ("dataset", "partition", "num_clients", "seed", "shards_per_client", "shard_size",
                 "alpha", "min_size", "sigma"))
    idx = torch.as_tensor(_partition(key)[partition_id])
    return data.x_train[idx], data.y_train[idx]


def evaluation_data(config: FedAvgConfig) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, ...]]:
    """The test set the server evaluates on: x (10000, 1, 28, 28), y (10000,), classes, input shape."""
    data = _dataset(config.dataset)
    return data.x_test, data.y_test, data.num_classes, data.input_shape
