"""DeepSpeed-Ulysses sequence parallelism around our document-masked attention.

Each rank holds ``L = T / P`` contiguous tokens of every head. One all-to-all turns that into
``T`` tokens of ``H / P`` heads, the local ``document_attention`` runs on the whole packed row
with the global ``cu_seqlens`` (so documents crossing slice boundaries are exact), and a second
all-to-all turns the output back (Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv:2309.14509).

Why not DeepSpeed's implementations (DESIGN.md section 3): ``ulysses_sp.UlyssesSPAttentionHF``
replaces ``ALL_ATTENTION_FUNCTIONS["sdpa"]`` process-wide, needs fixed sequence shapes and
``position_ids`` gathering, mutates ``module.num_key_value_groups`` and comes with a data
adapter and loss recipe whose gradient scaling is wrong under ZeRO-1/2; ``sequence.layer.
DistributedAttention`` routes uneven heads through a process-global SP rank (``groups.
_get_sequence_parallel_rank``), which cannot serve two ``sp_size`` values in one run. The
exchange itself is ~20 lines (``comm.all_to_all``), so we own it and bind it to an explicit group.

GQA: rank ``i`` gets query heads ``[i*H/P, (i+1)*H/P)``, which use whole kv heads only when
the kv heads split the same way. With ``Hkv % P != 0`` each kv head is repeated
``f = P / gcd(Hkv, P)`` times first (the smallest repeat making ``Hkv * f`` divisible by ``P``;
``Hkv * f`` still divides ``H``, since ``lcm(Hkv, P)`` divides ``H``), so the query-to-kv head
map is unchanged: ``h -> h // (H / Hkv)``. Hence the only constraint is ``H % P == 0``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .comm import all_to_all
from .state import ParallelState, divisors

Tensor = torch.Tensor


def ulysses_degrees(num_heads: int, num_kv_heads: Optional[int] = None) -> list[int]:
    """SP degrees Ulysses allows for a model: the divisors of the query head count."""
    kv = num_kv_heads or num_heads
    if num_heads % kv != 0:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={kv}")
    return divisors(num_heads)


def kv_repeat(num_heads: int, num_kv_heads: int, sp_size: int) -> int:
    """How many times each kv head is repeated before the all-to-all (1 when Hkv % P == 0)."""
    check_ulysses_heads(num_heads, num_kv_heads, sp_size)
    return sp_size // math.gcd(num_kv_heads, sp_size)


def check_ulysses_heads(num_heads: int, num_kv_heads: int, sp_size: int) -> None:
    """Raise a ValueError listing the allowed degrees when ``sp_size`` does not split the heads."""
    allowed = ulysses_degrees(num_heads, num_kv_heads)
    if sp_size not in allowed:
        raise ValueError(
            f"Ulysses sequence parallelism splits attention heads across ranks: sp_size={sp_size} does not "
            f"divide num_attention_heads={num_heads} (num_key_value_heads={num_kv_heads}). This model allows "
            f"sp_size in {allowed} with mode 'ulysses'; mode 'ring' allows any sp_size dividing the world size.")


def _heads_to_seq(x: Tensor, group) -> Tensor:
    """(P, h, L, D): block i = heads for rank i, local tokens -> (h, P*L, D): all tokens, own heads."""
    p, h, length, d = x.shape
    x = all_to_all(x, group)  # block j now holds rank j's tokens (sequence chunk j)
    return x.transpose(0, 1).reshape(h, p * length, d)


def _seq_to_heads(x: Tensor, sp_size: int, group) -> Tensor:
    """(T, H/P, D) all tokens, this rank's heads -> (L, H, D) this rank's tokens, all heads."""
    total, h, d = x.shape
    x = x.reshape(sp_size, total // sp_size, h, d)  # block i = sequence chunk i -> rank i
    x = all_to_all(x, group)  # block j now holds head group j
    return x.transpose(0, 1).reshape(total // sp_size, sp_size * h, d)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                      state: ParallelState, scale: float, local_attention) -> Tensor:
    """q (1, H, L, D), k/v (1, Hkv, L, D) of this rank's contiguous slice -> (1, L, H, D).

    ``local_attention(q (1,h,T,D), k (1,hkv,T,D), v, cu_seqlens, max_seqlen, scale) -> (1,T,h,D)``
    is the single-device document attention (``longtrain.attention.document_attention``).
    """
    if q.shape[0] != 1:
        raise ValueError(f"Ulysses attention expects one packed row (batch 1), got batch {q.shape[0]}")
    p, group = state.sp_size, state.require_group()
    num_heads, num_kv, length = q.shape[1], k.shape[1], q.shape[2]
    if int(cu_seqlens[-1]) != length * p:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but {p} ranks x {length} local tokens = "
                         f"{length * p}: pass the global cu_seqlens of the sharded batch")
    repeat = kv_repeat(num_heads, num_kv, p)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    hq, hkv = num_heads // p, k.shape[1] // p
    # one exchange for q, k and v: per destination rank, its q heads then its k and v heads
    qkv = torch.cat([q[0].reshape(p, hq, length, -1), k[0].reshape(p, hkv, length, -1),
                     v[0].reshape(p, hkv, length, -1)], dim=1)  # (P, hq + 2 hkv, L, D)
    qkv = _heads_to_seq(qkv, group)  # (hq + 2 hkv, T, D)
    q_all, k_all, v_all = qkv.split([hq, hkv, hkv], dim=0)
    out = local_attention(q_all[None], k_all[None], v_all[None], cu_seqlens, max_seqlen, scale)  # (1, T, hq, D)
    return _seq_to_heads(out[0], p, group).unsqueeze(0)  # (1, L, H, D)
