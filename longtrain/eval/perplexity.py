"""Perplexity by position at a given context length.

A window is ``length`` consecutive tokens of one document, fed at positions 0..length-1. The
output at position ``p`` predicts token ``p + 1`` of the window, so a window has ``length - 1``
predictions and "position p" means a prediction made with ``p + 1`` tokens of context.

Two ways to cut documents (``plan_windows``):
- chunks (``stride=None``): windows start every ``length - 1`` tokens (consecutive windows share
  one token, so every target token up to the last full window is scored exactly once); the tail
  shorter than a window is dropped;
- sliding window (``stride=S``, as in Press et al. 2022, the PI paper (Chen et al. 2023) and YaRN
  (Peng et al. 2023)): windows start every ``S`` tokens and score only the targets no earlier window
  scored (the last ``S`` positions); a last window aligned on the document end scores the tail. Every
  token but the first of each document is scored exactly once, each with at least ``length - S``
  tokens of context (except in the first window).

Losses are computed from the final hidden states ``chunk_rows`` positions at a time, so the
``(length, vocab)`` logits never exist at once (DESIGN.md section 3: the logits dominate memory).
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from longtrain.loss import lm_cross_entropy, logit_softcap
from longtrain.eval.errors import EvalError


LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits computed at once


@dataclasses.dataclass(frozen=True)
class Window:
    doc: int  # document index
    begin: int  # first token of the window in the document
    first_scored: int  # positions first_scored .. length-2 are scored


def plan_windows(n_tokens: int, length: int, stride: int | None = None, doc: int = 0) -> list[Window]:
    """Windows of ``length`` tokens over a document of ``n_tokens`` (none when it is shorter)."""
    if length < 2:
        raise EvalError(f"length {length}: need at least 2 tokens per window")
    if stride is not None and not 1 <= stride <= length - 1:
        raise EvalError(f"--stride {stride}: must be between 1 and length - 1 = {length - 1}")
    if n_tokens < length:
        return []
    step = length - 1 if stride is None else stride
    begins = range(0, n_tokens - length + 1, step)
    windows = [Window(doc, b, 0 if i == 0 else length - 1 - step) for i, b in enumerate(begins)]
    last_target = begins[-1] + length - 1  # index of the last token scored so far
    if stride is not None and last_target < n_tokens - 1:
        begin = n_tokens - length  # aligned on the end: scores the remaining tail only
        windows.append(Window(doc, begin, last_target - begin))
    return windows


def token_nll(model: nn.Module, input_ids: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Per-position negative log-likelihood (B, L-1), fp32, of ``input_ids`` (B, L).

    Calls the decoder once and the LM head on ``chunk_rows`` positions (all rows of the batch) at a
    time. Own code instead of ``model(...).logits``: that returns all (B, L, vocab) logits at once.
    The logits -> loss step is training's (``longtrain.loss.lm_cross_entropy``, with the model's
    soft-capping if any), per position instead of summed.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, E)
    lm_head = model.get_output_embeddings()
    cap = logit_softcap(model.config)
    batch, length = input_ids.shape
    targets = input_ids[:, 1:]  # (B, L-1)
    out = torch.empty(batch, length - 1, dtype=torch.float32, device=input_ids.device)
    step = max(1, chunk_rows // batch)
    for s in range(0, length - 1, step):
        e = min(s + step, length - 1)
        out[:, s:e] = lm_cross_entropy(hidden[:, s:e], lm_head, targets[:, s:e], cap, reduction="none")  # (B, c)
    return out


def check_chunked_loss(model: nn.Module, vocab_size: int, n: int = 16) -> None:
    """Refuse an architecture whose logits are not ``lm_head(last_hidden_state)`` (extra scaling we
    do not know of): compares ``token_nll`` with the model's own logits on ``n`` tokens."""
    device = next(model.parameters()).device
    ids = torch.arange(n, device=device).remainder(vocab_size)[None]  # (1, n)
    with torch.no_grad():
        ours = token_nll(model, ids)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (1, n, V): tiny
        ref = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    # bf16 / fp16 matmuls of different shapes round differently: a looser bound there
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(ours[0], ref, rtol=tol, atol=tol):
        raise EvalError(f"{type(model).__name__}: its logits are not lm_head(hidden states); "
                         f"eval's chunked loss does not support this architecture")


@dataclasses.dataclass
class PositionStats:
    """Sums of NLL and counts per position 0..length-1 (fp64 to sum millions of tokens exactly)."""

    nll_sum: np.ndarray
    count: np.ndarray

    @classmethod
    def zeros(cls, length: int) -> "PositionStats":
        return cls(np.zeros(length, dtype=np.float64), np.zeros(length, dtype=np.int64))

    def add(self, nll: np.ndarray, first_scored: int) -> None:
        """Add one window's per-position NLL (length-1,), scoring positions >= first_scored."""
        self.nll_sum[first_scored:len(nll)] += nll[first_scored:]
        self.count[first_scored:len(nll)] += 1

    def range(self, start: int, end: int) -> dict:
        """Token-weighted perplexity of positions [start, end): exp(sum NLL / tokens)."""
        tokens = int(self.count[start:end].sum())
        mean = float(self.nll_sum[start:end].sum()) / tokens if tokens else None
        if mean is not None and not math.isfinite(mean):
            mean = None  # a broken model (NaN weights): JSON has no NaN, report null
        ppl = math.exp(min(mean, 700.0)) if mean is not None else None  # exp(710) overflows
        return {"start": start, "end": end, "ppl": ppl, "nll": mean, "tokens": tokens}

    def buckets(self, size: int) -> list[dict]:
        length = len(self.count)
        return [self.range(s, min(s + size, length)) for s in range(0, length, size)]


def _batches(windows: list[Window], batch_size: int):
    for i in range(0, len(windows), batch_size):
        yield windows[i:i + batch_size]


def limit_windows(windows: list[Window], length: int, max_tokens: int | None) -> list[Window]:
    """The first windows, in order, until ``max_tokens`` targets are scored (None: all)."""
    if max_tokens is None:
        return windows
    kept, scored = [], 0
    for w in windows:
        if scored >= max_tokens:
            break
        kept.append(w)
        scored += length - 1 - w.first_scored
    return kept


@torch.no_grad()
def perplexity_at_length(model: nn.Module, docs: list[np.ndarray], length: int, *,
                         stride: int | None = None, bucket_size: int | None = None,
                         max_tokens: int | None = None, batch_tokens: int = 8192,
                         chunk_rows: int | None = None, progress: bool = True, desc: str = "") -> dict:
    """Perplexity of ``model`` on ``docs`` at context ``length``: overall, long-range ([L/4, L),
    DESIGN.md 3b trap a: the first positions are context-starved) and per position bucket."""
    windows = [w for i, d in enumerate(docs) for w in plan_windows(len(d), length, stride, doc=i)]
    if not windows:
        longest = max((len(d) for d in docs), default=0)
        raise EvalError(f"length {length}: no document has {length} tokens (longest: {longest}); "
                         f"use shorter --lengths or longer documents")
    windows = limit_windows(windows, length, max_tokens)
    bucket_size = bucket_size or max(1, length // 16)
    device = next(model.parameters()).device
    stats, start = PositionStats.zeros(length), time.perf_counter()
    batch_size = max(1, batch_tokens // length)
    # fp32 logits of one chunk within LOGITS_BUDGET: 2048 positions at vocab 32k, 441 at 152k
    chunk_rows = chunk_rows or max(64, LOGITS_BUDGET // (4 * model.config.vocab_size))
    bar = tqdm(total=len(windows), desc=desc or f"ppl@{length}", unit="win", disable=not progress)
    for batch in _batches(windows, batch_size):
        ids = np.stack([docs[w.doc][w.begin:w.begin + length] for w in batch])  # (B, L)
        nll = token_nll(model, torch.from_numpy(ids).to(device), chunk_rows).cpu().numpy()  # (B, L-1)
        for w, row in zip(batch, nll):
            stats.add(row.astype(np.float64), w.first_scored)
        bar.update(len(batch))
    bar.close()
    overall = stats.range(0, length)
    return {
        "length": length, "ppl": overall["ppl"], "nll": overall["nll"], "tokens": overall["tokens"],
        "long_range": stats.range(length // 4, length),
        "buckets": [{k: b[k] for k in ("start", "end", "ppl", "tokens")} for b in stats.buckets(bucket_size)],
        "windows": len(windows), "documents": len({w.doc for w in windows}),
        "stride": stride, "bucket_size": bucket_size, "seconds": round(time.perf_counter() - start, 3),
    }
