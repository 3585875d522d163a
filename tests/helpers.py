"""What several test files share: fake MNIST files, small datasets, SGD and one round written out
by hand, and the rounding bound of float64 comparisons. (Test files import from here, never from
each other.)"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedlib.backends import make_backend
from fedlib.client import epoch_batches
from fedlib.config import FedAvgConfig
from fedlib.data import Dataset
from fedlib.models import build_model
from fedlib.strategies import build, weighted_mean

U64 = torch.finfo(torch.float64).eps / 2     # float64's unit roundoff, 1.1e-16


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of the MNIST files (magic 0x0800 | ndim)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, folder: str = "MNIST", n_train: int = 50, n_test: int = 20):
    """Random 28 x 28 images in MNIST's file layout under root/folder/raw; returns the arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(root / folder / "raw" / name, array)
    return arrays


def small_data(n=120, seed=0, dtype=torch.float32):
    """n random 'images' with random labels (the first 40 also the test set)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("mnist", x, y, x[:40], y[:40], [str(i) for i in range(10)])


def assert_within_rounding(got: dict, expected: dict, steps: int, longest_sum: int = 784) -> None:
    """float64 results that differ only in how sums are grouped: by at most about
    steps * n * u * max|w| (n terms in the longest sum; Higham 2002, section 4.2)."""
    for name, value in expected.items():
        bound = steps * longest_sum * U64 * value.abs().max().item()
        assert (got[name] - value).abs().max().item() <= bound, name


def sgd_by_hand(x, y, w0, epochs, batch_size, lr, seed, extra=lambda name, p: 0.0) -> dict:
    """E epochs of minibatch SGD on (x, y) from w0, each step written out: w <- w - lr (g + extra)."""
    reference = build_model("2nn").double()
    reference.load_state_dict(w0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in epoch_batches(len(y), batch_size, generator):
            reference.zero_grad()
            F.cross_entropy(reference(x[batch]), y[batch]).backward()
            with torch.no_grad():
                for name, p in reference.named_parameters():
                    p -= lr * (p.grad + extra(name, p))
    return reference.state_dict()


def run_round(model: nn.Module, w_t: dict, data: Dataset, client_indices: list, selected: np.ndarray,
              config: FedAvgConfig, t: int, engine: str = "sequential", strategy=None) -> tuple[dict, float]:
    """One round through fedlib's pieces: the backend of ``engine`` computes ClientUpdate for the
    clients ``selected``, the strategy (default: the config's, from w_t) aggregates. Returns
    w_{t+1} and the clients' n_k-weighted training loss."""
    strategy = strategy or build(config, w_t)
    backend = make_backend(engine, model, data, [torch.as_tensor(i) for i in client_indices], config)
    updates = backend.update(w_t, selected, t, strategy)
    w_next = strategy.aggregate(w_t, updates, t)
    loss = weighted_mean([u.train_loss for u in updates.values()], [u.num_examples for u in updates.values()])
    return w_next, loss


def synthetic(num_clients: int = 12, seed: int = 0) -> Dataset:
    """A Shakespeare-like dataset: roles of random words, of very unequal length (1 to ~40
    sequences each), through ``fedlib.shakespeare.dataset``."""
    from fedlib import shakespeare as S

    rng = np.random.default_rng(seed)
    words = ["thou", "art", "the", "king", "and", "I", "am", "thy", "fool", "farewell,", "sir.", "O!"]
    roles = [S.Role("synthetic", f"ROLE {k}", tuple(" ".join(rng.choice(words, rng.integers(2, 9)))
                                                   for _ in range(int(rng.integers(2, 400)))))
             for k in range(num_clients)]
    return S.dataset(roles, device="cpu")


def one_line_error(capsys, *fragments: str) -> str:
    """What a command wrote to stderr: exactly one line, no traceback, holding every fragment."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err
