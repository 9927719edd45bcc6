"""Forward+backward time of longtrain's CPU document attention vs sdpa with an explicit block-diagonal mask.

Both compute the same thing (causal attention inside each document of a packed row); the baseline
is what transformers' sdpa does on CPU for packed rows (a [1, 1, T, T] boolean mask). Run:

    OMP_NUM_THREADS=2 python benchmarks/bench_attention.py              # 4096 and 16384 tokens
    python benchmarks/bench_attention.py --tokens 4096 --docs 16 --repeats 5

Prints one line per length with both times, the ratio (baseline / ours) and the largest output difference.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from longtrain.attention import document_attention  # noqa: E402


def doc_lengths(total: int, docs: int, seed: int) -> list[int]:
    """``docs`` document lengths summing to ``total``, uneven (seeded), each at least 16 tokens."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(docs, generator=g) + 0.25
    lens = (weights / weights.sum() * (total - 16 * docs)).floor().long() + 16
    lens[-1] += total - int(lens.sum())
    return lens.tolist()


def masked_sdpa(q, k, v, lens: list[int], scale: float) -> torch.Tensor:
    """Baseline: one sdpa call with a [1, 1, T, T] block-diagonal causal mask. -> (1, T, H, D)."""
    total = q.shape[2]
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = (seg[:, None] == seg[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


def time_fwd_bwd(fn, q, k, v, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        start = time.perf_counter()
        out = fn(qq, kk, vv)
        out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best, out.detach()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--docs", type=int, default=0, help="documents per row (default: tokens / 1024)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3, help="best of N (the baseline runs once beyond 8k tokens)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, {args.dtype}; forward+backward, best of {args.repeats}")
    for total in args.tokens:
        docs = args.docs or max(1, total // 1024)
        lens = doc_lengths(total, docs, seed=total)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, args.heads, total, args.head_dim, generator=g).to(dtype)
        k = torch.randn(1, args.kv_heads, total, args.head_dim, generator=g).to(dtype)
        v = torch.randn(1, args.kv_heads, total, args.head_dim, generator=g).to(dtype)
        scale = args.head_dim ** -0.5
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        ours_s, ours = time_fwd_bwd(lambda a, b, c: document_attention(a, b, c, cu, max(lens), scale), q, k, v,
                                    args.repeats)
        # The baseline is slow at 16k (over a minute per call on 2 cores): one call beyond 8k tokens.
        base_s, base = time_fwd_bwd(lambda a, b, c: masked_sdpa(a, b, c, lens, scale), q, k, v,
                                    args.repeats if total <= 8192 else 1)
        diff = (ours.float() - base.float()).abs().max().item()
        print(f"T={total:6d}  docs={docs:3d} (longest {max(lens)})  longtrain {ours_s:7.3f} s  "
              f"sdpa+mask {base_s:7.3f} s  ratio {base_s / ours_s:5.2f}x  max|diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
