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

# What ``import fedlib`` offers, and the module each name comes from. The modules are imported on
# first use (PEP 562), so that ``python -m fedlib`` can catch a Ctrl-C while torch is being imported
# (fedlib.__main__); ``from fedlib import run`` and ``fedlib.run`` work as usual.
_EXPORTS = {
    "fedlib.client": ("ClientResult", "local_steps", "local_update"),
    "fedlib.config": ("FedAvgConfig",),
    "fedlib.data": ("Dataset", "DatasetCorruptError", "DatasetNotFoundError", "load_dataset"),
    "fedlib.metrics": ("History", "RoundRecord", "evaluate", "rounds_to_target"),
    "fedlib.models": ("build_model", "count_parameters", "model_bytes"),
    "fedlib.params": ("InputError",),
    "fedlib.partition": ("class_counts", "dirichlet", "iid", "make_partition", "shards", "unbalanced"),
    "fedlib.runner": ("Job", "RunInterrupted", "run", "run_many"),
    "fedlib.runtime": ("get_device", "set_threads"),
    "fedlib.seeds": ("sampling_rng", "shuffle_generator"),
    "fedlib.server": ("Round", "fedavg", "initial_model", "rounds", "sample_clients"),
    "fedlib.strategies": ("STRATEGIES",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(["__version__", *_MODULE_OF])


def __getattr__(name: str):
    """A name of ``_EXPORTS``, or a submodule (``fedlib.metrics``), imported on first use."""
    import importlib
    import importlib.util

    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"fedlib.{name}") is not None:
        value = importlib.import_module(f"fedlib.{name}")
    else:
        raise AttributeError(f"module 'fedlib' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
