"""The output folder of an export: refused early when the export cannot end well there, written as
a hidden sibling and renamed into place only when complete, so a failed export never leaves a folder
at OUT and an existing OUT is only replaced on success."""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from longtrain.export.errors import ExportError

# Every file an export writes (files.py, tokenizer.py, card.py): what --overwrite may replace.
EXPORT_FILES = re.compile(r"^(config\.json|generation_config\.json|README\.md|model(-\d{5}-of-\d{5})?\.safetensors|"
                          r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|"
                          r"special_tokens_map\.json|tokenizer\.model)$")
CARD_MARK = "Exported by `longtrain export`"  # the model card's first paragraph (card.py)


def _is_longtrain_card(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return CARD_MARK in handle.read(1 << 16)
    except OSError:
        return False


def check_replaceable(out: Path) -> None:
    """``--overwrite`` replaces only a folder that holds an export (or nothing): every entry one an
    export writes, and its model card written by ``longtrain export``. Anything else is refused with
    the list of what would be lost."""
    entries = sorted(out.iterdir(), key=lambda p: p.name)
    if not entries:
        return
    unexpected = [p.name + ("/" if p.is_dir() else "") for p in entries
                  if not (EXPORT_FILES.match(p.name) and p.is_file() and not p.is_symlink())]
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        raise ExportError(f"OUT {out}: --overwrite replaces only a folder holding a longtrain export, and this one also "
                          f"holds {shown}; move those away or choose another folder")
    if not _is_longtrain_card(out / "README.md"):
        raise ExportError(f"OUT {out}: --overwrite replaces only a folder holding a longtrain export, and this one has "
                          f"no model card written by `longtrain export` (README.md); it may be another model: choose "
                          f"another folder or remove it yourself")


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
        check_replaceable(out)
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
    check_replaceable(out)  # again: files may have been added while we worked
    old = target.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
