"""What the Flower app's server and clients share: the run configuration and the data.

Flower passes configuration around as flat records of scalars (``UserConfig`` from
``pyproject.toml`` or ``flwr run --run-config``, ``ConfigRecord`` inside messages),
with dashed keys such as ``local-epochs``. :func:`to_record` and :func:`from_record`
translate between those records and fedlib's :class:`~fedlib.config.FedAvgConfig`, every
field of it, so the Flower app is configured with exactly the knobs of the earlier lessons
and a configuration comes back from the trip unchanged (``tests/test_flower.py``).

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

RUN_KEYS = ("min-nodes", "history-path", "round-timeout", "connect-timeout", "server-round")   # the app's own


def record_key(name: str) -> str:
    """A FedAvgConfig field's key in a Flower record: dashes for underscores (``local-epochs``)."""
    return name.replace("_", "-")


def to_record(config: FedAvgConfig) -> dict[str, bool | int | float | str]:
    """Every field of a FedAvgConfig as a flat Flower record: dashed keys, scalars only.

    None, which a record cannot hold, is written as the word the command line uses for it
    (``batch-size = "inf"`` for B = infinity, ``mu = "default"`` for the method's default), so
    :func:`from_record` gives back the very same configuration, field by field.
    """
    record: dict[str, bool | int | float | str] = {}
    for f in fields(FedAvgConfig):
        value, allowed = getattr(config, f.name), f.metadata["range"]
        record[record_key(f.name)] = allowed.none_words[0] if value is None and allowed is not None else value
    return record


def from_record(record: Mapping[str, object], base: FedAvgConfig | None = None) -> FedAvgConfig:
    """The FedAvgConfig a Flower record describes, validated.

    Keys missing from ``record`` keep their value in ``base`` (default: fedlib's defaults); keys
    of the app itself (``min-nodes``, ``history-path``, ...) are skipped, and any other key is
    refused, so a misspelt knob is never silently dropped. Each value is parsed as the command
    line parses it, so InputError names the key and its allowed range.
    """
    values = asdict(base or FedAvgConfig())
    knobs = {record_key(f.name): f for f in fields(FedAvgConfig)}
    unknown = sorted(k for k in record if k not in knobs and k not in RUN_KEYS)
    if unknown:
        raise InputError(f"the run config has keys that are not fedlib parameters: {unknown}")
    for key, f in knobs.items():
        if key not in record:
            continue
        value, allowed = record[key], f.metadata["range"]
        if isinstance(f.default, bool):
            if not isinstance(value, bool):
                raise InputError(f"{key} must be true or false, got {value!r}")
            values[f.name] = value
        elif allowed is None:
            values[f.name] = str(value)
        else:
            try:
                values[f.name] = allowed.parse(str(value))
            except InputError as error:
                raise InputError(f"{key} {error}") from None
    return FedAvgConfig(**values).validate()


@lru_cache(maxsize=2)
def dataset(name: str, scaling: str = "standardize") -> Dataset:
    """The dataset ``name``, its images scaled as ``scaling`` says, on the CPU, read once per process
    (from FEDLIB_DATA; never downloaded)."""
    return load_dataset(name, device="cpu", download=False, scaling=scaling)


@lru_cache(maxsize=4)
def _partition(key: tuple) -> list:
    name, partition, num_clients, seed, partition_args = key
    config = FedAvgConfig(dataset=name, partition=partition, num_clients=num_clients, seed=seed,
                          **dict(partition_args))
    data = dataset(name)                      # the split reads labels only: any scaling gives the same
    return config.split(data.y_train, data.clients)


def client_data(config: FedAvgConfig, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client k's local data (x_k of shape (n_k, 1, 28, 28), y_k of shape (n_k,)).

    The same partition, from the same seed, as ``fedlib.run`` makes for this configuration.
    """
    if not 0 <= partition_id < config.num_clients:
        raise InputError(f"partition_id must be in [0, {config.num_clients - 1}] (K = num_clients), "
                         f"got {partition_id}")
    data = dataset(config.dataset, config.input_scaling)
    key = (config.dataset, config.partition, config.num_clients, config.seed, tuple(config.partition_args().items()))
    idx = torch.as_tensor(_partition(key)[partition_id])
    return data.x_train[idx], data.y_train[idx]


def evaluation_data(config: FedAvgConfig) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, ...]]:
    """The test set the server evaluates on: x (10000, 1, 28, 28), y (10000,), classes, input shape."""
    data = dataset(config.dataset, config.input_scaling)
    return data.x_test, data.y_test, data.num_classes, data.input_shape
