"""What an offline Weights & Biases run wrote: the records of its ``run-<id>.wandb`` file.

wandb 0.31 writes a run as LevelDB-log framed protobuf records (a 7-byte ``:W&B`` header, then 32 KiB
blocks of chunks with a 7-byte header each: crc32, length, type) and ships no Python reader any more
(``wandb sync`` is its Go core), so the tests read the file here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_env(root: Path) -> dict[str, str]:
    """Environment that keeps wandb offline and every file it writes under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_DATA_DIR": str(root / "data"),
            "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true"}


def require_wandb():
    return pytest.importorskip("wandb", reason="wandb is not installed (pip install 'longtrain[wandb]')")


def records(path: Path) -> list:
    """Every ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records once the run's ``exit`` record is in the file: wandb's core process writes the file
    asynchronously and may still be flushing it when ``run.finish()`` has returned (seen in CI: the
    history record arrived after the test had read the file)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = records(path)
        except Exception:  # a chunk still being written; a damaged file raises again at the deadline
            if time.monotonic() > deadline:
                raise
            found = []
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def history(run_folder: Path) -> list[dict]:
    """The logged rows (``run.log`` calls) of one offline run folder, values decoded from JSON."""
    (path,) = run_folder.glob("run-*.wandb")
    rows = []
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_folders(wandb_dir: Path) -> list[Path]:
    """Offline run folders under a WANDB_DIR, oldest first."""
    return sorted((wandb_dir / "wandb").glob("offline-run-*"), key=lambda p: p.name)


def logged_file(run_folder: Path, row: dict, key: str) -> Path:
    """The file behind a logged media value (a Table's or an Image's ``key/path`` in a history row)."""
    return run_folder / "files" / row[f"{key}/path"]


def table(run_folder: Path, row: dict, key: str) -> dict:
    """A logged Table's ``{columns, data}``."""
    assert row[f"{key}/_type"] == "table-file", row
    return json.loads(logged_file(run_folder, row, key).read_text())
