"""The environment of every subprocess a test (or the long-context study) starts, and free ports.

Offline (nothing is fetched from a hub), one thread per process (2 cores are shared by every rank),
unbuffered output (logs are read while the run goes on), and DeepSpeed's op build cache inside the
checkout's venv (its shm op compiles once per machine, ~27 s).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def child_env(threads: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_rank_vars() -> dict[str, str]:
    """torch.distributed's ``env://`` variables for one process (world size 1) on a free port of 127.0.0.1."""
    return dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
