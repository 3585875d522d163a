"""The code this book replaces, timed round by round: shaoxiongji/federated-learning.

The most-used PyTorch reproduction of FedAvg (github.com/shaoxiongji/federated-learning)
is not part of this repository and never committed to it. Check it out anywhere outside
the repository and pass its folder to the benchmark::

    git clone https://github.com/shaoxiongji/federated-learning /tmp/seed/federated-learning
    python benchmarks/engine_bench.py --seed-code /tmp/seed/federated-learning

:class:`SeedRounds` runs exactly the body of the round loop of its ``main_fed.py``
(``--model cnn --num_channels 1``, its defaults otherwise: K = 100 IID clients, C = 0.1,
E = 5, B = 10, lr 0.01, momentum 0.5): for each sampled client a ``LocalUpdate`` over
its own ``DataLoader`` of torchvision's MNIST (``ToTensor`` and ``Normalize`` per image),
``train`` on a deep copy of the global model, and its ``FedAvg``. Only the data folder
differs: torchvision reads MNIST from fedlib's data folder (``FEDLIB_DATA``), whose
``MNIST/raw`` holds the files it would download. Its ``models/Update.py`` imports
scikit-learn's ``metrics`` without using it; where scikit-learn is not installed an
empty stand-in module is put in its place.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.machinery
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch


def seed_commit(code_dir: str | Path) -> str:
    """The git commit of the seed's checkout, or "unknown"."""
    try:
        out = subprocess.run(["git", "-C", str(code_dir), "log", "-1", "--format=%h %cs"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def _argv(args: list[str]):
    saved = sys.argv
    sys.argv = ["main_fed.py"] + args
    try:
        yield
    finally:
        sys.argv = saved


class SeedRounds:
    """The seed's MNIST CNN run, one ``round()`` at a time (see the module docstring)."""

    def __init__(self, code_dir: str | Path, data_root: str | Path, device: torch.device, seed: int = 0):
        code_dir = Path(code_dir).resolve()
        if not (code_dir / "main_fed.py").exists():
            raise FileNotFoundError(f"{code_dir} is not a checkout of shaoxiongji/federated-learning (no main_fed.py)")
        from torchvision import datasets, transforms
        try:
            import sklearn.metrics  # noqa: F401  (the seed imports it, and uses nothing from it)
        except ImportError:
            for name in ("sklearn", "sklearn.metrics"):
                stand_in = types.ModuleType(name)
                stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None)
                sys.modules.setdefault(name, stand_in)
            sys.modules["sklearn"].metrics = sys.modules["sklearn.metrics"]
        sys.path.insert(0, str(code_dir))
        from models.Fed import FedAvg
        from models.Nets import CNNMnist
        from models.Update import LocalUpdate
        from utils.options import args_parser
        from utils.sampling import mnist_iid

        self.FedAvg, self.LocalUpdate = FedAvg, LocalUpdate
        with _argv(["--model", "cnn", "--num_channels", "1", "--iid"]):
            self.args = args_parser()
        self.args.device = device
        np.random.seed(seed)
        torch.manual_seed(seed)
        # main_fed.py, as it loads MNIST and splits it among the users
        trans_mnist = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        self.dataset_train = datasets.MNIST(str(data_root), train=True, download=False, transform=trans_mnist)
        self.dict_users = mnist_iid(self.dataset_train, self.args.num_users)
        self.net_glob = CNNMnist(args=self.args).to(device)
        self.net_glob.train()
        self.commit = seed_commit(code_dir)

    @property
    def examples_per_round(self) -> int:
        m = max(int(self.args.frac * self.args.num_users), 1)
        return self.args.local_ep * m * len(self.dict_users[0])

    def round(self) -> float:
        """One round of main_fed.py's loop (its body, verbatim but for the timing); returns seconds."""
        args, device = self.args, self.args.device
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        w_locals, loss_locals = [], []
        m = max(int(args.frac * args.num_users), 1)
        idxs_users = np.random.choice(range(args.num_users), m, replace=False)
        for idx in idxs_users:
            local = self.LocalUpdate(args=args, dataset=self.dataset_train, idxs=self.dict_users[idx])
            w, loss = local.train(net=copy.deepcopy(self.net_glob).to(args.device))
            w_locals.append(copy.deepcopy(w))
            loss_locals.append(copy.deepcopy(loss))
        w_glob = self.FedAvg(w_locals)
        self.net_glob.load_state_dict(w_glob)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began
