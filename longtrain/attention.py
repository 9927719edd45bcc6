"""Document-masked causal attention, registered with transformers through its public interfaces.

A packed row holds several documents (segments); a token attends only to earlier tokens of its
own segment. Segment boundaries come from ``cu_seqlens`` (``longtrain.batching``), never from a
``T x T`` mask. The kernel is one of three backends (``longtrain.attention_backends``; chosen once at
start-up by ``longtrain.engine.loss_module`` from ``train.attention``, the device, the dtype and what
is installed, and handed to every layer with the document layout):

- ``flash_attn`` / ``torch_varlen`` (CUDA, fp16/bf16): one FlashAttention varlen kernel for the whole
  row, GQA native, sliding windows through ``window_size``: flash-attn's ``flash_attn_varlen_func``
  when installed, else torch's built-in ``varlen_attn`` (no build step).
- ``sdpa_loop`` (CPU, fp32 anywhere): an exact loop of causal ``scaled_dot_product_attention`` over
  the segments. On 2 CPU cores it is 4-10x faster than sdpa with an explicit block-diagonal mask
  (``benchmarks/bench_attention.py``; DESIGN.md section 3) and its memory is O(T), not O(T^2).
  Grouping equal-length segments into one batched call was measured slower (0.62 s vs 0.34 s
  fwd+bwd for 4 x 1024 tokens; 1.2 s vs 0.09 s for 256 x 16), so we don't.

Registration (DESIGN.md section 3): ``AttentionInterface.register`` for the attention and
``AttentionMaskInterface.register`` for a mask function that builds no mask (it only refuses padding
masks, which this attention could not honour). The model forward must carry the layout:
``model.model(..., use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m,
attention_backend=backend)`` (the backend is optional: without it, ``auto`` for the tensors at hand).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from longtrain import attention_backends as backends
from longtrain.attention_backends import AttentionBackend, auto_backend, check_fits

ATTENTION_NAME = "longtrain"

# flash_attn_varlen_func(q (T,H,D), k (T,Hkv,D), v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
#                        dropout_p=, softmax_scale=, causal=, window_size=) -> (T,H,D)
VarlenFn = Callable[..., torch.Tensor]


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend ``auto`` picks for inputs on ``device`` of ``dtype`` (flash_attn | torch_varlen | sdpa_loop)."""
    return backends.select_backend("auto", device, dtype).name


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.ndim != 4 or q.shape[0] != 1:
        raise ValueError(f"document attention expects one packed row: q (1, H, T, D), got {tuple(q.shape)} "
                         "(make_packed_batch flattens a micro-batch into batch size 1)")
    if k.shape != v.shape or k.shape[0] != 1 or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k and v must be (1, Hkv, T, D) like q {tuple(q.shape)}, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor (n_segments + 1,), got {cu_seqlens!r}")


def _segment_lengths(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> list[int]:
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0 or cu[-1] != total or min(lengths) <= 0:
        raise ValueError(f"cu_seqlens must rise strictly from 0 to T={total}, got {cu[:8]}...{cu[-2:]} "
                         f"({len(cu)} items)")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} but the longest segment has {max(lengths)} tokens")
    return lengths


def _windowed_causal(q, k, v, scaling: float, dropout: float, window: int) -> torch.Tensor:
    """One segment with a sliding window (token i sees j in (i - window, i], as transformers' mask).

    Queries go in blocks of ``window``; each block sees at most ``2 * window - 1`` keys, so the mask
    is at most window x 2 window, never L x L. q (1, H, L, D), k/v (1, Hkv, L, D) -> (1, H, L, D).
    """
    length, outs = q.shape[2], []
    for a in range(0, length, window):
        b, s = min(a + window, length), max(0, a - window + 1)
        qi = torch.arange(a, b, device=q.device)[:, None]
        kj = torch.arange(s, b, device=q.device)[None, :]
        allowed = (kj <= qi) & (kj > qi - window)  # (b - a, b - s)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, s:b], v[:, :, s:b], attn_mask=allowed, dropout_p=dropout, scale=scaling,
            enable_gqa=q.shape[1] != k.shape[1]))
    return torch.cat(outs, dim=2)


def _sdpa_documents(q, k, v, lengths: list[int], scaling: float, dropout: float,
                    sliding_window: int | None) -> torch.Tensor:
    """Exact per-segment causal sdpa. q (1, H, T, D), k/v (1, Hkv, T, D) -> (1, T, H, D).

    ``split`` / ``cat`` (rather than slicing) keep backward O(T): split's backward is one cat.
    """
    gqa = q.shape[1] != k.shape[1]  # sdpa's enable_gqa: no repeat_interleave copy (measured faster)
    outs = []
    for qs, ks, vs in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2)):
        if sliding_window is not None and qs.shape[2] > sliding_window:
            outs.append(_windowed_causal(qs, ks, vs, scaling, dropout, sliding_window))
        else:
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, dropout_p=dropout, scale=scaling,
                                                       enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (1, H, T, D)
    return out.transpose(1, 2).contiguous()


_CHECKED_LAYOUT: Optional[tuple] = None  # (weakref to cu_seqlens, its version, T): checked already


def check_packed_length(cu: torch.Tensor, total: int) -> None:
    """``cu[0] == 0`` and ``cu[-1] == T``: the row is exactly the packed documents.

    FlashAttention's varlen backward gives NaN gradients for tokens past ``cu_seq_q[-1]`` (DESIGN.md
    section 3), so a shorter layout must fail loudly. Reading ``cu`` copies it to the host (a GPU sync):
    every layer of a forward (and its recomputation) gets the same tensor, so it is read once per tensor.
    """
    global _CHECKED_LAYOUT
    if cu.device.type == "meta":  # shape-only tensors carry no values
        return
    seen = _CHECKED_LAYOUT
    if seen is not None and seen[0]() is cu and seen[1] == cu._version and seen[2] == total:
        return
    first, last = cu[[0, -1]].tolist()
    if first != 0 or last != total:
        raise ValueError(f"cu_seqlens must run from 0 to T={total} (the packed row's length), got {first} ... "
                         f"{last}: a FlashAttention kernel would return NaN gradients for the tokens past the end")
    _CHECKED_LAYOUT = (weakref.ref(cu), cu._version, total)


def _varlen_documents(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, scaling: float, dropout: float,
                      sliding_window: int | None, backend: str, varlen_fn: VarlenFn | None = None) -> torch.Tensor:
    """The varlen kernels' layout around the kernel. q (1, H, T, D), k/v (1, Hkv, T, D) -> (1, T, H, D)."""
    # (1, H, T, D) -> (T, H, D): FlashAttention wants tokens first, heads second, a contiguous last dim.
    q3, k3, v3 = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)  # the kernels require int32 on the device
    check_packed_length(cu, q3.shape[0])
    window = backends.window_size(sliding_window, max_seqlen)
    if backend == "torch_varlen":
        if dropout:
            raise ValueError(f"attention backend torch_varlen has no attention dropout (got {dropout}); set the "
                             "model config's attention_dropout to 0 or train.attention to sdpa_loop")
        out = backends.torch_varlen(q3, k3, v3, cu, max_seqlen, scaling, window)  # GQA native
    else:
        out = backends.flash_attn(q3, k3, v3, cu, max_seqlen, scaling, window, dropout, varlen_fn)
    return out.unsqueeze(0)  # (1, T, H, D)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int, scaling: float | None = None, *, dropout: float = 0.0,
                       sliding_window: int | None = None, varlen_fn: VarlenFn | None = None,
                       backend: AttentionBackend | None = None) -> torch.Tensor:
    """Causal attention within each segment of a packed row.

    q (1, H, T, D), k/v (1, Hkv, T, D) with H a multiple of Hkv; ``cu_seqlens`` (n_segments + 1,) from
    0 to T; ``max_seqlen`` the longest segment. Returns (1, T, H, D). ``backend``: the kernel chosen at
    start-up (``longtrain.attention_backends.select_backend``); None picks ``auto`` for these tensors.
    ``varlen_fn`` overrides the kernel (a function with ``flash_attn_varlen_func``'s signature; tests
    inject a CPU reference).
    """
    _check_inputs(q, k, v, cu_seqlens)
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    max_seqlen = int(max_seqlen)
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    if varlen_fn is not None:
        return _varlen_documents(q, k, v, cu_seqlens, max_seqlen, scaling, dropout, sliding_window, "flash_attn",
                                 varlen_fn)
    backend = backend if backend is not None else auto_backend(q)
    check_fits(backend, q)
    if backend.name != "sdpa_loop":
        return _varlen_documents(q, k, v, cu_seqlens, max_seqlen, scaling, dropout, sliding_window, backend.name)
    lengths = _segment_lengths(cu_seqlens, q.shape[2], max_seqlen)
    return _sdpa_documents(q, k, v, lengths, scaling, dropout, sliding_window)


def longtrain_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (1, H, T, D), key/value (1, Hkv, T, D) -> ((1, T, H, D), None).

    Reads the document layout from ``cu_seq_lens_q`` / ``max_length_q`` and the kernel from
    ``attention_backend`` (forwarded by the model from its own kwargs) and refuses to run without a
    layout: it never silently attends across documents.
    """
    cu, max_len = document_layout(module, attention_mask, kwargs, ATTENTION_NAME)
    out = document_attention(query, key, value, cu, max_len, scaling, dropout=dropout,
                             sliding_window=kwargs.get("sliding_window"), backend=kwargs.get("attention_backend"))
    return out, None


def document_layout(module: torch.nn.Module, attention_mask: torch.Tensor | None, kwargs: dict,
                    name: str) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of the packed row from transformers' attention kwargs, for every
    longtrain attention (single-device, Ulysses, ring), after refusing what they cannot honour (a
    mask, non-causal attention, softcap, attention sinks) rather than silently computing something else."""
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise ValueError(
            f"attention '{name}' needs the packed row's document layout: call "
            "model.model(input_ids=..., position_ids=..., use_cache=False, cu_seq_lens_q=batch.cu_seqlens, "
            "cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen) "
            "(docs/internals.md, attention contract)")
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_k is not None and cu_k is not cu and not torch.equal(cu_k.to(cu.device, cu.dtype), cu):
        raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (self-attention over one packed row)")
    if attention_mask is not None:
        raise ValueError(f"attention '{name}' takes no attention_mask (got shape "
                         f"{tuple(attention_mask.shape)}): documents come from cu_seq_lens_q")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError(f"attention '{name}' is causal only")
    for key in ("softcap", "s_aux"):
        if kwargs.get(key) is not None:
            raise ValueError(f"attention '{name}' does not implement {key}; use another attention")
    return cu, int(max_len)


def longtrain_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """Mask function for ``AttentionMaskInterface``: builds no mask (documents come from cu_seqlens).

    Called by transformers' ``create_causal_mask`` with the 2-D padding mask, if any. Padding inside a
    packed row is its own segment (dataset contract), so a mask with zeros means the caller packed rows
    another way, which this attention could not honour: refuse it rather than silently ignore it.
    """
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise ValueError(f"attention '{ATTENTION_NAME}' does not take padding masks: pass packed rows "
                         "(longtrain.batching.make_packed_batch) with padding as its own segment")
    return None


def register_attention(name: str = ATTENTION_NAME, fn: Callable | None = None) -> str:
    """Register an attention (default: ``longtrain_attention``) and the mask function under ``name``
    (idempotent); returns ``name``.

    Select it with ``model.set_attn_implementation(name)`` or ``from_pretrained(..., attn_implementation=name)``.
    """
    AttentionInterface.register(name, fn or longtrain_attention)
    AttentionMaskInterface.register(name, longtrain_mask)
    return name
