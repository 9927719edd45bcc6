"""The output folder of an export: refused early when the export cannot end well there, written as
a hidden sibling and renamed into place only when complete, so a failed export never leaves a folder
at OUT and an existing OUT is only replaced on success."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from longtrain.export.errors import ExportError


def check_output(out: Path, tag_dir: Path, overwrite: bool) -> None:
    """Refuse early (before minutes of consolidation) what cannot end well."""
    target = out.resolve()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ExportError(f"OUT {out}: already exists; pass --overwrite to replace it, or choose another folder")
        if not out.is_dir() or out.is_symlink():
            raise ExportError(f"OUT {out}: exists and is not a folder; remove it yourself")
        if target == tag_dir.resolve() or target in tag_dir.resolve().parents:
            raise ExportError(f"OUT {out}: --overwrite would delete the checkpoint {tag_dir} (it is inside OUT)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"OUT {out}: cannot create its parent folder {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"OUT {out}: its folder {parent} is not writable")


def make_staging(out: Path) -> Path:
    """A hidden sibling of OUT (same file system, so the final rename is atomic), created with the
    usual permissions (``tempfile.mkdtemp`` would make the export private to its owner)."""
    staging = out.resolve().parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise ExportError(f"OUT {out}: cannot write in {staging.parent} ({exc.strerror or exc})") from None
    return staging


def move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    target = out.resolve() if out.exists() else out.absolute()
    if not out.exists():
        os.rename(staging, target)
        return
    if not overwrite:  # appeared while we worked
        raise ExportError(f"OUT {out}: appeared while exporting; pass --overwrite to replace it")
    old = target.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
