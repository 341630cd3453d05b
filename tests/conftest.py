"""Test set-up shared by the whole suite.

Kernels run under Triton's interpreter when no GPU is present: TRITON_INTERPRET must be set
before triton (and so `fastkd.kernels`) is imported, which is why it happens here, at
collection time, and not inside a fixture.
"""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_dali = pytest.mark.skip(reason="needs NVIDIA DALI")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "dali" in item.keywords and not HAS_DALI:
            item.add_marker(skip_dali)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
