"""Shared test fixtures: where the real data lives, and the GPU skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared/data beside the checkout (DESIGN.md); LONGTRAIN_SHARED_DATA overrides it.
SHARED_DATA = Path(os.environ.get("LONGTRAIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CORPORA = SHARED_DATA / "corpora"
TOKENIZERS = SHARED_DATA / "tokenizers"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_file(*parts: str) -> Path:
    """Path to a file of ../shared/data, or skip the test with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found: {path} (set LONGTRAIN_SHARED_DATA or run beside ../shared/data)")
    return path


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
