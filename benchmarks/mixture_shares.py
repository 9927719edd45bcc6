"""How close a stage's data mixture stays to its weights: longtrain's order against i.i.d. draws.

For each mixture (ProLong's 64k stage 30/30/3/37, a 3% synthetic share, uneven weights) and each
stage shape (rows per step x steps, up to ProLong's 64k stage: 64 rows of 64k, ~4800 steps), this
reads the source of every row of the stage from ``longtrain.data.MixtureOrder`` (the order training
uses) and, as the baseline, from independent weighted draws (``numpy.random.Generator.choice``,
what a sampler that picks a source per row does). It prints, per source and over all of them, the
largest gap between the share of the rows read so far and the weight, after any step from 100 rows
on, and the gap at the stage end. Goal (issue 15): within 1% over the stage.

Usage: python benchmarks/mixture_shares.py [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from longtrain.data import MixtureOrder  # noqa: E402  (after the path insert: run from a checkout)

MIXTURES = {"prolong 30/30/3/37": [30, 30, 3, 37], "synthetic 97/3": [97, 3], "uneven .7/.2/.06/.04": [0.7, 0.2, 0.06, 0.04]}
SHAPES = [(8, 100), (64, 1000), (64, 4768)]  # (rows per step, steps); 4768 x 64 x 64k = 20B tokens


def worst_gaps(sources: np.ndarray, weights: np.ndarray, rows_per_step: int) -> tuple[float, float]:
    """``(largest gap after any step from 100 rows on, gap at the end)`` of the per-source shares, in
    fractions of the rows read (``sources``: the source of each row of the stage, in order)."""
    onehot = sources[:, None] == np.arange(len(weights))[None, :]  # (rows, K)
    counts = np.cumsum(onehot, axis=0)[rows_per_step - 1::rows_per_step]  # (steps, K) after each step
    read = np.arange(1, len(counts) + 1)[:, None] * rows_per_step
    gaps = np.abs(counts / read - weights[None, :])
    return float(gaps[read[:, 0] >= 100].max()), float(gaps[-1].max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| mixture | rows/step x steps | longtrain: max gap | at end | i.i.d.: max gap | at end |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for name, raw in MIXTURES.items():
        weights = np.asarray(raw, dtype=np.float64) / sum(raw)
        order = MixtureOrder([10**9] * len(raw), raw, args.seed, 0)
        for rows_per_step, steps in SHAPES:
            n = rows_per_step * steps
            ours = order.pattern[np.arange(n) % order.period]  # the source of each row, as locate() reads it
            iid = rng.choice(len(raw), size=n, p=weights)
            (a, b), (c, d) = worst_gaps(ours, weights, rows_per_step), worst_gaps(iid, weights, rows_per_step)
            print(f"| {name} | {rows_per_step} x {steps} | {a:.3%} | {b:.4%} | {c:.3%} | {d:.3%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
