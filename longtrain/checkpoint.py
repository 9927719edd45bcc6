"""Checkpoints: DeepSpeed's own save/load plus what makes them safe to resume and export.

Layout (docs/internals.md, "Checkpoint layout"): one DeepSpeed tag folder per save,
``checkpoints/step_00000040/``, holding DeepSpeed's files, ``hf_config/`` (the HF config of the
stage reached, RoPE included), ``longtrain_state.json``, one ``rng_rank{R}.pt`` per rank and, written
last once every rank has finished, ``COMPLETE``. A folder without ``COMPLETE`` was cut off mid-write
(a SIGKILL, a full disk) and is never resumed from or exported; DeepSpeed's ``latest`` pointer is
not trusted on its own because it can name such a folder.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longtrain import universal_checkpoint
from longtrain.errors import UserError

STATE_FILE = "longtrain_state.json"
COMPLETE_FILE = "COMPLETE"
HF_CONFIG_DIR = "hf_config"
STATE_FORMAT = 1
_TAG_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message says which folder and why."""


def tag_for(global_step: int) -> str:
    return f"step_{global_step:08d}"


def periodic_save_due(every: int, global_step: int) -> bool:
    """``train.checkpoint_every``: a save every N global steps (0: none; stage ends and stops save anyway)."""
    return bool(every) and global_step % every == 0


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE_FILE).is_file() and (tag_dir / STATE_FILE).is_file()


def is_tag_dir(path: Path) -> bool:
    """One checkpoint's folder (complete or not), as opposed to a run or ``checkpoints/`` folder."""
    return ((path.name.startswith("step_") and path.name[5:].isdigit())
            or (path / STATE_FILE).exists() or (path / COMPLETE_FILE).exists())


def checkpoints_root(path: Path) -> Path:
    """Where a run keeps its tag folders: ``path/checkpoints`` for a run folder, else ``path`` itself."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def tag_dirs(root: Path) -> list[Path]:
    """Every tag folder under ``root``, complete or cut off mid-write, oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), child) for child in root.iterdir()
             if (match := _TAG_RE.match(child.name)) and child.is_dir()]
    return [path for _, path in sorted(found)]


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete tag folders under ``root``, oldest first (by step)."""
    return [path for path in tag_dirs(root) if is_complete(path)]


def latest_complete(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A tag folder from a tag folder, a ``checkpoints/`` folder or a run folder (latest complete)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if is_tag_dir(path):
        if not is_complete(path):
            raise CheckpointError(
                f"{path}: checkpoint is incomplete (no {COMPLETE_FILE} marker: it was cut off while being "
                "written); use an earlier one")
        return path
    latest = latest_complete(checkpoints_root(path))
    if latest is not None:
        return latest
    raise CheckpointError(f"{path}: no complete longtrain checkpoint found (expected a run folder, its "
                          "checkpoints/ folder, or a step_XXXXXXXX folder with a COMPLETE marker)")


def read_state(tag_dir: Path) -> dict[str, Any]:
    state = json.loads((tag_dir / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{tag_dir}: unsupported longtrain state format {state.get('format')!r}")
    return state


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save(engine, root: Path, state: dict[str, Any], hf_config, keep_last: int) -> Path:
    """Save a checkpoint collectively (every rank calls this) and mark it complete when all are done."""
    rank = dist.get_rank()
    tag = tag_for(int(state["global_step"]))
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists() and not is_complete(tag_dir):
        shutil.rmtree(tag_dir)  # leftovers of a save that was cut off at this same step
    dist.barrier()
    state = dict(state, format=STATE_FORMAT)
    engine.save_checkpoint(str(root), tag=tag, client_state={"longtrain": state}, save_latest=True)
    torch.save(_rng_state(), tag_dir / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        hf_config.save_pretrained(tag_dir / HF_CONFIG_DIR)
        _write_atomic(tag_dir / STATE_FILE, json.dumps(state, indent=2, default=str))
        _write_atomic(tag_dir / COMPLETE_FILE, json.dumps({"tag": tag, "world_size": dist.get_world_size()}))
        prune(root, keep_last)
    dist.barrier()
    return tag_dir


def load(engine, tag_dir: Path) -> dict[str, Any]:
    """Load model, optimizer and RNG states into ``engine``; return the longtrain state."""
    state = read_state(tag_dir)
    # Another world size: through DeepSpeed's universal format, converted once (longtrain/universal_checkpoint.py).
    with universal_checkpoint.load_source(engine, tag_dir) as source:
        load_path, _ = engine.load_checkpoint(source.load_dir, tag=source.tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rng_file = tag_dir / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file() and source.same_world:  # per-rank streams: only meaningful on the same ranks
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all), and stale partials."""
    if keep_last <= 0:
        return []
    done = complete_checkpoints(root)
    removed = []
    for old in done[:-keep_last]:
        # Remove the marker first: a crash mid-delete then leaves an incomplete folder, never a
        # "complete" one with missing shards.
        (old / COMPLETE_FILE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    newest = done[-1] if done else None
    for child in tag_dirs(root):
        if newest is not None and child.name < newest.name and not is_complete(child):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed
