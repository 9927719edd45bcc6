"""Suite-wide set-up: offline by default, and the GPU skip (helpers live in ``tests/support``)."""
from __future__ import annotations

import os

import pytest

from tests.support.env import OFFLINE

for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
