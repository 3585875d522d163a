"""fedlib: Federated Averaging (McMahan et al., AISTATS 2017) in small, readable PyTorch.

One module per concept, each importing only from the floors below it:

1. facts: ``fedlib.seeds`` (every random stream of a run), ``fedlib.params`` (every
   parameter's range), ``fedlib.models`` (the paper's 2NN, CNN and character LSTM, and small models);
2. the client's side: ``fedlib.data`` (whole datasets as tensors), ``fedlib.partition``
   (IID, the paper's non-IID shards, Dirichlet, unbalanced splits), ``fedlib.shakespeare``
   (the paper's Shakespeare task, one client per speaking role), ``fedlib.client``
   (ClientUpdate: one client's E epochs of minibatch SGD);
3. the methods: ``fedlib.strategies`` (FedAvg, FedProx, SCAFFOLD, FedAvgM, FedAdam,
   FedYogi, DP-FedAvg), ``fedlib.privacy`` (clipping, noise, epsilon), ``fedlib.config``
   (``FedAvgConfig``, every knob of a run);
4. Algorithm 1: ``fedlib.server.rounds``, the paper's server loop;
5. where ClientUpdate runs: ``fedlib.backends`` (one client after another, or all at once
   with ``fedlib.engine``, the fast path);
6. running it: ``fedlib.runner`` (``run``, ``run_many``: evaluation, History, checkpoints,
   stopping rules), ``fedlib.metrics``, ``fedlib.checkpoint``, ``fedlib.reproduce`` (the
   paper's tables);
7. faces: ``fedlib.cli``, ``fedlib.flower``, ``fedlib.plotting``, ``fedlib.lessons``.
"""

from fedlib.version import __version__

from fedlib.client import ClientResult, local_steps, local_update
from fedlib.config import FedAvgConfig
from fedlib.data import Dataset, DatasetCorruptError, DatasetNotFoundError, load_dataset
from fedlib.metrics import History, RoundRecord, evaluate, rounds_to_target
from fedlib.models import build_model, count_parameters, model_bytes
from fedlib.params import InputError
from fedlib.partition import class_counts, dirichlet, iid, make_partition, shards, unbalanced
from fedlib.runner import Job, RunInterrupted, run, run_many
from fedlib.runtime import get_device, set_threads
from fedlib.seeds import sampling_rng, shuffle_generator
from fedlib.server import Round, fedavg, initial_model, rounds, sample_clients
from fedlib.strategies import STRATEGIES

__all__ = [
    "ClientResult", "Dataset", "DatasetCorruptError", "DatasetNotFoundError", "FedAvgConfig", "History",
    "InputError", "Job", "Round", "RoundRecord", "RunInterrupted", "STRATEGIES", "__version__", "build_model",
    "class_counts", "count_parameters", "dirichlet", "evaluate", "fedavg", "get_device", "iid", "initial_model",
    "load_dataset", "local_steps", "local_update", "make_partition", "model_bytes", "rounds", "rounds_to_target",
    "run", "run_many", "sample_clients", "sampling_rng", "set_threads", "shuffle_generator", "shards",
    "unbalanced",
]
