"""The sizes and sha256 of a prepared dataset's files: recorded in ``meta.json`` by ``prepare``,
checked by whoever opens the dataset (the trainer, eval, ``longtrain inspect``).

A fast check compares sizes (a ``stat`` per file: catches truncated, missing and replaced files of
another size); a full check also hashes every byte (catches flipped bytes; 330-460 MiB/s a process on
a busy 2-core machine, docs/data_prep.md). ``datasets`` itself checks neither: a truncated Arrow file
fails later with a raw ``OSError`` / ``ArrowInvalid``, and flipped bytes read as other token ids.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_prep.errors import DataPrepError

FILES_KEY = "files"  # meta.json: {"train/data-00000-of-00001.arrow": {"bytes": N, "sha256": "..."}, ...}
_CHUNK = 1 << 20


class DamagedDatasetError(DataPrepError, ValueError):
    """A prepared dataset's file is missing or differs from what ``meta.json`` recorded (a ValueError
    too, as the trainer's other dataset errors are)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(folder: Path, splits: list[str]) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file of the split folders, for meta.json."""
    out = {}
    for split in splits:
        for path in sorted((folder / split).iterdir()):
            out[f"{split}/{path.name}"] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        raise DamagedDatasetError(f"{folder}: not a prepared dataset (no meta.json); create one with "
                                  "`longtrain prepare`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedDatasetError(f"{path}: damaged, not valid JSON ({exc}); prepare the dataset again") from None


def check_dataset_files(path: str | Path, full: bool = False, splits: list[str] | None = None,
                        meta: dict | None = None) -> str | None:
    """Check the files of ``splits`` (default: all recorded) against ``meta.json``: sizes, and with
    ``full`` sha256 too. Raises :class:`DamagedDatasetError` naming the dataset folder and the file;
    returns a note when the dataset records no files (prepared before they were recorded), else None."""
    folder = Path(path)
    meta = read_meta(folder) if meta is None else meta
    records = meta.get(FILES_KEY)
    if not records:
        return ("prepared without file sizes and hashes in meta.json (an older longtrain prepare): "
                "its files cannot be checked; prepare it again to have them checked")
    wanted = [(name, rec) for name, rec in sorted(records.items())
              if splits is None or name.split("/", 1)[0] in splits]
    redo = "prepare the dataset again (or restore the file from a copy)"
    for name, rec in wanted:
        file = folder / name
        if not file.is_file():
            raise DamagedDatasetError(f"{folder}: {name} is missing (meta.json records {rec['bytes']:,} bytes); {redo}")
        size = file.stat().st_size
        if size != rec["bytes"]:
            how = "truncated" if size < rec["bytes"] else "grown"
            raise DamagedDatasetError(f"{folder}: {name} has {size:,} bytes but meta.json recorded {rec['bytes']:,} "
                                      f"when it was prepared ({how} or overwritten since); {redo}")
    if full:
        for name, rec in wanted:
            got = sha256_file(folder / name)
            if got != rec["sha256"]:
                raise DamagedDatasetError(f"{folder}: {name}: its sha256 {got[:12]}... differs from the "
                                          f"{rec['sha256'][:12]}... meta.json recorded (same size: bytes changed "
                                          f"or damaged since prepare); {redo}")
    return None


def dataset_bytes(meta: dict, splits: list[str] | None = None) -> tuple[int, int]:
    """(files, bytes) that a check of ``splits`` covers, for messages."""
    records = [rec for name, rec in (meta.get(FILES_KEY) or {}).items()
               if splits is None or name.split("/", 1)[0] in splits]
    return len(records), sum(rec["bytes"] for rec in records)
