"""Where the repository and the real data (``../shared/data``) are; skip a test when the data is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# ../shared/data beside the checkout (DESIGN.md); LONGTRAIN_SHARED_DATA overrides it.
SHARED_DATA = Path(os.environ.get("LONGTRAIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CORPORA = SHARED_DATA / "corpora"
TOKENIZERS = SHARED_DATA / "tokenizers"


def shared_file(*parts: str) -> Path:
    """Path to a file of ../shared/data, or skip the test with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found: {path} (set LONGTRAIN_SHARED_DATA or run beside ../shared/data)")
    return path
