"""fedlib: Federated Averaging (McMahan et al., AISTATS 2017) in small, readable PyTorch.

One module per concept:

- ``fedlib.data``: MNIST, Fashion-MNIST, CIFAR-10 as whole tensors on the device
- ``fedlib.shakespeare``: the paper's Shakespeare task, one client per speaking role
- ``fedlib.partition``: IID, pathological non-IID shards, Dirichlet, unbalanced splits
- ``fedlib.models``: the paper's 2NN, CNN and character LSTM, and the reproduction's small models
- ``fedlib.client``: ClientUpdate, one client's E epochs of minibatch SGD
- ``fedlib.server``: the FedAvg round and the training loop ``run``
- ``fedlib.config``: ``FedAvgConfig``, every knob of a run with its default and range
- ``fedlib.seeds``: every random stream of a run, derived from its one seed
- ``fedlib.metrics``: evaluation, the per-round History, rounds to a target accuracy
- ``fedlib.engine``: the fast path, all clients of a round at once
- ``fedlib.params``, ``fedlib.files``: parameter ranges and bad input; writing files whole
"""

__version__ = "0.1.0"

from fedlib.client import ClientResult, local_update
from fedlib.config import FedAvgConfig
from fedlib.data import Dataset, DatasetCorruptError, DatasetNotFoundError, load_dataset
from fedlib.metrics import History, RoundRecord, evaluate, rounds_to_target
from fedlib.models import build_model, count_parameters, model_bytes
from fedlib.params import InputError
from fedlib.partition import class_counts, dirichlet, iid, make_partition, shards, unbalanced
from fedlib.runtime import get_device, set_threads
from fedlib.seeds import sampling_rng, shuffle_generator
from fedlib.server import fedavg, initial_model, run, sample_clients

__all__ = [
    "ClientResult", "Dataset", "DatasetCorruptError", "DatasetNotFoundError", "FedAvgConfig", "History",
    "InputError", "RoundRecord", "build_model", "class_counts", "count_parameters", "dirichlet", "evaluate",
    "fedavg", "get_device", "iid", "initial_model", "load_dataset", "local_update", "make_partition",
    "model_bytes", "rounds_to_target", "run", "sample_clients", "sampling_rng", "set_threads",
    "shuffle_generator", "shards", "unbalanced",
]
