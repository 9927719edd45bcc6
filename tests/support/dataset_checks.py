"""Readers and invariant checks shared by the data_prep tests."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa


def read_rows(folder: Path, split: str = "train") -> list[tuple[np.ndarray, list[int], np.ndarray]]:
    """(input_ids, doc_lens, loss_mask) of every row, read with pyarrow straight from the shards
    (independent of datasets; test_writer checks datasets.load_from_disk agrees)."""
    folder = Path(folder) / split
    state = json.loads((folder / "state.json").read_text())
    rows = []
    for entry in state["_data_files"]:
        with pa.memory_map(str(folder / entry["filename"])) as source:
            table = pa.ipc.open_stream(source).read_all()
        if not table.num_rows:
            continue
        n = table.num_rows
        ids = table.column("input_ids").combine_chunks().flatten().to_numpy().astype(np.int64).reshape(n, -1)
        mask = table.column("loss_mask").combine_chunks().flatten().to_numpy().astype(np.int64).reshape(n, -1)
        lens = table.column("doc_lens").to_pylist()
        rows += [(ids[r], list(lens[r]), mask[r]) for r in range(n)]
    return rows


def segments(rows):
    """Yield (row index, segment index, tokens, mask, is_last) for every segment."""
    for r, (ids, lens, mask) in enumerate(rows):
        offset = 0
        for k, n in enumerate(lens):
            yield r, k, ids[offset:offset + n], mask[offset:offset + n], k == len(lens) - 1
            offset += n


def is_padding(tokens, mask, is_last, pad_id, n_segments) -> bool:
    return is_last and n_segments > 1 and not mask.any() and bool((tokens == pad_id).all())


def check_row_structure(rows, seq_len: int, pad_id: int, split_meta: dict) -> dict:
    """Contract checks on every row; returns observed counts (padding, non targets, segments)."""
    assert rows, "no rows: the check would pass vacuously"
    padding = non_targets = n_segments = 0
    for ids, lens, mask in rows:
        assert len(ids) == seq_len and len(mask) == seq_len, "row length != seq_len"
        assert sum(lens) == seq_len and min(lens) >= 1, f"doc_lens {lens} do not sum to {seq_len}"
        assert set(np.unique(mask)) <= {0, 1}
        non_targets += int((mask == 0).sum())
    for r, k, tokens, mask, last in segments(rows):
        assert mask[0] == 0, f"row {r} segment {k}: its first token is a target (it has no context)"
        # Masked tokens form a prefix: context first, then targets.
        first_target = int(np.argmax(mask)) if mask.any() else len(mask)
        assert not (mask[:first_target]).any() and mask[first_target:].all(), f"row {r} segment {k}: mask {mask}"
        if is_padding(tokens, mask, last, pad_id, len(rows[r][1])):
            padding += len(tokens)
        else:
            n_segments += 1
    assert padding == split_meta["padding_tokens"], (padding, split_meta["padding_tokens"])
    assert non_targets == split_meta["non_target_tokens"], (non_targets, split_meta["non_target_tokens"])
    assert len(rows) == split_meta["rows"]
    m = split_meta
    assert m["non_target_tokens"] == (m["padding_tokens"] + m["document_first_tokens"] + m["repeated_context_tokens"]
                                      + m["lost_target_tokens"]), "non-target causes do not add up"
    return {"padding": padding, "non_targets": non_targets, "segments": n_segments}


def _keys(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """(previous, next) token pairs as sorted int64 keys: a multiset numpy can compare fast."""
    return np.sort(prev.astype(np.int64) * (1 << 32) + nxt.astype(np.int64))


def target_pairs(rows) -> np.ndarray:
    """Multiset of (previous token, target token) over all targets of all rows."""
    prev, nxt = [], []
    for ids, lens, mask in rows:
        t = np.nonzero(mask)[0]
        prev.append(ids[t - 1])
        nxt.append(ids[t])
    return _keys(np.concatenate(prev), np.concatenate(nxt))


def document_pairs(docs) -> np.ndarray:
    """Multiset of (token i-1, token i) for i >= 1 of every document: what must be trained on."""
    return _keys(np.concatenate([d[:-1] for d in docs]), np.concatenate([d[1:] for d in docs]))


def minus(a: np.ndarray, b: np.ndarray) -> Counter:
    """Multiset ``a - b`` as a Counter of (previous, next) pairs (small when the test passes)."""
    ua, ca = np.unique(a, return_counts=True)
    ub, cb = np.unique(b, return_counts=True)
    at = np.minimum(np.searchsorted(ub, ua), max(len(ub) - 1, 0))
    in_b = np.where((len(ub) > 0) & (ub[at] == ua), cb[at], 0) if len(ub) else np.zeros_like(ca)
    diff = ca - in_b
    keep = diff > 0
    return Counter({(int(k >> 32), int(k & 0xFFFFFFFF)): int(d) for k, d in zip(ua[keep], diff[keep])})
