"""Chunked cross-entropy: the sum of token losses without ever holding [T, vocab] logits for backward.

At long lengths the logits dominate memory (DESIGN.md section 3: 10.8 GB -> 1.9 GB at 16k tokens
with checkpointing + a tiled loss). Each chunk of ``chunk_size`` tokens computes its logits, upcasts
them to fp32 and reduces them to a scalar under non-reentrant activation checkpointing, so only the
chunk's hidden states are kept; backward recomputes one chunk's logits at a time.

Why not DeepSpeed's ``TiledFusedLogitsLoss``: it assumes the incoming gradient is exactly 1.0
(DESIGN.md section 3, (b)); our trainer scales the loss before backward (docs/internals.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longtrain.batching import IGNORE_INDEX


def default_chunk_tokens(vocab_size: int, logits_bytes: int = 64 * 2**20) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about ``logits_bytes`` (a power of two,
    at least 128): the chunk's logits, their gradient and the softmax live at once in backward, so
    a fixed byte budget, not a fixed token count, keeps the loss's memory flat across vocabularies.
    64 MiB is 512 tokens at vocab 32k: still a large matmul, and a small fraction of the memory of
    one decoder layer's recomputation at long lengths (measured: benchmarks/bench_train.py)."""
    tokens = max(128, logits_bytes // (4 * max(1, vocab_size)))
    return 1 << (tokens.bit_length() - 1)


def _chunk_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """hidden (n, E), labels (n,) -> 0-d fp32 sum of CE over targets (0 when there are none, never NaN)."""
    logits = lm_head(hidden).float()  # (n, V), upcast: bf16 log-softmax over a large vocab loses precision
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                        chunk_size: int) -> torch.Tensor:
    """Sum over targets of token cross-entropy. hidden (1, T, E), labels (1, T) already shifted -> 0-d fp32.

    ``lm_head`` is called as a module (so ZeRO-3 gathers its weight), once per chunk on every rank even
    for chunks without targets: ranks must make the same number of calls (ZeRO-3 gathers are
    collective). A call without any target returns an exact 0 that still backpropagates (zero
    gradients, no NaN), as DeepSpeed's backward needs a loss attached to the graph.
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"hidden must be (1, T, E) and labels (1, T), got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size (train.loss_chunk_tokens) must be a positive int, got {chunk_size!r}")
    if hidden.shape[1] == 0:
        raise ValueError("hidden has no tokens (T = 0)")
    if labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 (torch.long), got {labels.dtype}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (T, E)
    flat_labels = labels.reshape(-1)  # (T,)
    total = None
    for start in range(0, flat_labels.shape[0], chunk_size):
        part = checkpoint(_chunk_ce_sum, flat_hidden[start:start + chunk_size], flat_labels[start:start + chunk_size],
                          lm_head, use_reentrant=False)
        total = part if total is None else total + part
    return total
