"""Checkpoints: DeepSpeed's own save/load plus what makes them safe to resume and export.

Layout (docs/internals.md, "Checkpoint layout"): one DeepSpeed tag folder per save,
``checkpoints/step_00000040/``, holding DeepSpeed's files, ``hf_config/`` (the HF config of the
stage reached, RoPE included), ``longtrain_state.json``, one ``rng_rank{R}.pt`` per rank and, written
last once every rank has finished, ``COMPLETE``: the world size and the manifest of every file (size
and sha256, ``longtrain/checkpoint_manifest.py``). A folder without ``COMPLETE`` was cut off mid-write
(a SIGKILL, a full disk) and is never resumed from or exported; DeepSpeed's ``latest`` pointer is
not trusted on its own because it can name such a folder. A complete folder is verified against its
manifest before use (``verify``, a step of its own before ``load``); ``choose_resume`` walks back
from the newest to the newest one that verifies.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from longtrain import universal_checkpoint
from longtrain import checkpoint_manifest as manifest
from longtrain.checkpoint_space import DiskFullError, check_free_space, explain_write_errors
from longtrain.errors import UserError

STATE_FILE = "longtrain_state.json"
COMPLETE_FILE = "COMPLETE"
HF_CONFIG_DIR = "hf_config"
STATE_FORMAT = 1
RNG_FORMAT = 2  # 1 (unversioned): numpy's state as pickled arrays; 2: plain tensors and ints
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


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc}); the checkpoint is "
                              f"damaged or cut off") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} is not a JSON object; the checkpoint is damaged")
    return value


def read_state(tag_dir: Path) -> dict[str, Any]:
    state = _read_json(tag_dir / STATE_FILE, "longtrain state")
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{tag_dir}: unsupported longtrain state format {state.get('format')!r}")
    return state


def read_complete(tag_dir: Path) -> dict[str, Any]:
    """The ``COMPLETE`` record: ``tag``, ``world_size`` and (since manifests exist) ``manifest``."""
    return _read_json(tag_dir / COMPLETE_FILE, f"{COMPLETE_FILE} record")


# ---------------------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and ints only, so that ``torch.load(weights_only=True)``
    reads them back without allowing any pickled class."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"format": RNG_FORMAT, "python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng_file(path: Path) -> dict[str, Any]:
    """``weights_only=True``; files written before RNG_FORMAT 2 hold numpy arrays, allowed by name."""
    from numpy._core.multiarray import _reconstruct  # numpy >= 2 pickles its arrays through this

    allowed = [np.ndarray, np.dtype, _reconstruct, np.dtypes.UInt32DType]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot read the RNG state ({type(exc).__name__}: {exc})") from None


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- save


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _rank0_decides(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (collective)."""
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _checkpoint_bytes(tag_dir: Path | None) -> int | None:
    """What a checkpoint of this run takes on disk (its manifest, or its files' sizes for older ones)."""
    if tag_dir is None:
        return None
    try:
        record = read_complete(tag_dir).get("manifest")
        if record:
            return manifest.total_bytes(record)
        return sum((tag_dir / name).stat().st_size for name in manifest.list_files(tag_dir))
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return None  # no estimate: the save goes ahead, and a write that fails is still explained


def save(engine, root: Path, state: dict[str, Any], hf_config, keep_last: int, hashes: bool = True) -> Path:
    """Save a checkpoint collectively (every rank calls this) and mark it complete when all are done.

    Before anything is written, rank 0 checks that the disk has room for a checkpoint as large as
    the previous one (every rank refuses together); a write that fails for lack of space anyway
    becomes a one-line ``DiskFullError``. Either way the previous checkpoints are untouched."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(int(state["global_step"]))
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():
        # A folder of this step (cut off, damaged, or of an earlier attempt) is replaced: its marker
        # goes first, so that a crash meanwhile never leaves a "complete" folder of mixed files.
        (tag_dir / COMPLETE_FILE).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)
    previous = latest_complete(root) if rank == 0 else None
    refusal = check_free_space(root, tag, _checkpoint_bytes(previous), previous) if rank == 0 else None
    refusal = _rank0_decides(refusal)
    if refusal:
        raise DiskFullError(refusal)
    state = dict(state, format=STATE_FORMAT)
    with explain_write_errors(root, tag, _checkpoint_bytes(previous), previous if rank == 0 else None):
        engine.save_checkpoint(str(root), tag=tag, client_state={"longtrain": state}, save_latest=True)
        torch.save(_rng_state(), tag_dir / f"rng_rank{rank}.pt")
        if rank == 0:
            hf_config.save_pretrained(tag_dir / HF_CONFIG_DIR)
            _write_atomic(tag_dir / STATE_FILE, json.dumps(state, indent=2, default=str))
        dist.barrier()
        # Every rank describes the files it wrote, in parallel; rank 0 merges and marks the folder.
        names = manifest.list_files(tag_dir)
        mine = manifest.describe(tag_dir, [n for n in names if manifest.checker_of(n, world) == rank], hashes)
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        if rank == 0:
            files = {name: entry for part in parts for name, entry in part.items()}
            # A file rank 0 sees that its checker's own listing missed (a lagging network file system): rank 0 reads it.
            files.update(manifest.describe(tag_dir, [n for n in manifest.list_files(tag_dir) if n not in files],
                                           hashes))
            record = {"tag": tag, "world_size": world, "manifest": manifest.manifest_record(files, hashes)}
            _write_atomic(tag_dir / COMPLETE_FILE, json.dumps(record, indent=1))
            prune(root, keep_last)
    dist.barrier()
    return tag_dir


# ---------------------------------------------------------------------------------------- verify


@dataclass
class Verification:
    tag_dir: Path
    has_manifest: bool
    """False for checkpoints written before manifests existed: they resume, unverified."""
    hashes: bool
    """sha256 checked (sizes always are)."""
    files: int
    bytes: int
    seconds: float

    def line(self) -> str:
        if not self.has_manifest:
            return (f"note: {self.tag_dir} has no file manifest (written before longtrain recorded one): its files "
                    f"cannot be verified")
        what = "sizes and sha256" if self.hashes else "sizes only (sha256 not checked)"
        took = f"{self.seconds * 1000:.0f} ms" if self.seconds < 1 else f"{self.seconds:.1f} s"
        return f"verified {self.tag_dir.name}: {self.files} files, {self.bytes / 2**20:.1f} MiB, {what}, in {took}"


def _local_problems(tag_dir: Path, hashes: bool, rank: int, world: int) -> tuple[list[str], dict | None]:
    """This rank's share of the verification: problems found, and the manifest (None if there is none)."""
    try:
        record = read_complete(tag_dir).get("manifest")
    except CheckpointError:
        return [f"{COMPLETE_FILE}: not valid JSON (cut off or overwritten)"], None
    problems = []
    if record is not None:
        try:
            problems = manifest.check(tag_dir, manifest.files_of(record, rank, world), hashes and record["hashes"])
        except (KeyError, TypeError, AttributeError):
            return [f"{COMPLETE_FILE}: its manifest is malformed (overwritten?)"], None
    if rank == 0 and not any(p.startswith(STATE_FILE) for p in problems):
        try:  # also read with sizes only, and for checkpoints without a manifest
            read_state(tag_dir)
        except CheckpointError as exc:
            problems.append(f"{STATE_FILE}: {str(exc).split(': ', 1)[-1]}")
    return problems, record


def verify(tag_dir: Path, hashes: bool = True) -> Verification:
    """Check a complete checkpoint against its manifest: every file present with its size and (when
    ``hashes``) its sha256. Collective when torch.distributed is initialised: each rank checks the
    files its rank wrote (``checkpoint_manifest.checker_of``) and every rank gets the same verdict.
    Raises ``CheckpointError`` naming the folder and every problem."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    start = time.perf_counter()
    problems, record = _local_problems(tag_dir, hashes, rank, world)
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, problems)
        problems = [p for part in parts for p in part]
    if problems:
        shown = "; ".join(sorted(problems)[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"{tag_dir}: damaged checkpoint: {shown}")
    return Verification(tag_dir, record is not None, bool(hashes and record and record["hashes"]),
                        len(record["files"]) if record else 0, manifest.total_bytes(record) if record else 0,
                        time.perf_counter() - start)


def choose_resume(resume: str, run_dir: Path, hashes: bool, log: Callable[[str], None]) -> Path | None:
    """The verified checkpoint to resume from (collective). ``auto``: the newest complete checkpoint of
    ``run_dir`` that verifies, walking back over damaged ones (each named with its reason), or None
    when there is none at all; a PATH: that checkpoint, or a ``CheckpointError`` if it fails."""
    if resume != "auto":
        tag_dir = resolve_checkpoint(resume)
        try:
            log(verify(tag_dir, hashes).line())
        except CheckpointError as exc:
            raise CheckpointError(f"--resume: {exc}. Not resuming from it: pass an earlier step_XXXXXXXX folder, or "
                                  f"--resume auto to fall back to the newest intact one") from None
        return tag_dir
    root = run_dir / "checkpoints"
    damaged = []
    for tag_dir in reversed(complete_checkpoints(root)):
        try:
            checked = verify(tag_dir, hashes)
        except CheckpointError as exc:
            log(f"resume auto: not using {exc}")
            damaged.append(tag_dir.name)
            continue
        if damaged:
            log(f"resume auto: falling back to {tag_dir.name}, the newest intact checkpoint (damaged: "
                f"{', '.join(damaged)})")
        log(checked.line())
        return tag_dir
    if damaged:
        raise CheckpointError(f"{root}: every complete checkpoint is damaged ({', '.join(damaged)}; reasons above); "
                              f"nothing to resume from: move them away to start fresh")
    return None


# ---------------------------------------------------------------------------------------- load


def load(engine, tag_dir: Path) -> dict[str, Any]:
    """Load model, optimizer and RNG states into ``engine``; return the longtrain state. Call ``verify``
    first: this reads the files as they are."""
    state = read_state(tag_dir)
    # Another world size: through DeepSpeed's universal format, converted once (longtrain/universal_checkpoint.py).
    try:
        with universal_checkpoint.load_source(engine, tag_dir) as source:
            load_path, _ = engine.load_checkpoint(source.load_dir, tag=source.tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:  # a damaged file of an unverified one
        if isinstance(exc, UserError):
            raise
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); a file is damaged: resume from an earlier one") from None
    if load_path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rng_file = tag_dir / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file() and source.same_world:  # per-rank streams: only meaningful on the same ranks
        _set_rng_state(_load_rng_file(rng_file))
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
