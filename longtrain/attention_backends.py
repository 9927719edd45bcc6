"""Which attention kernel runs, chosen once at start-up, and the argument building around each kernel.

Backends (``train.attention``; docs/training.md, "Attention"):

- ``flash_attn``: flash-attn 2's ``flash_attn_varlen_func`` (an optional extra that needs a CUDA build:
  DESIGN.md section 3). CUDA, fp16/bf16.
- ``torch_varlen``: torch's own FlashAttention-2 varlen kernel, no build step:
  ``torch.nn.attention.varlen.varlen_attn`` for the packed row and, for ring attention's blocks (which
  need the log-sum-exp *and* a backward that takes the merged one), the ops underneath it,
  ``torch.ops.aten._flash_attention_forward`` / ``_flash_attention_backward``. CUDA, fp16/bf16, sm80+.
- ``sdpa_loop``: the exact per-document loop of ``scaled_dot_product_attention`` (CPU, fp32 anywhere,
  and every case the kernels above cannot take).

``auto`` picks the first of flash_attn, torch_varlen, sdpa_loop that can run on this device, dtype and
installation. A forced backend that cannot run raises a ConfigError that says why.

Facts these wrappers rely on (read from torch 2.13's ``torch/nn/attention/varlen.py`` and the op
schemas; DESIGN.md section 3): tokens first, ``(T, H, D)``; ``window_size=(-1, 0)`` is causal,
``(W, 0)`` a causal window that sees W tokens to the left *plus itself* (flash's convention: inclusive
on the left), so transformers' ``sliding_window=w`` (``kv_idx > q_idx - w``: w tokens incl. itself)
is ``(w - 1, 0)``; ``cu_seq_q`` int32 on the device; the varlen lse is ``(H, T)`` fp32, natural log.
Other torch versions ship other ``varlen_attn`` signatures (some without ``enable_gqa``, some with KV
cache arguments), so the keyword arguments are built from the installed signature; the kernel itself
takes GQA natively (FlashAttention-2 maps query head h to kv head h // (H / Hkv)).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from longtrain.config import ATTENTION_BACKENDS, ConfigError

Tensor = torch.Tensor
BACKENDS = ATTENTION_BACKENDS  # auto, flash_attn, torch_varlen, sdpa_loop
KERNEL_BACKENDS = ("flash_attn", "torch_varlen")  # tried by auto, in this order
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionBackend:
    """The kernel a run uses (``name``: flash_attn | torch_varlen | sdpa_loop) and why (for the log)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


# ------------------------------------------------------------------------------ what is installed

def flash_varlen_fn() -> Optional[Callable[..., Tensor]]:
    """flash-attn 2's varlen kernel when installed (an optional extra; imported lazily)."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@functools.lru_cache(maxsize=1)
def _varlen_attn_signature() -> tuple[Optional[Callable[..., Tensor]], frozenset[str], Optional[str]]:
    """(``varlen_attn``, its keyword names, why it is unusable or None)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset(), f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    names = frozenset(inspect.signature(varlen_attn).parameters)
    missing = sorted({"scale", "window_size"} - names)
    if missing:
        return None, names, f"torch {torch.__version__}'s varlen_attn takes no {', '.join(missing)}"
    return varlen_attn, names, None


def _aten_flash_status() -> Optional[str]:
    """Why ``aten._flash_attention_forward/_backward`` with window arguments are missing, or None."""
    ops = [getattr(torch.ops.aten, name, None) for name in ("_flash_attention_forward", "_flash_attention_backward")]
    if any(op is None for op in ops):
        return f"torch {torch.__version__} has no aten._flash_attention_forward/_backward"
    for op in ops:
        args = {a.name for a in op.default._schema.arguments}
        if not {"window_size_left", "window_size_right", "scale"} <= args:
            return f"torch {torch.__version__}'s {op.default._schema.name} takes no window_size_left/right"
    return None


def torch_varlen_status() -> Optional[str]:
    """Why torch's built-in varlen FlashAttention is unusable in this installation, or None."""
    return _varlen_attn_signature()[2] or _aten_flash_status()


def flash_attn_status() -> Optional[str]:
    return None if flash_varlen_fn() is not None else "flash-attn is not installed (pip install longtrain[flash])"


def _device_status(device: torch.device, dtype: torch.dtype, head_dim: Optional[int]) -> Optional[str]:
    """Why a FlashAttention kernel cannot take this device / dtype / head size, or None."""
    if device.type != "cuda":
        return f"needs a CUDA device (this process trains on {device.type})"
    if dtype not in HALF:
        return f"needs bf16 or fp16 (train.precision gives {str(dtype).replace('torch.', '')})"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"needs compute capability 8.0+ (Ampere or newer), {torch.cuda.get_device_name(device)} has {major}.{minor}"
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        return f"needs a head dimension that is a multiple of 8 and at most 256, the model has {head_dim}"
    return None


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None,
                       dropout: float = 0.0) -> Optional[str]:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name == "sdpa_loop":
        return None
    why = _device_status(torch.device(device), dtype, head_dim)
    if why is None:
        why = flash_attn_status() if name == "flash_attn" else torch_varlen_status()
    if why is None and name == "torch_varlen" and dropout:
        why = f"has no attention dropout (the model's attention_dropout is {dropout}; set it to 0)"
    return why


def select_backend(requested: str, device: torch.device | str, dtype: torch.dtype, head_dim: Optional[int] = None,
                   dropout: float = 0.0, key: str = "train.attention") -> AttentionBackend:
    """The backend for ``requested`` (one of BACKENDS) on this device / dtype / installation.

    ``auto`` falls back in order and says why each faster kernel was passed over; a forced backend
    that cannot run raises a ConfigError naming ``key`` and the reason.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"{key} must be one of {', '.join(BACKENDS)}, got {requested!r}")
    device = torch.device(device)
    if requested != "auto":
        why = unavailable_reason(requested, device, dtype, head_dim, dropout)
        if why is not None:
            raise ConfigError(f"{key}: {requested} cannot run here: it {why}; use auto or sdpa_loop")
        return AttentionBackend(requested, f"forced by {key}")
    passed_over = []
    for name in KERNEL_BACKENDS:
        why = unavailable_reason(name, device, dtype, head_dim, dropout)
        if why is None:
            return AttentionBackend(name, "auto" + (f"; {'; '.join(passed_over)}" if passed_over else ""))
        passed_over.append(f"{name} {why}")
    if device.type == "cuda" and dtype in HALF:
        return AttentionBackend("sdpa_loop", "auto; " + "; ".join(passed_over))
    # CPU, or fp32 anywhere: the exact path by design, not a fallback worth a warning
    return AttentionBackend("sdpa_loop", f"auto: exact per-document path on {device.type} "
                                         f"{str(dtype).replace('torch.', '')}")


@functools.lru_cache(maxsize=32)
def _auto_for(device_type: str, index: Optional[int], dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    return select_backend("auto", torch.device(device_type, index) if index is not None else device_type,
                          dtype, head_dim)


def auto_backend(q: Tensor) -> AttentionBackend:
    """``auto`` for tensors like ``q`` (callers that pass no backend: eval, export checks, tests)."""
    if q.device.type == "meta":  # shape-only tensors: nothing to run, the exact path's shapes
        return AttentionBackend("sdpa_loop", "meta tensors")
    return _auto_for(q.device.type, q.device.index, q.dtype, int(q.shape[-1]))


def check_fits(backend: AttentionBackend, q: Tensor) -> None:
    """Refuse tensors a chosen kernel backend cannot take (a silent fallback would hide a misconfiguration)."""
    if backend.name in KERNEL_BACKENDS and not (q.device.type in ("cuda", "meta") and q.dtype in HALF):
        raise ValueError(f"attention backend {backend.name} needs CUDA fp16/bf16 tensors, got {q.device.type} "
                         f"{q.dtype}; select it with train.attention only for such runs")


# ------------------------------------------------------------------------------ the packed row (T, H, D)

def window_size(sliding_window: Optional[int], max_seqlen: int) -> tuple[int, int]:
    """FlashAttention's ``(left, right)`` for a causal (optionally sliding) window (module docstring)."""
    if sliding_window is not None and max_seqlen > sliding_window:
        return (sliding_window - 1, 0)
    return (-1, 0)


def torch_varlen_kwargs(num_heads: int, num_kv_heads: int, scale: float, window: tuple[int, int]) -> dict[str, Any]:
    """Keyword arguments of the installed ``varlen_attn`` (its signature varies across torch versions)."""
    _, names, why = _varlen_attn_signature()
    if why is not None:
        raise RuntimeError(why)
    kwargs: dict[str, Any] = {"scale": float(scale), "window_size": tuple(window)}
    if num_heads != num_kv_heads and "enable_gqa" in names:
        kwargs["enable_gqa"] = True  # versions without the argument take GQA without asking
    return kwargs


def torch_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int, scale: float,
                 window: tuple[int, int]) -> Tensor:
    """q (T, H, D), k/v (T, Hkv, D), cu (n + 1,) int32 on the device -> (T, H, D)."""
    varlen_attn = _varlen_attn_signature()[0]
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen,
                       **torch_varlen_kwargs(q.shape[1], k.shape[1], scale, window))


def flash_attn(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int, scale: float,
               window: tuple[int, int], dropout: float = 0.0, varlen_fn=None) -> Tensor:
    """flash-attn's ``flash_attn_varlen_func``; same layout as :func:`torch_varlen`."""
    fn = varlen_fn or flash_varlen_fn()
    extra = {"window_size": window} if window != (-1, 0) else {}  # causal=True sets the right side itself
    out = fn(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout, softmax_scale=scale, causal=True, **extra)
    return out[0] if isinstance(out, tuple) else out  # some versions return (out, lse, ...)


# ------------------------------------------------------------------------------ ring blocks (aten ops)

@functools.lru_cache(maxsize=64)
def one_sequence_cu(n: int, device: torch.device) -> Tensor:
    """cu_seqlens ``[0, n]`` (int32, on ``device``) of one block, built once per (n, device): a fresh
    host-to-device copy in every block call would make the CPU wait for the GPU (the kernels only read it)."""
    return torch.tensor([0, n], dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=8)
def _philox_placeholders(device: torch.device) -> tuple[Tensor, Tensor]:
    # Dropout is 0, so the kernel never reads the RNG state; torch's own varlen_attn backward passes the
    # same placeholders (a zero (2,) uint64 seed and an empty offset).
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.empty(0, device=device)


def aten_flash_block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q (H, Lq, D), k/v (Hkv, Lk, D) -> (out (H, Lq, D), lse (H, Lq) fp32) with torch's flash kernel.

    One sequence per call (cu = [0, L]): exactly the block, so no token lies past ``cu[-1]`` (the NaN
    gradient trap of varlen_attn, DESIGN.md section 3). GQA native: no kv repeat.
    """
    lq, lk = q.shape[1], k.shape[1]
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
        one_sequence_cu(lq, q.device), one_sequence_cu(lk, q.device), lq, lk, 0.0, causal, False, scale=scale,
        window_size_left=-1, window_size_right=0 if causal else -1)
    return out.transpose(0, 1), lse.float()


def aten_flash_block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq (H, Lq, D), dk (Hkv, Lk, D), dv) of a block given the ring's *merged* out and lse."""
    lq, lk = q.shape[1], k.shape[1]
    seed, offset = _philox_placeholders(q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.transpose(0, 1).contiguous(), q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous(),
        v.transpose(0, 1).contiguous(), out.transpose(0, 1).contiguous(), lse.contiguous(),
        one_sequence_cu(lq, q.device), one_sequence_cu(lk, q.device), lq, lk, 0.0, causal, seed, offset,
        scale=scale, window_size_left=-1, window_size_right=0 if causal else -1)
    return dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1)
