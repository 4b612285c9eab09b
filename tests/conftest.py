"""Shared test settings: deterministic, single-threaded-friendly PyTorch."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, restoring the setting after.

    Small tensors run as fast on one thread, and stay fast when another process
    loads this 2-core machine: OpenMP's barriers in small parallel regions (float64
    depthwise convolutions, tiny matmuls) otherwise wait for time slices and a
    0.1 s forward pass can take seconds.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
