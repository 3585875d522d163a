"""Datasets as whole tensors on the device.

``load_dataset`` reads MNIST, Fashion-MNIST or CIFAR-10 with ``torchvision`` and
returns the full train and test sets as float tensors with int64 labels, the pixels
standardised with the training set's mean and standard deviation (or, with
``scaling=``, scaled to [0, 1] or left at 0-255). Holding everything as one tensor means a client's data is just an index
array into it: no DataLoader and no per-sample transform runs during training.

``load_dataset("shakespeare")`` is the paper's language task (``fedlib.shakespeare``):
sequences of 80 character ids, a target character at every position, and the dataset's
own clients (one per speaking role) in ``Dataset.clients``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from fedlib.params import InputError
from fedlib.runtime import get_device

# Per-channel mean and standard deviation of each training set (pixel values in [0, 1]).
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# The image datasets, then the paper's Shakespeare task (fedlib.shakespeare).
DATASETS = tuple(NORMALIZATION) + ("shakespeare",)

# A target that no loss, gradient or accuracy counts: the padding of a short sequence.
# PyTorch's default ``ignore_index`` of ``F.cross_entropy``, so the loss skips it by itself.
IGNORE_INDEX = -100

# How pixel values p (0-255) become inputs: standardize: (p/255 - mean) / std, per channel
# (fedlib's default); unit: p/255, in [0, 1]; raw: p itself, 0-255.
SCALINGS = ("standardize", "unit", "raw")

_TORCHVISION_CLASS = {
    "mnist": torchvision.datasets.MNIST,
    "fashion-mnist": torchvision.datasets.FashionMNIST,
    "cifar10": torchvision.datasets.CIFAR10,
}

_REQUIRED_FILES = {
    "mnist": [f"MNIST/raw/{f}" for f in
              ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
    "fashion-mnist": [f"FashionMNIST/raw/{f}" for f in
                      ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
    "cifar10": [f"cifar-10-batches-py/{f}" for f in
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta")],
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are missing and could not be downloaded."""


class DatasetCorruptError(InputError):
    """The dataset files are there but are not the dataset (truncated, overwritten, another format)."""


@dataclass
class Dataset:
    """A whole dataset held as tensors.

    ``x_train``: (N, C, H, W) float32, scaled as ``scaling`` says (one of ``SCALINGS``);
    ``y_train``: (N,) int64. ``x_test`` and ``y_test`` likewise for the test set
    (10,000 images for all three).

    Shakespeare (``fedlib.shakespeare``): ``x_train`` (N, 80) int64 character ids,
    ``y_train`` (N, 80) int64 the next characters (``IGNORE_INDEX`` for padding), ``scaling``
    "ids", and the natural partition: ``clients``, one index array into the training set
    per client, named in ``client_names``. Image datasets have no natural clients (None).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    scaling: str = "standardize"
    clients: list[np.ndarray] | None = None
    client_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Dataset":
        """The same dataset with every tensor moved to ``device`` and the images cast to
        ``dtype`` (None keeps each); labels stay int64, and so do character ids (inputs
        that are not floating point). ``run`` trains in the images' dtype, so
        ``data.to(dtype=torch.float64)`` gives a float64 run (the tests use it)."""
        def inputs(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        return Dataset(self.name, inputs(self.x_train), self.y_train.to(device), inputs(self.x_test),
                       self.y_test.to(device), self.classes, self.scaling, self.clients, self.client_names)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets live: ``root`` if given, else ``$FEDLIB_DATA``, else ``./data``."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("FEDLIB_DATA") or "data")


def _not_found_message(name: str, root: Path, cause: BaseException) -> str:
    folder = _REQUIRED_FILES[name][0].split("/")[0]
    needed = "\n".join(f"  {root / f}" for f in _REQUIRED_FILES[name])
    return (
        f"{name} not found under {root.resolve()} and it could not be downloaded "
        f"({type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else 'no detail'}).\n"
        f"It needs these files:\n{needed}\n"
        "Fix it one of two ways:\n"
        f"  1. run once with network access, and torchvision downloads them into {root.resolve()};\n"
        f"  2. point FEDLIB_DATA (or root=) at a folder that already holds {folder}/..., "
        "for example FEDLIB_DATA=../shared/data."
    )


def _read_torchvision(name: str, root: Path, train: bool, download: bool):
    cls = _TORCHVISION_CLASS[name]
    if not all((root / f).is_file() for f in _REQUIRED_FILES[name]):
        missing = RuntimeError("Dataset not found")
        if not download:
            raise DatasetNotFoundError(_not_found_message(name, root, missing)) from None
        try:
            return _check_shapes(name, root, cls(str(root), train=train, download=True))
        except DatasetCorruptError:
            raise
        except Exception as failed:  # network errors come as URLError, RuntimeError, OSError...
            raise DatasetNotFoundError(_not_found_message(name, root, failed)) from None
    try:
        return _check_shapes(name, root, cls(str(root), train=train, download=False))
    except DatasetCorruptError:
        raise
    except Exception as unreadable:  # torchvision asserts, reshapes or unpickles: any failure means bad files
        raise DatasetCorruptError(_corrupt_message(name, root, str(unreadable) or type(unreadable).__name__)) from None


def _corrupt_message(name: str, root: Path, reason: str) -> str:
    folder = _REQUIRED_FILES[name][0].split("/")[0]
    return (f"the {name} files under {(root / folder).resolve()} cannot be read as {name} "
            f"({reason.strip().splitlines()[0][:120]}); replace them with the original files")


# The shape of one image of each dataset as torchvision reads it (MNIST: H x W; CIFAR-10: H x W x C).
IMAGE_SHAPES = {"mnist": (28, 28), "fashion-mnist": (28, 28), "cifar10": (32, 32, 3)}


def _check_shapes(name: str, root: Path, raw):
    """The images and labels of a torchvision dataset must agree in number, the labels be classes
    and every image have the dataset's shape (28 x 28 for MNIST: files of 5 x 5 images are not MNIST)."""
    images, labels = np.asarray(raw.data), np.asarray(raw.targets)
    if images.ndim != 1 + len(IMAGE_SHAPES[name]) or len(images) != len(labels) or len(labels) == 0 \
            or labels.ndim != 1 or labels.min() < 0 or labels.max() >= len(raw.classes):
        raise DatasetCorruptError(_corrupt_message(
            name, root, f"images {images.shape} and labels {labels.shape} do not make a labelled dataset"))
    if images.shape[1:] != IMAGE_SHAPES[name]:
        raise DatasetCorruptError(_corrupt_message(
            name, root, f"its images are {' x '.join(map(str, images.shape[1:]))}, and {name}'s are "
                        f"{' x '.join(map(str, IMAGE_SHAPES[name]))}"))
    return raw


def _to_tensors(name: str, raw, scaling: str = "standardize") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> float32 (N, C, H, W) scaled as ``scaling`` says; labels -> int64 (N,)."""
    images = torch.as_tensor(np.asarray(raw.data))
    if images.ndim == 3:                      # MNIST: (N, 28, 28) -> (N, 1, 28, 28)
        images = images.unsqueeze(1)
    else:                                     # CIFAR: (N, 32, 32, 3) -> (N, 3, 32, 32)
        images = images.permute(0, 3, 1, 2)
    x = images.float()                        # raw: 0-255
    if scaling != "raw":
        x = x / 255.0                         # unit: [0, 1]
    if scaling == "standardize":
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[name])
        x = (x - mean) / std
    y = torch.as_tensor(np.asarray(raw.targets), dtype=torch.int64)
    return x.contiguous(), y


def load_dataset(name: str = "mnist", root: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, download: bool = True,
                 scaling: str = "standardize") -> Dataset:
    """Load a whole dataset as tensors on ``device`` (None: cuda if available, else cpu).

    name: ``mnist``, ``fashion-mnist``, ``cifar10`` or ``shakespeare`` (the paper's language
    task, read from the installed package ``shakespeare``: :func:`fedlib.shakespeare.load`,
    which also takes the options that shrink it). root: see :func:`data_root`.
    scaling: how pixels become inputs, one of ``SCALINGS``: ``standardize`` (the
    training set's mean 0 and standard deviation 1 per channel), ``unit`` ([0, 1]) or
    ``raw`` (0-255).
    With the files present nothing touches the network; with them missing,
    torchvision tries to download them (unless ``download=False``), and if that
    fails a :class:`DatasetNotFoundError` says where we looked and how to fix it.
    """
    if name not in DATASETS:
        raise InputError(f"name must be one of {DATASETS}, got {name!r}")
    if name == "shakespeare":
        from fedlib import shakespeare
        return shakespeare.load(device=device)
    if scaling not in SCALINGS:
        raise InputError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    folder = data_root(root)
    train = _read_torchvision(name, folder, train=True, download=download)
    test = _read_torchvision(name, folder, train=False, download=download)
    x_train, y_train = _to_tensors(name, train, scaling)
    x_test, y_test = _to_tensors(name, test, scaling)
    dev = get_device(device)
    return Dataset(name, x_train, y_train, x_test, y_test, list(train.classes), scaling).to(dev)
