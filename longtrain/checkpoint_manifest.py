"""Checkpoint manifests: the size and sha256 of every file of a checkpoint, and the check before use.

A checkpoint's ``COMPLETE`` record carries ``manifest: {"format", "hashes", "files": {name: {"size",
"sha256"}}}`` (names relative to the tag folder, ``/``-separated). Each rank describes the files it
wrote, right after writing them (they are still in its page cache, and the ranks hash in parallel);
rank 0 merges the descriptions into ``COMPLETE`` (``longtrain/checkpoint.py``). Who owns a file is a
rule on its name, the same at save and at verification: DeepSpeed's per-rank shards
(``zero_pp_rank_{R}_*``, ``bf16_zero_pp_rank_{R}_*``) and our ``rng_rank{R}.pt`` belong to rank R,
everything else (model states of ZeRO 0-2, ``hf_config/``, ``longtrain_state.json``) to rank 0. At
verification with a different number of ranks, rank ``R % world`` checks rank R's files.

This module only reads and describes files; which rank calls what, and agreeing on the verdict, is
``longtrain/checkpoint.py``'s job. Python's ``hashlib`` releases the GIL while hashing large
buffers, so a few threads overlap reading and hashing.
"""
from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = 1
_CHUNK = 4 << 20
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rng_rank(\d+)\.")
_NOT_LISTED = ("COMPLETE",)  # the record itself


def file_owner(name: str) -> int:
    """The rank that wrote ``name`` (a path relative to the tag folder)."""
    match = _RANK_FILE.search(Path(name).name)
    return int(match.group(1) or match.group(2)) if match else 0


def checker_of(name: str, world: int) -> int:
    """The rank that checks ``name`` when ``world`` ranks verify (its writer, folded onto ``world``)."""
    return file_owner(name) % world


def list_files(tag_dir: Path) -> list[str]:
    """Every file of a tag folder but ``COMPLETE`` and temporary ``*.tmp`` files, relative, sorted."""
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                  if p.is_file() and p.name not in _NOT_LISTED and not p.name.endswith(".tmp"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _threads(n_files: int) -> int:
    return max(1, min(4, n_files))


def describe(tag_dir: Path, names: list[str], hashes: bool) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of the given files (``sha256`` only when ``hashes``)."""
    def one(name: str) -> tuple[str, dict[str, Any]]:
        path = tag_dir / name
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if hashes:
            entry["sha256"] = sha256_file(path)
        return name, entry

    with ThreadPoolExecutor(_threads(len(names))) as pool:
        return dict(pool.map(one, names))


def manifest_record(files: dict[str, dict[str, Any]], hashes: bool) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "hashes": hashes, "files": dict(sorted(files.items()))}


def check(tag_dir: Path, files: dict[str, dict[str, Any]], hashes: bool) -> list[str]:
    """Problems of the listed files, one short phrase each (``"rng_rank0.pt: missing"``); empty when
    every file exists with its recorded size and, when ``hashes`` and recorded, its sha256."""
    def one(item: tuple[str, dict[str, Any]]) -> str | None:
        name, entry = item
        path = tag_dir / name
        if not path.is_file():
            return f"{name}: missing"
        size = path.stat().st_size
        if size != entry["size"]:
            how = "truncated" if size < entry["size"] else "longer than written"
            return f"{name}: {size} bytes, {entry['size']} were written ({how})"
        if hashes and "sha256" in entry and sha256_file(path) != entry["sha256"]:
            return f"{name}: sha256 differs from the one recorded at save (its content changed)"
        return None

    with ThreadPoolExecutor(_threads(len(files))) as pool:
        return [p for p in pool.map(one, sorted(files.items())) if p]


def files_of(manifest: dict[str, Any], rank: int, world: int) -> dict[str, dict[str, Any]]:
    """The entries of ``manifest`` that ``rank`` checks when ``world`` ranks verify."""
    return {name: entry for name, entry in manifest["files"].items() if checker_of(name, world) == rank}


def total_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(entry["size"]) for entry in manifest["files"].values())
