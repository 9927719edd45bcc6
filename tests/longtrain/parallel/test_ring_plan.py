"""Ring attention's block plan and merge, simulated for all ranks in one process (no comm).

Every rank's plan is replayed against the K/V blocks it would receive, with the real block
kernels and the log-sum-exp merge; outputs and gradients must equal dense document-masked
attention. This covers many (T, documents, sp_size) layouts in milliseconds; the real
multi-process ring (communication, autograd Function) is tested in test_sp_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

from longtrain.parallel.kernels import block_backward, block_forward, math_backward, math_forward
from longtrain.parallel.ring import _merge, ring_plan
from longtrain.parallel.sharding import local_token_index


def dense_reference(q, k, v, cu, scale):
    """Document-masked causal attention with an explicit mask, in float64, with autograd."""
    total = q.shape[1]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
    pos = torch.arange(total)
    allowed = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    g = q.shape[0] // k.shape[0]
    s = q.double() @ k.double().repeat_interleave(g, 0).transpose(1, 2) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v.double().repeat_interleave(g, 0)


def simulate_ring(q, k, v, cu, sp, scale, dout):
    """Replay every rank's plan; returns global (out, dq, dk, dv) in the original token order."""
    total = q.shape[1]
    out, dq = torch.zeros_like(q), torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    idx = [local_token_index(total, sp, r, "ring") for r in range(sp)]
    for r in range(sp):
        plan = ring_plan(tuple(cu), sp, r)
        ql = q[:, idx[r]]
        o_acc = torch.zeros(ql.shape)
        l_acc = torch.full(ql.shape[:2], float("-inf"))
        for step, blocks in enumerate(plan):
            src = idx[(r - step) % sp]
            for b in blocks:
                o, l = block_forward(ql[:, b.q_lo:b.q_hi], k[:, src[b.k_lo:b.k_hi]], v[:, src[b.k_lo:b.k_hi]],
                                     b.causal, scale)
                _merge(o_acc, l_acc, o, l, b.q_lo, b.q_hi)
        out[:, idx[r]] = o_acc
        assert torch.isfinite(l_acc).all(), "a query row received no key (its own token at least)"
        do = dout[:, idx[r]]
        for step, blocks in enumerate(plan):
            src = idx[(r - step) % sp]
            for b in blocks:
                rows, cols = slice(b.q_lo, b.q_hi), src[b.k_lo:b.k_hi]
                gq, gk, gv = block_backward(do[:, rows], ql[:, rows], k[:, cols], v[:, cols], o_acc[:, rows],
                                            l_acc[:, rows], b.causal, scale)
                dq[:, idx[r][rows]] += gq
                dk[:, cols] += gk
                dv[:, cols] += gv
    return out, dq, dk, dv


LAYOUTS = [
    # (sp_size, doc lengths): documents crossing chunk boundaries, tiny ones, one spanning everything
    (1, [5, 11]),
    (2, [3, 9, 1, 7, 4]),
    (2, [24]),
    (3, [2, 2, 2, 13, 5]),
    (4, [1, 30, 1]),
    (4, [8, 8, 8, 8]),
    (5, [7, 1, 1, 1, 9, 11]),
]


@pytest.mark.parametrize("sp,docs", LAYOUTS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_simulated_ring_equals_dense(sp, docs, heads):
    torch.manual_seed(sp * 100 + len(docs))
    h, hkv = heads
    cu = [0]
    for n in docs:
        cu.append(cu[-1] + n)
    assert cu[-1] % (2 * sp) == 0, "layout must already be padded"
    total, d, scale = cu[-1], 8, 8 ** -0.5
    q, k, v = (torch.randn(n, total, d) for n in (h, hkv, hkv))
    dout = torch.randn(h, total, d)
    out, dq, dk, dv = simulate_ring(q, k, v, cu, sp, scale, dout)

    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(qr, kr, vr, cu, scale)
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert dk.abs().sum() > 0 and dq.abs().sum() > 0  # guard: gradients actually flowed


def test_plan_is_balanced_and_sparse():
    """Zigzag: with one long document every rank does the same work; nothing crosses documents."""
    sp, total = 4, 64
    work = []
    for r in range(sp):
        plan = ring_plan((0, total), sp, r)
        work.append(sum((b.q_hi - b.q_lo) * (b.k_hi - b.k_lo) / (2 if b.causal else 1) for s in plan for b in s))
    assert max(work) == min(work), work
    # every document inside one chunk: no cross-chunk block at all
    plan = ring_plan(tuple(range(0, 65, 8)), 4, 0)
    assert all(b.causal for b in plan[0]) and not any(plan[1:]), plan


def test_plan_rejects_unpadded_layout():
    with pytest.raises(ValueError, match="divisible by 2\\*sp_size=4"):
        ring_plan((0, 6), 2, 0)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_kernel_matches_math(causal):
    """The aten CPU flash kernel (GQA, strided slices) against the explicit math version."""
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 12, 8)[:, 2:9], torch.randn(2, 12, 8)[:, 3:10], torch.randn(2, 12, 8)[:, 3:10]
    o, l = block_forward(q, k, v, causal, 0.3)
    o2, l2 = math_forward(q, k, v, causal, 0.3)
    torch.testing.assert_close(o, o2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l, l2, atol=1e-6, rtol=1e-5)
    do = torch.randn_like(o)
    for a, b in zip(block_backward(do, q, k, v, o, l, causal, 0.3), math_backward(do, q, k, v, o, l, causal, 0.3)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_matches_math(causal):
    """flash-attn varlen (or torch's CUDA flash kernel) against the exact math version, bf16."""
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(n, 256, 64, device=dev, dtype=dt) for n in (8, 2, 2))
    o, l = block_forward(q, k, v, causal, 0.125)
    o2, l2 = math_forward(q.float(), k.float(), v.float(), causal, 0.125)
    torch.testing.assert_close(o.float(), o2, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(l, l2, atol=2e-2, rtol=2e-2)
    do = torch.randn_like(o)
    got = block_backward(do, q, k, v, o, l, causal, 0.125)
    want = math_backward(do.float(), q.float(), k.float(), v.float(), o.float(), l, causal, 0.125)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)
