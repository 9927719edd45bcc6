"""Rows of the dataset contract -> one flattened packed micro-batch (docs/internals.md).

B rows of ``seq_len`` tokens become one sequence of ``T = B * seq_len`` tokens (batch dimension 1),
as transformers' ``DataCollatorWithFlattening`` does; every row boundary is a segment boundary.
Labels are shifted here, before anything else (sequence parallelism slices them like the
inputs, so no target is lost at a slice boundary; DESIGN.md section 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass
class PackedBatch:
    input_ids: torch.LongTensor  # (1, T)
    position_ids: torch.LongTensor  # (1, T), restart at 0 at every segment start
    labels: torch.LongTensor  # (1, T), labels[t] = input_ids[t+1] when t+1 is in the same segment and
    #                           loss_mask[t+1] == 1, else -100
    cu_seqlens: torch.IntTensor  # (n_segments + 1,), int32, 0 ... T
    max_seqlen: int  # longest segment
    num_targets: int  # (labels != -100).sum()


def _row_arrays(row: Mapping[str, Any], i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's (input_ids, doc_lens, loss_mask) as int64 arrays, validated against the dataset contract."""
    missing = [k for k in ("input_ids", "doc_lens", "loss_mask") if k not in row]
    if missing:
        raise ValueError(f"micro-batch row {i} lacks column(s) {missing}; rows need input_ids, doc_lens and "
                         f"loss_mask (DESIGN.md section 2: was the dataset prepared by `longtrain prepare`?)")
    arrays = []
    for key in ("input_ids", "doc_lens", "loss_mask"):
        arr = np.asarray(row[key])
        if arr.ndim != 1 or arr.size == 0 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"micro-batch row {i}: {key} must be a non-empty 1-D list of integers, got "
                             f"dtype {arr.dtype} shape {arr.shape}")
        arrays.append(arr.astype(np.int64))
    ids, lens, mask = arrays
    if ids.min() < 0:
        raise ValueError(f"micro-batch row {i}: input_ids has a negative id ({ids.min()})")
    if len(mask) != len(ids):
        raise ValueError(f"micro-batch row {i}: loss_mask has {len(mask)} items but input_ids has {len(ids)}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"micro-batch row {i}: loss_mask must hold only 0 and 1, got {sorted(set(mask.tolist()))}")
    if lens.min() <= 0:
        raise ValueError(f"micro-batch row {i}: doc_lens must all be >= 1, got {lens.tolist()}")
    if lens.sum() != len(ids):
        raise ValueError(f"micro-batch row {i}: sum(doc_lens) = {lens.sum()} but the row has {len(ids)} tokens "
                         f"(doc_lens={lens.tolist()})")
    return ids, lens, mask


def make_packed_batch(rows: Sequence[Mapping[str, Any]]) -> PackedBatch:
    """Flatten rows (dicts with ``input_ids``, ``doc_lens``, ``loss_mask``; lists or numpy arrays) into one row."""
    if len(rows) == 0:
        raise ValueError("make_packed_batch needs at least one row")
    parts = [_row_arrays(row, i) for i, row in enumerate(rows)]
    ids = np.concatenate([p[0] for p in parts])  # (T,)
    lens = np.concatenate([p[1] for p in parts])  # (n_segments,)
    mask = np.concatenate([p[2] for p in parts])  # (T,)
    total = len(ids)
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    starts = np.zeros(total, dtype=bool)  # (T,) True at the first token of each segment
    starts[cu[:-1]] = True
    # Shift first: the target of t is token t+1, unless t+1 opens a segment (another document, or the
    # row's padding) or is masked out. The last token of the flattened row has no target.
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    keep = (~starts[1:]) & (mask[1:] == 1)
    labels[:-1] = np.where(keep, ids[1:], IGNORE_INDEX)
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lens)  # (T,) 0 at every segment start
    return PackedBatch(
        input_ids=torch.from_numpy(ids).unsqueeze(0),
        position_ids=torch.from_numpy(positions).unsqueeze(0),
        labels=torch.from_numpy(labels).unsqueeze(0),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(lens.max()),
        num_targets=int(keep.sum()),
    )


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.LongTensor:
    """(T,) index of the segment each token belongs to, from ``cu_seqlens`` (n_segments + 1,) ending at ``total``."""
    cu = cu_seqlens.to(torch.long)
    if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={total}, got {cu_seqlens.tolist()}")
    lengths = cu.diff()
    if (lengths <= 0).any():
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
