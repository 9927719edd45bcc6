"""The study's figures: perplexity by position per arm, and the base along its training.

Built on ``matplotlib.figure.Figure`` (no pyplot: no display, no global state). Seeds are averaged
geometrically per bucket, as perplexities are.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from benchmarks.study.corpus import HELDOUT_SETS
from benchmarks.study.recipe import BASE_L

# One colour per method family in every plot (trained and training-free alike).
COLORS = {"base10k": "C1", "abf": "C2", "ntk": "C3", "pi": "C4", "yarn": "C5", "dynamic": "C0", "control": "C7"}


def _style(label: str) -> dict:
    if label == "base-128":
        return {"color": "0.4", "ls": "--"}
    return {"color": COLORS.get(label.split("-")[0], "C9")}


def _curve(entry: dict, width: int) -> tuple[list[float], list[float]]:
    """Bucket perplexities merged to ``width`` positions (token-weighted), as (centres, ppl)."""
    merged: dict[int, list[float]] = {}
    for b in entry["buckets"]:
        if b["ppl"] is not None and b["tokens"]:
            acc = merged.setdefault(b["start"] // width, [0.0, 0.0])
            acc[0] += math.log(b["ppl"]) * b["tokens"]
            acc[1] += b["tokens"]
    keys = sorted(merged)
    return [(k + 0.5) * width for k in keys], [math.exp(merged[k][0] / merged[k][1]) for k in keys]


def _seed_mean_curve(entries: list[dict], width: int) -> tuple[list[float], list[float]]:
    curves = [_curve(e, width) for e in entries]
    xs = curves[0][0]
    ys = [math.exp(sum(math.log(c[1][i]) for c in curves) / len(curves)) for i in range(len(xs))]
    return xs, ys


def _arm_groups(results: dict, arm_name: str, kind: str, length: int, select) -> dict[str, list[dict]]:
    """{plot label: [eval entries at ``length``, one per seed]} for the models ``select`` keeps."""
    groups: dict[str, list[dict]] = {}
    for m in results[f"{arm_name}_{kind}"]["models"]:
        label = select(m["name"])
        if label and str(length) in m["perplexity"]:
            groups.setdefault(label, []).append(m["perplexity"][str(length)])
    return groups


def plot_arm(path: Path, results: dict, arm_name: str, length: int, select, title: str, width: int,
             relative_to: str | None = None) -> Path:
    """Perplexity by position at ``length``, one column per held-out set, seeds averaged (geometric).
    With ``relative_to``, a second row shows each curve relative to that model's (in %), where
    differences of a few percent that the log scale hides are visible."""
    rows = 2 if relative_to else 1
    fig = Figure(figsize=(11, 3.9 * rows), layout="constrained")
    axes = fig.subplots(rows, len(HELDOUT_SETS), squeeze=False)
    for col, kind in enumerate(HELDOUT_SETS):
        groups = _arm_groups(results, arm_name, kind, length, select)
        curves = {label: _seed_mean_curve(entries, width) for label, entries in groups.items()}
        ax = axes[0, col]
        for label, (xs, ys) in curves.items():
            style = _style(label)
            ax.plot(xs, ys, marker="o", ms=2.5, lw=1.3, label=label, **style)
            if relative_to and relative_to in curves and label != "base-128":
                ref = curves[relative_to][1]
                axes[1, col].plot(xs, [100 * (y / r - 1) for y, r in zip(ys, ref)], marker="o", ms=2.5,
                                  lw=1.3, label=label, **style)
        _format_column(axes[:, col], f"{title}: held-out {kind}", width, relative_to)
    fig.savefig(path, dpi=80)
    return path


def _format_column(column, title: str, width: int, relative_to: str | None) -> None:
    """Log-scale perplexity on top (labels on the 2-3-5-8 minor ticks too), the relative row below."""
    ax = column[0]
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2358" else ""))
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=10)
    if relative_to:
        column[1].axhline(0, color="k", lw=0.8)
        column[1].set_ylabel(f"% vs {relative_to}")
    for a in column:
        a.axvline(BASE_L, color="k", ls=":", lw=1)
        a.set_xlabel(f"position (bucket of {width}); dotted: L = {BASE_L}")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)


def plot_base(path: Path, work: Path, results: dict) -> Path:
    """Training loss of the base (stage 0) and held-out perplexity at L at its checkpoints."""
    records = [json.loads(line) for line in (work / "runs" / "base" / "metrics.jsonl").read_text().splitlines()]
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    k = max(1, len(losses) // 100)
    smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
    ax1.plot(steps, smooth, lw=1.2)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss (moving mean of {k + 1})")
    ax1.set_title(f"base: training loss at L = {BASE_L}", fontsize=10)
    ax1.grid(alpha=0.3)
    for kind in HELDOUT_SETS:
        pts = [(int(m["name"].split("@")[1]), m["perplexity"][str(BASE_L)]["ppl"])
               for m in results[f"curve_{kind}"]["models"]]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"held-out {kind}")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"perplexity at {BASE_L}")
    ax2.set_title("base: held-out perplexity along training", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return path


def _untrained(name: str) -> str | None:
    return name if (name == "base-128" or "(no training)" in name) else None


def _trained_x4(name: str) -> str | None:
    """The base and each trained method but the control, its seeds under one label."""
    if name == "base-128":
        return name
    return name.rsplit(" s", 1)[0] if "(no training)" not in name and not name.startswith("control") else None


def _trained_x16(name: str) -> str | None:
    if name == "base-128":
        return name
    return name.rsplit(" s", 1)[0] if "(no training)" not in name else None


def study_plots(work: Path, results: dict, methods: dict, arms: list[str], steps: dict) -> dict[str, Path]:
    """Every figure of the arms that ran, written under ``work``: {file name: path}."""
    plots = {"study_base.png": plot_base(work / "study_base.png", work, results)}
    if "x4" in arms:
        length = methods["arms"]["x4"]["seq_len"]
        plots["study_before.png"] = plot_arm(work / "study_before.png", results, "x4", length, _untrained,
                                             "before extension (no training)", 32)
        plots["study_after_x4.png"] = plot_arm(work / "study_after_x4.png", results, "x4", length, _trained_x4,
                                               f"after {steps['extend']} steps at 4L", 32, relative_to="base10k-512")
    if "x16" in arms:
        plots["study_x16.png"] = plot_arm(work / "study_x16.png", results, "x16", methods["arms"]["x16"]["seq_len"],
                                          _trained_x16, f"after {steps['extend']} steps at 16L", 128,
                                          relative_to="base10k-2048")
    return plots
