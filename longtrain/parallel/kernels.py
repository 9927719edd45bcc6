"""Block attention kernels that return the log-sum-exp, for ring attention.

One call attends a block of queries to a block of keys of the *same document*, either fully
(every key precedes every query) or causally (the diagonal block, ``Lq == Lk``, same
positions). Ring attention merges the partial results with their log-sum-exp and, in the
backward, passes each block the *final* ``out`` and ``lse``: the flash-attention backward only
needs ``P = exp(S - lse)`` and ``rowsum(dO * O)``, both exact with the merged values
(Dao 2023, FlashAttention-2, Algorithm 2; the same trick as zhuzilin/ring-flash-attention).

Layout (batch 1 is implicit): ``q (H, Lq, D)``, ``k``/``v`` ``(Hkv, Lk, D)`` with ``H % Hkv == 0``
(query head ``h`` uses kv head ``h // (H // Hkv)``, as transformers' ``repeat_kv``);
``out (H, Lq, D)`` in ``q.dtype``, ``lse (H, Lq)`` fp32, natural log.

Kernels, chosen by device, dtype and the run's attention backend (``longtrain.attention_backends``,
``train.attention``; the same choice as the single-device path):
- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its backward op): returns the
  lse and handles GQA itself. We never pass a mask, so no row is fully masked and the
  "lse 0 for a masked row" trap of DESIGN.md section 3 cannot occur.
- CUDA fp16/bf16, backend ``flash_attn``: flash-attn's varlen internals (lazily imported, DESIGN.md:
  optional extra), GQA native.
- CUDA fp16/bf16, backend ``torch_varlen``: torch's own FlashAttention-2 ops
  ``aten._flash_attention_forward/_backward`` (no build step), GQA native. Not ``varlen_attn``: its
  backward ignores the gradient of the lse it returns, and the ring needs a backward that takes the
  *merged* out and lse instead (DESIGN.md section 3).
- CUDA fp16/bf16, backend ``sdpa_loop``: ``aten._scaled_dot_product_flash_attention`` (kv heads repeated).
- anything else (e.g. CUDA fp32): an exact math version, O(H * Lq * Lk) memory.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from longtrain.attention_backends import (aten_flash_block_backward, aten_flash_block_forward, auto_backend,
                                         flash_varlen_fn, one_sequence_cu)

Tensor = torch.Tensor


def block_kernel(q: Tensor, backend: Optional[str] = None) -> str:
    """Which kernel ``block_forward``/``block_backward`` use for ``q``: cpu | flash_attn | torch_varlen | sdpa | math.

    ``backend`` is the run's attention backend (flash_attn | torch_varlen | sdpa_loop; None: ``auto``
    for these tensors)."""
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return "math"
    if backend is None:
        backend = auto_backend(q).name
    if backend == "flash_attn" and _flash_attn() is None:
        raise ValueError("attention backend flash_attn was chosen but flash-attn is not importable")
    return {"flash_attn": "flash_attn", "torch_varlen": "torch_varlen"}.get(backend, "sdpa")


def block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                  kernel: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` over ``k``/``v``; returns ``(out (H, Lq, D), lse (H, Lq) fp32)``.
    ``kernel``: from :func:`block_kernel` (default: its choice for ``q``)."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"a causal block needs Lq == Lk, got {q.shape[1]} and {k.shape[1]}")
    kernel = kernel or block_kernel(q)
    if kernel == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, causal, scale=scale)
        return out[0], lse[0]
    if kernel == "flash_attn":
        return _flash_attn_forward(q, k, v, causal, scale)
    if kernel == "torch_varlen":
        return aten_flash_block_forward(q, k, v, causal, scale)
    if kernel == "sdpa":
        return _torch_cuda_forward(q, k, v, causal, scale)
    return math_forward(q, k, v, causal, scale)


def block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   causal: bool, scale: float, kernel: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq (H, Lq, D), dk (Hkv, Lk, D), dv)`` of a block given the final out/lse."""
    kernel = kernel or block_kernel(q)
    if kernel == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout[None], q[None], k[None], v[None], out[None], lse[None], 0.0, causal, scale=scale)
        return dq[0], dk[0], dv[0]
    if kernel == "flash_attn":
        return _flash_attn_backward(dout, q, k, v, out, lse, causal, scale)
    if kernel == "torch_varlen":
        return aten_flash_block_backward(dout, q, k, v, out, lse, causal, scale)
    if kernel == "sdpa":
        return _torch_cuda_backward(dout, q, k, v, out, lse, causal, scale)
    return math_backward(dout, q, k, v, out, lse, causal, scale)


# ---------------------------------------------------------------------------------------------
# exact math version (reference for tests, and the fallback for dtypes the flash kernels lack)

def _expand_kv(x: Tensor, num_heads: int) -> Tensor:
    return x.repeat_interleave(num_heads // x.shape[0], dim=0)


def _reduce_kv(dx: Tensor, num_kv_heads: int) -> Tensor:
    h, l, d = dx.shape  # (H, L, D) -> (Hkv, L, D): sum the query heads sharing a kv head
    return dx.view(num_kv_heads, h // num_kv_heads, l, d).sum(1)


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    s = torch.matmul(q.float(), _expand_kv(k, q.shape[0]).float().transpose(1, 2)) * scale  # (H, Lq, Lk)
    if causal:
        lq, lk = s.shape[1:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)  # (H, Lq)
    p = torch.exp(s - lse[..., None])
    out = torch.matmul(p, _expand_kv(v, q.shape[0]).float())
    return out.to(q.dtype), lse


def math_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    h, hkv = q.shape[0], k.shape[0]
    p = torch.exp(_scores(q, k, causal, scale) - lse[..., None])  # (H, Lq, Lk)
    do = dout.float()
    dv = torch.matmul(p.transpose(1, 2), do)  # (H, Lk, D)
    dp = torch.matmul(do, _expand_kv(v, h).float().transpose(1, 2))  # (H, Lq, Lk)
    delta = (do * out.float()).sum(-1, keepdim=True)  # (H, Lq, 1) = rowsum(dO * O)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, _expand_kv(k, h).float())
    dk = torch.matmul(ds.transpose(1, 2), q.float())
    return dq.to(q.dtype), _reduce_kv(dk, hkv).to(k.dtype), _reduce_kv(dv, hkv).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# CUDA: flash-attn varlen (one sequence per call); torch's SDPA flash kernel (torch_varlen: attention_backends)

@functools.lru_cache(maxsize=1)
def _flash_attn():
    # The same availability test as the single-device path (transformers' check of the installed
    # version), so ring and document attention never disagree on whether flash-attn is usable.
    if flash_varlen_fn() is None:  # optional extra: pip install longtrain[flash]
        return None
    from flash_attn import flash_attn_interface

    return flash_attn_interface


_cu = one_sequence_cu  # cu_seqlens [0, n] of one block, cached per (n, device)


def _flash_attn_forward(q, k, v, causal, scale):
    fa = _flash_attn()
    lq, lk = q.shape[1], k.shape[1]
    # flash-attn varlen layout is (total_tokens, heads, dim); lse comes back as (heads, total)
    out, lse, _, _ = fa._flash_attn_varlen_forward(
        q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
        _cu(lq, q.device), _cu(lk, q.device), lq, lk, 0.0, scale, causal)
    return out.transpose(0, 1), lse.float()


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    fa = _flash_attn()
    lq, lk = q.shape[1], k.shape[1]
    qt, kt, vt = (x.transpose(0, 1).contiguous() for x in (q, k, v))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    fa._flash_attn_varlen_backward(
        dout.transpose(0, 1).contiguous(), qt, kt, vt, out.transpose(0, 1).contiguous(), lse.contiguous(),
        dq, dk, dv, _cu(lq, q.device), _cu(lk, q.device), lq, lk, 0.0, scale, causal,
        -1, -1, 0.0, None, False)
    return dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1)


def _torch_cuda_forward(q, k, v, causal, scale):
    h = q.shape[0]
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q[None], _expand_kv(k, h)[None], _expand_kv(v, h)[None], 0.0, causal, False, scale=scale)
    return res[0][0], res[1][0].float()


def _torch_cuda_backward(dout, q, k, v, out, lse, causal, scale):
    h, hkv, lq, lk = q.shape[0], k.shape[0], q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    empty: Optional[Tensor] = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout[None], q[None], ke[None], ve[None], out[None], lse[None], empty, empty, lq, lk, 0.0,
        causal, empty, empty, scale=scale)
    return dq[0], _reduce_kv(dk[0], hkv), _reduce_kv(dv[0], hkv)
