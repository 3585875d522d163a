"""Shared fixtures. Real MNIST comes from FEDLIB_DATA (CI: ../shared/data), never a download."""

import os

import pytest
import torch

import fedlib
import fedlib.runner
from tests.helpers import write_fake_mnist

# Under pytest-xdist each worker gets one thread, so two workers fill two cores without
# oversubscribing them; a single process uses fedlib's default.
fedlib.set_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else None)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def mnist() -> fedlib.Dataset:
    """The real MNIST train (60,000) and test (10,000) sets on the CPU."""
    return fedlib.load_dataset("mnist", device="cpu", download=False)


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """A fake MNIST of 200 training images under FEDLIB_DATA; the working folder is tmp_path
    (tests/test_bad_input.py, tests/test_hostile_input.py)."""
    write_fake_mnist(tmp_path / "data", n_train=200, n_test=50)
    monkeypatch.setenv("FEDLIB_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_training(monkeypatch):
    """Make any training fail the test: bad input must be refused before it starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the input was bad")
    monkeypatch.setattr(fedlib.runner, "rounds", refuse)
