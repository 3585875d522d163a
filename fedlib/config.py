"""The configuration of a FedAvg run: every knob, its default, its range and its help.

:class:`FedAvgConfig` is the one place that says what a run's parameters are. Each field
carries its help text, its command-line flag and its :class:`~fedlib.params.Range` (or
its choices) as metadata; :meth:`FedAvgConfig.validate` checks them and the command line
(``python -m fedlib train``) is built from them, so the library, the command line and
Flower's run config all accept exactly the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from fedlib import params as P
from fedlib.data import DATASETS, SCALINGS
from fedlib.models import INITS, MODELS
from fedlib.params import InputError
from fedlib.partition import PARTITIONS, Partition, make_partition
from fedlib.runtime import DEVICES

ENGINES = ("auto", "vectorized", "sequential")
SERVER_OPTIMIZERS = ("sgd", "adam")


def knob(default: Any, help: str, range: P.Range | None = None, choices: tuple | None = None,
         flag: str | None = None) -> Any:
    """A config field with its help text, its Range or choices, and its command-line flag
    (default: ``--`` and the field name with dashes)."""
    return field(default=default, metadata={"help": help, "range": range, "choices": choices, "flag": flag})


@dataclass
class FedAvgConfig:
    """Every knob of a FedAvg run, with the paper's names and MNIST defaults.

    num_clients: K; frac: C (0 means one client per round); local_epochs: E;
    batch_size: B (None = infinity); lr: eta. The partition's own parameters
    (shards_per_client, shard_size, alpha, min_size, sigma) are read only by the
    partition that uses them. One ``seed`` drives partitioning, client sampling,
    shuffling, dropout and initialisation (``fedlib.seeds``).
    """

    dataset: str = knob("mnist", "the dataset", choices=DATASETS)
    model: str = knob("2nn", "the model (see fedlib.models)", choices=tuple(MODELS))
    partition: str = knob("iid", "how the training set is split among the clients", choices=PARTITIONS)
    num_clients: int = knob(100, "K, the number of clients", P.NUM_CLIENTS, flag="--clients")
    frac: float = knob(0.1, "C, the fraction of clients in each round; 0 means one client", P.FRAC)
    local_epochs: int = knob(1, "E, the local epochs per round", P.LOCAL_EPOCHS, flag="--epochs")
    batch_size: int | None = knob(10, "B, the local minibatch size", P.BATCH_SIZE)
    lr: float = knob(0.1, "eta, the clients' learning rate", P.LR)
    rounds: int = knob(10, "the number of communication rounds", P.ROUNDS)
    seed: int = knob(0, "the one seed of the run", P.SEED)
    eval_every: int = knob(1, "evaluate the global model every this many rounds (and in the last)", P.EVAL_EVERY)
    device: str = knob("auto", "where to train: auto is cuda if there is one", choices=DEVICES)
    engine: str = knob("auto", "vectorized trains a round's clients together, sequential one after another "
                               "(same weights); auto picks the faster (sequential for the paper's CNN on a CPU)",
                       choices=ENGINES)
    momentum: float = knob(0.0, "the clients' SGD momentum (the paper uses none)", P.MOMENTUM)
    weight_decay: float = knob(0.0, "the clients' L2 weight decay (the paper uses none)", P.WEIGHT_DECAY)
    input_scaling: str = knob("standardize", "how pixels become inputs: standardize (mean 0, std 1), "
                                             "unit ([0, 1]) or raw (0-255); see fedlib.data", choices=SCALINGS)
    init: str = knob("pytorch", "how w_0 is drawn: PyTorch's default, or a TensorFlow-style "
                                "truncated-normal or glorot-uniform; see fedlib.models", choices=INITS)
    shards_per_client: int = knob(2, "shards per client (partition shards)", P.SHARDS_PER_CLIENT)
    shard_size: int | None = knob(None, "examples per shard (partition shards); default: n / (K * shards)",
                                  P.SHARD_SIZE)
    alpha: float = knob(0.5, "the Dirichlet concentration (partition dirichlet)", P.ALPHA)
    min_size: int = knob(10, "the smallest client (partitions dirichlet and unbalanced)", P.MIN_SIZE)
    sigma: float = knob(1.0, "the lognormal spread of client sizes (partition unbalanced)", P.SIGMA)
    target: float | None = knob(None, "the test accuracy whose rounds-to-reach are reported", P.TARGET)
    stop_at_target: bool = knob(False, "stop once the target accuracy is reached (needs --target)")
    # Beyond FedAvg (fedlib.algorithms, fedlib.privacy). The defaults are FedAvg itself.
    mu: float = knob(0.0, "mu, FedProx's proximal weight (Li et al. 2020); 0 is FedAvg", P.MU)
    scaffold: bool = knob(False, "SCAFFOLD's control variates, option II (Karimireddy et al. 2020)")
    server_opt: str = knob("sgd", "the server's optimizer on the averaged update: sgd (FedAvg, FedAvgM) "
                                  "or adam (FedAdam)", choices=SERVER_OPTIMIZERS)
    server_lr: float = knob(1.0, "eta_g, the server's learning rate; sgd with 1.0 and no momentum is FedAvg",
                            P.SERVER_LR)
    server_momentum: float = knob(0.0, "beta of FedAvgM (sgd), or beta_1 of FedAdam (adam)", P.SERVER_MOMENTUM)
    server_beta2: float = knob(0.99, "beta_2 of FedAdam", P.SERVER_BETA2)
    server_tau: float = knob(1e-3, "tau, FedAdam's epsilon (its smallest denominator)", P.SERVER_TAU)
    dp_clip: float | None = knob(None, "S, DP-FedAvg's clipping norm of each client's update (McMahan et al. "
                                       "2018)", P.DP_CLIP)
    dp_noise: float = knob(0.0, "z, DP-FedAvg's noise multiplier: Gaussian noise of std z S on the sum",
                           P.DP_NOISE)

    def validate(self) -> "FedAvgConfig":
        """Raise InputError (a ValueError) naming the first parameter outside its allowed range."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] is not None and value not in meta["choices"]:
                raise InputError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
            if meta["range"] is not None:
                meta["range"].check(f.name, value)
        for flag in ("stop_at_target", "scaffold"):
            if not isinstance(getattr(self, flag), bool):
                raise InputError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.stop_at_target and self.target is None:
            raise InputError("stop_at_target needs a target accuracy (target, --target), got none")
        if self.dp_noise and self.dp_clip is None:
            raise InputError(f"dp_noise needs a clipping norm dp_clip (S), got none (dp_noise = {self.dp_noise})")
        if self.dp_clip is not None and self.frac == 0:
            raise InputError("dp_clip needs frac (C) > 0: DP-FedAvg samples each client with probability C")
        if self.dp_clip is not None and self.scaffold:
            raise InputError("dp_clip and scaffold cannot be combined: the control variates are not privatised")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "FedAvgConfig":
        """The config saved in a History or checkpoint (unknown keys, e.g. engine_used, ignored)."""
        if not isinstance(data, dict):
            raise InputError(f"a run's config must be a mapping of its parameters, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def split(self, labels) -> Partition:
        """The K clients' index arrays into the training set (``labels``: its (N,) labels),
        as this configuration's partition and seed make them."""
        labels = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
        return make_partition(self.partition, labels, self.num_clients, self.seed,
                              shards_per_client=self.shards_per_client, shard_size=self.shard_size,
                              alpha=self.alpha, min_size=self.min_size, sigma=self.sigma)
