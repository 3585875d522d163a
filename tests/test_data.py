"""The loader: IDX and CIFAR files written by the tests, the missing-data message, real MNIST."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fedlib.data import DatasetNotFoundError, data_root, load_dataset
from tests.helpers import write_fake_mnist, write_idx


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_loads_idx_files_as_normalised_tensors(tmp_path, name, folder):
    arrays = write_fake_mnist(tmp_path, folder)
    data = load_dataset(name, root=tmp_path, device="cpu", download=False)
    assert data.x_train.shape == (50, 1, 28, 28) and data.x_train.dtype == torch.float32
    assert data.y_train.dtype == torch.int64 and data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.x_test.shape == (20, 1, 28, 28)
    mean, std = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}[name]
    expected = (torch.tensor(arrays["train-images-idx3-ubyte"][3], dtype=torch.float32) / 255 - mean) / std
    assert torch.allclose(data.x_train[3, 0], expected, atol=1e-6)
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)


def test_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIB_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("FEDLIB_DATA")
    assert data_root() == Path("data")


def test_env_variable_is_used(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path)
    monkeypatch.setenv("FEDLIB_DATA", str(tmp_path))
    assert len(load_dataset("mnist", device="cpu", download=False).y_train) == 50


def test_missing_files_without_network_give_one_clear_message(tmp_path, monkeypatch):
    from urllib.error import URLError

    def no_network(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("mnist", root=tmp_path, device="cpu")
    message = str(error.value)
    assert str(tmp_path.resolve()) in message                         # where it looked
    assert "MNIST/raw/train-images-idx3-ubyte" in message             # which files it needs
    assert "network" in message and "FEDLIB_DATA" in message          # the two ways to fix it
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path, device="cpu", download=False)


def write_fake_cifar(root: Path, n_per_batch: int = 4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        entry = {"data": rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8),
                 "labels": rng.integers(0, 10, n_per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
        batches[name] = entry
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))
    return batches


def test_cifar10_path_on_a_tiny_batch(tmp_path, monkeypatch):
    batches = write_fake_cifar(tmp_path)
    # torchvision checks each file's md5 against the real CIFAR-10; our tiny files cannot
    # match, so the check keeps only its "the file exists" half.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    data = load_dataset("cifar10", root=tmp_path, device="cpu", download=False)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.y_train.tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    # The first pixel of the red channel of image 0, normalised with CIFAR's red mean/std.
    raw = batches["data_batch_1"]["data"][0, 0]
    assert data.x_train[0, 0, 0, 0].item() == pytest.approx((raw / 255 - 0.4914) / 0.2470, abs=1e-5)
    assert data.classes[0] == "airplane"


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("svhn")


def test_real_mnist(mnist):
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(mnist.y_train).tolist()[:3] == [5923, 6742, 5958]
    # Normalised with the training set's own statistics: mean ~0, std ~1.
    assert abs(mnist.x_train.mean().item()) < 1e-3 and abs(mnist.x_train.std().item() - 1) < 1e-2
