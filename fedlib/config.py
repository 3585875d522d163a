"""The configuration of a FedAvg run: every knob, its default, its range and its help.

:class:`FedAvgConfig` is the one place that says what a run's parameters are. Each field
carries its help text, its command-line flag, its :class:`~fedlib.params.Range` (or its
choices) and the group it belongs to as metadata; :meth:`FedAvgConfig.validate` checks them,
the command line (``python -m fedlib train``) is built from them and Flower's records carry
them, so the library, the command line and Flower accept exactly the same values.

The method (FedAvg, FedProx, SCAFFOLD, ...) is named by ``strategy`` (``fedlib.strategies``);
its parameters are the fields its class lists in ``knobs``. A method knob left at None takes
the method's own default (the default of its class), and a knob set for another method than
the one named is refused, so nothing is silently ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from fedlib import params as P
from fedlib.data import DATASETS, SCALINGS
from fedlib.models import INITS, MODELS
from fedlib.params import InputError
from fedlib.partition import PARTITIONS, Partition, make_partition
from fedlib.runtime import DEVICES
from fedlib.strategies import STRATEGIES, knob_owners

ENGINES = ("auto", "vectorized", "sequential")
METHOD_DEFAULT = "the method's default (see fedlib.strategies)"


def knob(default: Any, help: str, range: P.Range | None = None, choices: tuple | None = None,
         flag: str | None = None, group: str = "run") -> Any:
    """A config field with its help text, its Range or choices, its command-line flag
    (default: ``--`` and the field name with dashes) and its group (``run``, ``partition``
    for the split's parameters, ``method`` for a strategy's)."""
    return field(default=default, metadata={"help": help, "range": range, "choices": choices, "flag": flag,
                                            "group": group})


def method_range(allowed: P.Range) -> P.Range:
    """A method knob's range, with None for the method's own default."""
    return replace(allowed, none=METHOD_DEFAULT, none_words=("default",))


@dataclass
class FedAvgConfig:
    """Every knob of a FedAvg run, with the paper's names and MNIST defaults.

    num_clients: K; frac: C (0 means one client per round); local_epochs: E;
    batch_size: B (None = infinity); lr: eta. The partition's own parameters
    (shards_per_client, shard_size, alpha, min_size, sigma) are read only by the
    partition that uses them. ``strategy`` names the method, and its knobs (mu, server_lr,
    ...) are read only by it. One ``seed`` drives partitioning, client sampling,
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
                                             "unit ([0, 1]) or raw (0-255); see fedlib.data (images only)",
                              choices=SCALINGS)
    init: str = knob("pytorch", "how w_0 is drawn: PyTorch's default, or a TensorFlow-style "
                                "truncated-normal or glorot-uniform; see fedlib.models", choices=INITS)
    shards_per_client: int = knob(2, "shards per client (partition shards)", P.SHARDS_PER_CLIENT, group="partition")
    shard_size: int | None = knob(None, "examples per shard (partition shards); default: n / (K * shards)",
                                  P.SHARD_SIZE, group="partition")
    alpha: float = knob(0.5, "the Dirichlet concentration (partition dirichlet)", P.ALPHA, group="partition")
    min_size: int = knob(10, "the smallest client (partitions dirichlet and unbalanced)", P.MIN_SIZE,
                         group="partition")
    sigma: float = knob(1.0, "the lognormal spread of client sizes (partition unbalanced)", P.SIGMA,
                        group="partition")
    target: float | None = knob(None, "the test accuracy whose rounds-to-reach are reported", P.TARGET)
    stop_at_target: bool = knob(False, "stop once the target accuracy is reached (needs --target)")
    # The method (fedlib.strategies) and its knobs; None: the method's own default.
    strategy: str = knob("fedavg", "the method: " + ", ".join(STRATEGIES) + " (see fedlib.strategies)",
                         choices=tuple(STRATEGIES))
    mu: float | None = knob(None, "mu, FedProx's proximal weight (Li et al. 2020)", method_range(P.MU), group="method")
    server_lr: float | None = knob(None, "eta_g, the server's learning rate (fedavgm, fedadam, fedyogi, dp-fedavg)",
                                   method_range(P.SERVER_LR), group="method")
    server_momentum: float | None = knob(None, "beta, FedAvgM's server momentum (Hsu et al. 2019)",
                                         method_range(P.SERVER_MOMENTUM), group="method")
    server_beta1: float | None = knob(None, "beta_1 of FedAdam and FedYogi (Reddi et al. 2021)",
                                      method_range(P.SERVER_BETA), group="method")
    server_beta2: float | None = knob(None, "beta_2 of FedAdam and FedYogi", method_range(P.SERVER_BETA),
                                      group="method")
    server_tau: float | None = knob(None, "tau, FedAdam's and FedYogi's adaptivity (smallest denominator)",
                                    method_range(P.SERVER_TAU), group="method")
    dp_clip: float | None = knob(None, "S, DP-FedAvg's clipping norm of each client's update (McMahan et al. "
                                       "2018)", method_range(P.DP_CLIP), group="method")
    dp_noise: float | None = knob(None, "z, DP-FedAvg's noise multiplier: Gaussian noise of std z S on the sum",
                                  method_range(P.DP_NOISE), group="method")
    dp_reproducible: bool = knob(False, "DP-FedAvg's sample and noise from the seed instead of the operating "
                                        "system's entropy: for teaching and tests only, it voids the privacy "
                                        "guarantee (the seed is saved with the run)", group="method")

    def validate(self) -> "FedAvgConfig":
        """Raise InputError (a ValueError) naming the first parameter outside its allowed range.

        A number of another type that is in range (numpy's ints and floats, a Fraction, numpy's
        bool for a flag) is accepted and replaced here by the plain int, float or bool it equals,
        so that the run's saved files hold plain values that read back as this configuration."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(f.default, bool):
                if not isinstance(value, (bool, np.bool_)):
                    raise InputError(f"{f.name} must be True or False, got {P.shown(value)}")
                value = bool(value)
            elif meta["choices"] is not None:
                if not isinstance(value, str) or value not in meta["choices"]:
                    raise InputError(f"{f.name} must be one of {meta['choices']}, got {P.shown(value)}")
                value = str(value)
            elif meta["range"] is not None:
                value = meta["range"].convert(f.name, value)
            setattr(self, f.name, value)
        if self.stop_at_target and self.target is None:
            raise InputError("stop_at_target needs a target accuracy (target, --target), got none")
        method = STRATEGIES[self.strategy]
        for name, owners in knob_owners().items():
            if name not in method.knobs and getattr(self, name) != FIELD_DEFAULTS[name]:
                raise InputError(f"{name} is a parameter of {' and '.join(owners)}, not of strategy "
                                 f"{self.strategy!r}; set strategy={owners[0]!r} or leave {name} unset")
        method.check(self)
        return self

    def partition_args(self) -> dict[str, Any]:
        """The partition's own parameters (the fields of group ``partition``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["group"] == "partition"}

    def split(self, labels, clients: Partition | None = None) -> Partition:
        """The K clients' index arrays into the training set (``labels``: its labels, one row per
        example), as this configuration's partition and seed make them; ``clients``: the dataset's
        own clients (``Dataset.clients``), which partition ``natural`` returns."""
        labels = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
        return make_partition(self.partition, labels, self.num_clients, self.seed, clients=clients,
                              **self.partition_args())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FedAvgConfig":
        """The config saved in a History or checkpoint. Keys a run adds (engine_used) are
        ignored; configs saved before methods were strategies are translated (:func:`upgrade`)."""
        if not isinstance(data, dict):
            raise InputError(f"a run's config must be a mapping of its parameters, got {type(data).__name__}")
        data = upgrade(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - RECORDED)
        if unknown:
            raise InputError(f"a run's config has unknown parameters {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})


FIELD_DEFAULTS = {f.name: f.default for f in fields(FedAvgConfig)}
RECORDED = {"engine_used"}          # what a run adds to its saved config
# The fields every saved configuration has held since the first FedAvgConfig: one missing is not a
# run's configuration (fields added later take their defaults, which are what runs did before them).
ALWAYS_SAVED = ("dataset", "model", "partition", "num_clients", "frac", "local_epochs", "batch_size", "lr", "rounds",
                "seed", "eval_every", "device", "engine", "momentum", "weight_decay", "shards_per_client",
                "shard_size", "alpha", "min_size", "sigma", "target", "stop_at_target")


def saved_config(data: object) -> FedAvgConfig:
    """The configuration saved with a run (a History's, a reproduction result's), checked whole: a
    mapping that names every field of ALWAYS_SAVED (and no unknown one) and is valid; InputError
    says what is wrong."""
    if not isinstance(data, dict):
        raise InputError(f"a run's config must be a mapping of its parameters, got {type(data).__name__}")
    missing = [name for name in ALWAYS_SAVED if name not in data]
    if missing:
        raise InputError(f"a run's config names all its parameters, and this one lacks {missing}")
    return FedAvgConfig.from_dict(data).validate()


# Before methods were strategies (fedlib <= 0.1 files): flags, and the knob defaults that meant FedAvg.
LEGACY = {"scaffold": False, "server_opt": "sgd", "mu": 0.0, "server_lr": 1.0, "server_momentum": 0.0,
          "server_beta2": 0.99, "server_tau": 1e-3, "dp_clip": None, "dp_noise": 0.0}


def upgrade(data: dict) -> dict:
    """A saved config in today's terms: an old config names its method by flags and knob values
    (``scaffold=True``, ``server_opt="adam"``, ``dp_clip``, ``mu > 0``, a server rate or momentum);
    this names the method and keeps only its knobs. A config that names its strategy is returned as is."""
    if "strategy" in data or not set(LEGACY) & set(data):
        return data
    old = {**LEGACY, **{k: data[k] for k in LEGACY if k in data}}
    new = {k: v for k, v in data.items() if k not in LEGACY}
    if old["dp_clip"] is not None:
        new |= {"strategy": "dp-fedavg", "dp_clip": old["dp_clip"], "dp_noise": old["dp_noise"],
                "dp_reproducible": True}                # the old runs drew their noise from the seed
    elif old["scaffold"]:
        new |= {"strategy": "scaffold"}
    elif old["server_opt"] == "adam":
        raise InputError("this run used FedAdam with torch.optim.Adam's bias correction (fedlib 0.1), which is not "
                         "Reddi et al.'s Algorithm 2 and which fedlib no longer has; rerun it with strategy='fedadam'")
    elif old["server_lr"] != 1.0 or old["server_momentum"] != 0.0:
        new |= {"strategy": "fedavgm", "server_lr": old["server_lr"], "server_momentum": old["server_momentum"]}
    elif old["mu"]:
        new |= {"strategy": "fedprox", "mu": old["mu"]}
    else:
        new |= {"strategy": "fedavg"}
    return new
