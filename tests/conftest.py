"""Shared fixtures. Real MNIST comes from FEDLIB_DATA (CI: ../shared/data), never a download."""

import os

import pytest
import torch

import fedlib

# Under pytest-xdist each worker gets one thread, so two workers fill two cores without
# oversubscribing them; a single process uses fedlib's default.
fedlib.set_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else None)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def mnist() -> fedlib.Dataset:
    """The real MNIST train (60,000) and test (10,000) sets on the CPU."""
    return fedlib.load_dataset("mnist", device="cpu", download=False)
