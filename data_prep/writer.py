"""Write rows as a ``datasets`` folder (what ``Dataset.save_to_disk`` writes), shard by shard.

Rows are turned into Arrow list arrays straight from the (rows, seq_len) numpy batches (no
Python list per token) and written as Arrow IPC streams whose schema carries the ``datasets``
features in its ``huggingface`` metadata: byte for byte what ``datasets``' ``ArrowWriter``
writes (checked by a test), without importing ``datasets`` (~3 s). We write the shards
ourselves instead of building a ``Dataset`` and calling ``save_to_disk`` because that needs
the whole split in one Arrow table first (memory that grows with the corpus) and, with
``num_proc``, a spawn pool (DESIGN.md section 3).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

COLUMNS = ("input_ids", "doc_lens", "loss_mask")


# The datasets features of the contract (DESIGN.md section 2), as Features.to_dict() writes them.
FEATURES = {
    "input_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "doc_lens": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "loss_mask": {"feature": {"dtype": "uint8", "_type": "Value"}, "_type": "List"},
}
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("doc_lens", pa.list_(pa.int32())),
                    ("loss_mask", pa.list_(pa.uint8()))],
                   metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class SplitWriter:
    """Appends batches of rows to ``folder`` as ``data-XXXXX-of-NNNNN.arrow`` shards.

    A new shard starts once the current one holds ``shard_tokens`` tokens (default 2**26 tokens,
    about 320 MB of ids and mask, near ``save_to_disk``'s 500 MB default).
    """

    def __init__(self, folder: Path, seq_len: int, shard_tokens: int = 1 << 26):
        self.folder, self.seq_len = Path(folder), seq_len
        self.shard_rows = max(1, shard_tokens // seq_len)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[Path] = []
        self._writer = None
        self._rows_in_shard = 0
        self.rows = 0
        self._digest = hashlib.sha256()

    def _open_shard(self) -> None:
        path = self.folder / f"data-{len(self.shards):05d}.arrow.partial"
        self.shards.append(path)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._rows_in_shard = 0

    def write(self, ids: np.ndarray, mask: np.ndarray, doc_lens: list[list[int]]) -> None:
        """ids (R, L) int32, mask (R, L) uint8, doc_lens: R lists summing to L."""
        start = 0
        while start < len(doc_lens):
            if self._writer is None or self._rows_in_shard >= self.shard_rows:
                self._close_shard()
                self._open_shard()
            end = min(len(doc_lens), start + self.shard_rows - self._rows_in_shard)
            self._write_table(ids[start:end], mask[start:end], doc_lens[start:end])
            self._rows_in_shard += end - start
            start = end

    def _write_table(self, ids: np.ndarray, mask: np.ndarray, doc_lens: list[list[int]]) -> None:
        r, L = ids.shape
        full = np.full(r, L, dtype=np.int64)
        seg_counts = np.fromiter((len(d) for d in doc_lens), dtype=np.int64, count=r)
        flat_lens = np.fromiter((x for d in doc_lens for x in d), dtype=np.int32, count=int(seg_counts.sum()))
        table = pa.Table.from_arrays(
            [_list_array(ids.reshape(-1), full), _list_array(flat_lens, seg_counts), _list_array(mask.reshape(-1), full)],
            schema=SCHEMA)
        self._writer.write_table(table)
        for array in (ids, flat_lens, mask):  # a fingerprint of the content, for state.json
            self._digest.update(np.ascontiguousarray(array))  # hashlib reads the buffer: no copy
        self.rows += r

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def close(self) -> int:
        """Finish the last shard, name the shards, write state.json and dataset_info.json."""
        self._close_shard()
        if not self.shards:  # an empty split is still a readable dataset
            self._open_shard()
            self._close_shard()
        n = len(self.shards)
        names = []
        for i, path in enumerate(self.shards):
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            path.rename(self.folder / name)
            names.append(name)
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": self._digest.hexdigest()[:16],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        (self.folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = {"citation": "", "description": "", "features": FEATURES, "homepage": "", "license": ""}
        (self.folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        return self.rows
