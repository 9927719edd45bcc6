"""Chunked cross-entropy: the sum of token losses without ever holding [T, vocab] logits for backward,
and the logits -> cross-entropy step it shares with eval's per-position losses (``lm_cross_entropy``).

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


def logit_softcap(config) -> float | None:
    """A model's final-logit soft-capping (Gemma-2: ``cap * tanh(logits / cap)``), ``None`` without
    (Llama / Qwen2 / Mistral)."""
    return getattr(config, "final_logit_softcapping", None) or None


def lm_cross_entropy(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, softcap: float | None = None,
                     reduction: str = "sum") -> torch.Tensor:
    """The one logits -> cross-entropy step of training and eval, for one chunk of positions.

    hidden (..., E), labels (...) with IGNORE_INDEX for non-targets -> a 0-d fp32 sum over targets
    (``reduction="sum"``, training; 0 when there are none, never NaN) or per-position fp32 losses shaped
    like ``labels`` (``reduction="none"``, eval; 0 where ignored). Logits are upcast to fp32 before
    the log-softmax (bf16 over a large vocabulary loses precision), then soft-capped when the model
    caps them (Gemma-2's ``final_logit_softcapping``, applied by its own forward after ``lm_head``; in
    fp32 here). Without soft-capping, training's ops are exactly those of a plain chunked CE.
    """
    logits = lm_head(hidden).float()  # (..., V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction=reduction)
    return losses if reduction == "sum" else losses.view(labels.shape)


def chunked_lm_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                        chunk_size: int, softcap: float | None = None) -> torch.Tensor:
    """Sum over targets of token cross-entropy. hidden (1, T, E), labels (1, T) already shifted -> 0-d fp32.

    ``lm_head`` is called as a module (so ZeRO-3 gathers its weight), once per chunk on every rank even
    for chunks without targets: ranks must make the same number of calls (ZeRO-3 gathers are
    collective). A call without any target returns an exact 0 that still backpropagates (zero
    gradients, no NaN), as DeepSpeed's backward needs a loss attached to the graph. ``softcap``: the
    model's ``logit_softcap(config)``; a Gemma-2-style model trains on its soft-capped logits, as its
    own forward computes them (None for Llama / Qwen2 / Mistral: bitwise the plain chunked CE).
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
        part = checkpoint(lm_cross_entropy, flat_hidden[start:start + chunk_size],
                          lm_head, flat_labels[start:start + chunk_size], softcap, use_reentrant=False)
        total = part if total is None else total + part
    return total
