"""A full disk during a checkpoint save, said in one line: which folder, how much was free, what a
checkpoint takes, and that the previous checkpoint is intact.

Two places catch it (``longtrain/checkpoint.py`` calls both): before anything is written, when the
free space is below the size of the previous checkpoint of the run (every rank then refuses
together); and while writing, where ``torch.save`` reports a full disk as ``RuntimeError: ...
unexpected pos N vs M`` or ``... file write failed`` (no errno) and plain writes as ``OSError``
(ENOSPC, EDQUOT). A write error that is not a full disk passes through unchanged.
"""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from longtrain.errors import UserError

# torch.save's messages for a failed write (caffe2 PyTorchStreamWriter), which carry no errno.
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
_NEARLY_FULL = 1 << 20  # below this much free space, a failed write is taken as a full disk


class DiskFullError(UserError, OSError):
    """No room for a checkpoint; the message names the folder and the free space."""


def free_bytes(path: Path) -> int:
    """Free space for this user on the file system of ``path`` (or of its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _intact(previous: Path | None) -> str:
    if previous is None:
        return "no earlier checkpoint of this run is affected"
    return f"the previous checkpoint {previous.name} is intact and resumable"


def check_free_space(root: Path, tag: str, need: int | None, previous: Path | None) -> str | None:
    """The refusal message when ``root`` has less free space than a checkpoint takes (``need``: the
    previous checkpoint's size; None before the first one, when there is nothing to compare)."""
    if need is None:
        return None
    free = free_bytes(root)
    if free >= need:
        return None
    return (f"disk full: not saving checkpoint {tag} in {root}: {format_bytes(free)} free, a checkpoint of this "
            f"run takes {format_bytes(need)}; {_intact(previous)}. Free space (or lower train.keep_checkpoints) "
            f"and resume with --resume auto")


def is_disk_full(exc: BaseException, root: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return (isinstance(exc, (RuntimeError, OSError)) and any(m in text for m in _TORCH_WRITE_FAILURES)
            and free_bytes(root) < _NEARLY_FULL)


@contextmanager
def explain_write_errors(root: Path, tag: str, need: int | None, previous: Path | None) -> Iterator[None]:
    """Turn a full disk while writing checkpoint ``tag`` under ``root`` into a ``DiskFullError``."""
    free_before = free_bytes(root)
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, UserError) or not is_disk_full(exc, root):
            raise
        partial = root / tag
        size = f"; a checkpoint of this run takes {format_bytes(need)}" if need else ""
        raise DiskFullError(
            f"disk full while saving checkpoint {tag} in {root}: {format_bytes(free_before)} were free when the "
            f"save began, {format_bytes(free_bytes(root))} now{size}; {_intact(previous)}; the partial folder "
            f"{partial.name} has no COMPLETE marker and is never used (delete it). Free space and resume with "
            f"--resume auto") from None
