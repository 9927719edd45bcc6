"""Ring attention with zigzag load balancing, exact on packed multi-document rows.

Layout: the padded packed row of ``T`` tokens is cut into ``2P`` chunks of ``C = T / 2P``;
SP rank ``r`` holds chunks ``r`` and ``2P-1-r`` (zigzag; the causal work per rank is then
equal, Brandon et al. 2023 "Striped Attention" / zhuzilin/ring-flash-attention "zigzag").
Local token ``i`` of rank ``r`` is global token ``r*C + i`` for ``i < C`` and
``(2P-1-r)*C + i - C`` otherwise (``sharding.local_token_index``).

Forward: at step ``s`` rank ``r`` holds the K/V of rank ``(r - s) mod P`` and attends its
queries to it, while that block is already travelling to rank ``r + 1``. Partial results are
merged with their log-sum-exp. Backward (standard ring backward): dq accumulates locally;
the dK/dV of a block travel around the ring with the block and arrive back at its owner after
``P`` hops.

Documents: a K/V block contributes to a query only when both are in the same document and the
key is at an earlier or equal global position. Because documents and chunks are contiguous
ranges of the global row, every (query chunk, key chunk) pair reduces to a few dense kernel
calls without any mask (``ring_plan``):
- same chunk: one causal call per document piece in the chunk;
- query chunk after key chunk: at most one document spans both chunks (the one holding the
  first token of the query chunk); it is attended fully (every such key precedes every query);
- query chunk before key chunk: nothing.
No ``[L, L]`` mask is ever built (at 32k tokens and SP=2 a float mask would be 1 GiB a layer).
"""
from __future__ import annotations

import bisect
import functools
from typing import NamedTuple

import torch

from .comm import RingExchange
from .kernels import block_backward, block_forward, block_kernel
from .sharding import zigzag_chunks
from .state import ParallelState

Tensor = torch.Tensor


class Block(NamedTuple):
    """One kernel call in local coordinates: query rows [q_lo, q_hi) x key rows [k_lo, k_hi)."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool


def _pair_blocks(cu: tuple[int, ...], chunk: int, qc: int, q_off: int, kc: int, k_off: int) -> list[Block]:
    """Blocks for query chunk ``qc`` (local offset ``q_off``) x key chunk ``kc`` (offset ``k_off``)."""
    if qc < kc:
        return []
    q_start, k_start = qc * chunk, kc * chunk
    if qc == kc:
        blocks = []
        d = bisect.bisect_right(cu, q_start) - 1  # document holding the chunk's first token
        while d < len(cu) - 1 and cu[d] < q_start + chunk:
            lo, hi = max(cu[d], q_start) - q_start, min(cu[d + 1], q_start + chunk) - q_start
            blocks.append(Block(q_off + lo, q_off + hi, k_off + lo, k_off + hi, True))
            d += 1
        return blocks
    d = bisect.bisect_right(cu, q_start) - 1
    doc_start, doc_end = cu[d], cu[d + 1]
    if doc_start >= k_start + chunk:  # the document starts after the key chunk ends
        return []
    q_hi = min(doc_end, q_start + chunk) - q_start
    k_lo = max(doc_start, k_start) - k_start
    return [Block(q_off, q_off + q_hi, k_off + k_lo, k_off + chunk, False)]


@functools.lru_cache(maxsize=16)  # the same plan serves every layer of a forward and backward
def ring_plan(cu_seqlens: tuple[int, ...], sp_size: int, sp_rank: int) -> tuple[tuple[Block, ...], ...]:
    """Per ring step ``s``, the blocks of rank ``sp_rank`` against the K/V of rank ``sp_rank - s``.

    ``cu_seqlens``: global cumulative segment lengths of the padded row (0 ... T), ``T``
    divisible by ``2 * sp_size``.
    """
    total = cu_seqlens[-1]
    if cu_seqlens[0] != 0 or total % (2 * sp_size) != 0:
        raise ValueError(f"ring attention needs cu_seqlens from 0 to T with T divisible by 2*sp_size="
                         f"{2 * sp_size}, got T={total} (shard_batch pads T; pass the sharded batch's cu_seqlens)")
    chunk = total // (2 * sp_size)
    q_chunks = zigzag_chunks(sp_size, sp_rank)
    plan = []
    for step in range(sp_size):
        k_chunks = zigzag_chunks(sp_size, (sp_rank - step) % sp_size)
        blocks = []
        for qi, qc in enumerate(q_chunks):
            for ki, kc in enumerate(k_chunks):
                blocks += _pair_blocks(cu_seqlens, chunk, qc, qi * chunk, kc, ki * chunk)
        plan.append(tuple(blocks))
    return tuple(plan)


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor, lo: int, hi: int) -> None:
    """Fold a partial result for rows [lo, hi) into the running (out (H, L, D) fp32, lse (H, L))."""
    old = lse[:, lo:hi]
    new = torch.logaddexp(old, block_lse)  # old may be -inf (no block yet): exp(-inf) = 0 below
    out[:, lo:hi] = (out[:, lo:hi] * torch.exp(old - new)[..., None]
                     + block_out.float() * torch.exp(block_lse - new)[..., None])
    lse[:, lo:hi] = new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan, state: ParallelState, scale: float,
                kernel: str) -> Tensor:
        # q (H, L, D); k, v (Hkv, L, D) -> out (H, L, D); kernel: kernels.block_kernel's choice
        ring = _ring(state)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])  # (2, Hkv, L, D): one message per step
        for step, blocks in enumerate(plan):
            pending = ring(0).start([kv]) if step < len(plan) - 1 else None
            for b in blocks:
                o, l = block_forward(q[:, b.q_lo:b.q_hi], kv[0, :, b.k_lo:b.k_hi], kv[1, :, b.k_lo:b.k_hi],
                                     b.causal, scale, kernel)
                _merge(out, lse, o, l, b.q_lo, b.q_hi)
            if pending is not None:
                kv = pending.wait()[0]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.state, ctx.scale, ctx.kernel = plan, state, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring, plan, scale = _ring(ctx.state), ctx.plan, ctx.scale
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # grads of the block we hold
        for step, blocks in enumerate(plan):
            pending_kv = ring(1).start([kv]) if step < len(plan) - 1 else None
            for b in blocks:
                rows, cols = slice(b.q_lo, b.q_hi), slice(b.k_lo, b.k_hi)
                g_q, g_k, g_v = block_backward(dout[:, rows], q[:, rows], kv[0, :, cols], kv[1, :, cols],
                                               out[:, rows], lse[:, rows], b.causal, scale, ctx.kernel)
                dq[:, rows] += g_q
                dkv[0, :, cols] += g_k
                dkv[1, :, cols] += g_v
            # the block's gradient follows the block; after P hops it is back at its owner
            pending_dkv = ring(2).start([dkv]) if len(plan) > 1 else None
            if pending_kv is not None:
                kv = pending_kv.wait()[0]
            if pending_dkv is not None:
                dkv = pending_dkv.wait()[0]
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def _ring(state: ParallelState):
    group = state.require_group()
    nxt, prv = state.sp_global_rank(state.sp_rank + 1), state.sp_global_rank(state.sp_rank - 1)
    return lambda tag: RingExchange(group, nxt, prv, tag=tag)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, state: ParallelState,
                   scale: float, backend: str | None = None) -> Tensor:
    """Exact document-masked causal attention of this rank's zigzag slice.

    q: (1, H, L, D), k/v: (1, Hkv, L, D) with ``L = T / sp_size`` local tokens (zigzag order);
    ``cu_seqlens``: the *global* cumulative segment lengths (0 ... T). Returns (1, L, H, D).
    ``backend``: the run's attention backend (flash_attn | torch_varlen | sdpa_loop), which picks the
    block kernel (``kernels.block_kernel``); None: ``auto`` for these tensors.
    """
    if q.shape[0] != 1:
        raise ValueError(f"ring attention expects one packed row (batch 1), got batch {q.shape[0]}")
    host_cu = tuple(int(x) for x in cu_seqlens.tolist())  # one device-to-host copy (a GPU sync) per call
    total = host_cu[-1]
    if total != q.shape[2] * state.sp_size:
        raise ValueError(f"cu_seqlens ends at {total} but {state.sp_size} ranks x {q.shape[2]} local tokens "
                         f"= {q.shape[2] * state.sp_size}: pass the global cu_seqlens of the sharded batch")
    plan = ring_plan(host_cu, state.sp_size, state.sp_rank)
    out = _RingAttention.apply(q[0], k[0], v[0], plan, state, scale, block_kernel(q, backend))  # (H, L, D)
    return out.transpose(0, 1).unsqueeze(0)
