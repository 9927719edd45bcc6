"""Cut a packed micro-batch into this rank's sequence-parallel slice.

Every SP rank of a group builds the same ``PackedBatch`` from the same dataset rows: the token
ids, labels and positions of a row are a few bytes per token, so reading them on every rank
is cheap, and slicing them here is what keeps each rank's *activations* (hidden states,
attention inputs, logits: kilobytes per token) to its own slice. Nothing else of another
rank's slice is materialised except what the attention algorithm itself exchanges (heads in
Ulysses, K/V blocks in ring).

Labels were shifted before sharding (``batching.make_packed_batch``), so a target whose input
token sits at the last position of one slice is kept by that slice: no target is lost at a
slice boundary (DESIGN.md section 5). The *global* ``cu_seqlens`` stay with every slice: the
attention needs the whole document layout, and the ring derives each rank's global token
positions from ``T = cu_seqlens[-1]``, ``sp_size`` and ``sp_rank`` (``local_token_index``).
"""
from __future__ import annotations

import dataclasses

import torch

from longtrain.batching import IGNORE_INDEX
from longtrain.config import SP_MODES

from .state import ParallelState

MODES = SP_MODES  # one list: the run config validates stages.N.sp_mode against it


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"sequence-parallel mode must be one of {MODES}, got {mode!r}")


def shard_multiple(sp_size: int, mode: str) -> int:
    """``T`` must be a multiple of this: ``sp_size`` slices (Ulysses) or ``2 * sp_size`` chunks (ring)."""
    check_mode(mode)
    if sp_size == 1:
        return 1
    return sp_size if mode == "ulysses" else 2 * sp_size


def padded_length(total: int, sp_size: int, mode: str) -> int:
    m = shard_multiple(sp_size, mode)
    return -(-total // m) * m


def zigzag_chunks(sp_size: int, sp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of ``2 * sp_size``) that SP rank ``sp_rank`` holds under the ring's
    causal load balancing: an early chunk and its mirror, so every rank gets the same attention work."""
    return sp_rank, 2 * sp_size - 1 - sp_rank


def local_token_index(total: int, sp_size: int, sp_rank: int, mode: str) -> torch.Tensor:
    """Global positions (in the padded row of ``total`` tokens) of this rank's local tokens, (L,)."""
    check_mode(mode)
    if total % shard_multiple(sp_size, mode) != 0:
        raise ValueError(f"T={total} is not a multiple of {shard_multiple(sp_size, mode)}: pad it first")
    if mode == "ulysses" or sp_size == 1:
        size = total // sp_size
        return torch.arange(sp_rank * size, (sp_rank + 1) * size)
    chunk = total // (2 * sp_size)
    first, second = zigzag_chunks(sp_size, sp_rank)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


def pad_batch(batch, multiple: int, pad_token_id: int = 0):
    """Append ``(-T) % multiple`` masked tokens as one extra segment (label -100, positions 0..n-1).

    The padding is its own document, so it attends only to itself and nothing attends to it;
    with label -100 it adds no target. Returns the batch unchanged when no padding is needed.
    """
    total = batch.input_ids.shape[1]
    n = (-total) % multiple
    if n == 0:
        return batch

    def extend(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, values.to(t.dtype).view(1, n)], dim=1)

    cu = batch.cu_seqlens
    return dataclasses.replace(
        batch,
        input_ids=extend(batch.input_ids, torch.full((n,), pad_token_id)),
        position_ids=extend(batch.position_ids, torch.arange(n)),
        labels=extend(batch.labels, torch.full((n,), IGNORE_INDEX)),
        cu_seqlens=torch.cat([cu, cu.new_tensor([total + n])]),
        max_seqlen=max(int(batch.max_seqlen), n),
    )


def num_padding_tokens(total: int, sp_size: int, mode: str) -> int:
    """How many masked tokens ``shard_batch`` appends to a row of ``total`` tokens (for logging)."""
    return padded_length(total, sp_size, mode) - total


def shard_batch(batch, state: ParallelState, mode: str, pad_token_id: int = 0):
    """This SP rank's slice of a packed micro-batch (a ``PackedBatch``, batch dimension 1).

    ``input_ids``, ``position_ids`` and ``labels`` become ``(1, T_pad / sp_size)``;
    ``cu_seqlens`` / ``max_seqlen`` describe the *global* padded row; ``num_targets`` counts
    this slice's targets (the global count is the unsharded batch's ``num_targets``; padding adds
    none). With ``sp_size == 1`` the batch is returned unchanged.
    """
    check_mode(mode)
    if batch.input_ids.dim() != 2 or batch.input_ids.shape[0] != 1:
        raise ValueError(f"shard_batch expects a flattened packed batch of shape (1, T), "
                         f"got input_ids of shape {tuple(batch.input_ids.shape)}")
    if state.sp_size == 1:
        return batch
    padded = pad_batch(batch, shard_multiple(state.sp_size, mode), pad_token_id)
    total = padded.input_ids.shape[1]
    index = local_token_index(total, state.sp_size, state.sp_rank, mode).to(padded.input_ids.device)
    labels = padded.labels.index_select(1, index)
    return dataclasses.replace(
        padded,
        input_ids=padded.input_ids.index_select(1, index),
        position_ids=padded.position_ids.index_select(1, index),
        labels=labels,
        num_targets=int((labels != IGNORE_INDEX).sum()),
    )
