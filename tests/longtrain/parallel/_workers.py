"""Per-rank bodies of the multi-process sequence-parallel tests (imported by spawned ranks)."""
from __future__ import annotations

import torch

from longtrain.parallel import init_parallel_states, local_token_index, ring_attention, ulysses_attention


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).abs().max())


def kernel_case(state, mode: str, heads: int, kv_heads: int, docs: list[int], seed: int,
                reference_attention) -> dict:
    """One layout: SP attention output and q/k/v grads of this rank's slice vs the full row."""
    p = state.sp_size
    cu = torch.tensor([0] + docs, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    total, max_len, d = int(cu[-1]), max(docs), 16
    scale = d ** -0.5
    gen = torch.Generator().manual_seed(seed)  # same tensors on every rank
    q, k, v = (torch.randn(1, n, total, d, generator=gen) for n in (heads, kv_heads, kv_heads))
    dout = torch.randn(1, total, heads, d, generator=gen)

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*full, cu, max_len, scale)  # (1, T, H, D)
    ref.backward(dout)

    idx = local_token_index(total, p, state.sp_rank, mode)
    local = [x[:, :, idx].clone().requires_grad_() for x in (q, k, v)]
    if mode == "ulysses":
        out = ulysses_attention(*local, cu, max_len, state, scale, reference_attention)
    else:
        out = ring_attention(*local, cu, state, scale)
    out.backward(dout[:, idx])
    return {
        "out": _max_err(out, ref[:, idx]),
        **{f"d{n}": _max_err(x.grad, f.grad[:, :, idx]) for n, x, f in zip("qkv", local, full)},
        "grad_abs": float(sum(x.grad.abs().sum() for x in local)),
        "local_tokens": len(idx),
    }


def kernel_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    from longtrain.attention import document_attention

    state = init_parallel_states([world_size])[world_size]
    return {c["name"]: kernel_case(state, c["mode"], c["heads"], c["kv_heads"], c["docs"], c["seed"],
                                   document_attention) for c in cases}
