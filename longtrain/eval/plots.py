"""PNG plots of eval results (matplotlib's object API: no pyplot, no global backend switch)."""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 20, not 2x10^1, on the log axis


def _lengths(results: dict) -> list[int]:
    return sorted({int(k) for m in results["models"] for k in m.get("perplexity", {})})


def plot_ppl_by_position(results: dict, path: str | Path) -> Path | None:
    """One panel per context length; one line per model (perplexity of each position bucket,
    log scale). A dotted line marks each model's max_position_embeddings when it is inside."""
    lengths = _lengths(results)
    if not lengths:
        return None
    cols = min(3, len(lengths))
    rows = math.ceil(len(lengths) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, length in zip(axes, lengths):
        for i, m in enumerate(results["models"]):
            entry = m.get("perplexity", {}).get(str(length))
            if not entry:
                continue
            pts = [((b["start"] + b["end"]) / 2, b["ppl"]) for b in entry["buckets"] if b["ppl"]]
            color = f"C{i % 10}"
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, color=color,
                    label=f"{m['name']} ({entry['ppl'] or float('nan'):.2f})")
            trained = (m.get("rope") or {}).get("max_position_embeddings")
            if trained and trained < length:
                ax.axvline(trained, color=color, ls=":", lw=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PLAIN)
        ax.yaxis.set_minor_formatter(_PLAIN)
        ax.set_title(f"context {length}")
        ax.set_xlabel("position in the window")
        ax.set_ylabel("perplexity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(lengths):]:
        ax.set_visible(False)
    fig.suptitle("Perplexity by position (dotted: max_position_embeddings)")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_passkey(results: dict, path: str | Path) -> Path | None:
    """One heatmap per model: accuracy by context length (rows) and needle depth (columns)."""
    models = [m for m in results["models"] if m.get("passkey")]
    if not models:
        return None
    fig = Figure(figsize=(1.0 + 3.6 * len(models), 0.6 + 0.5 * max(3, len(models[0]["passkey"]))),
                 layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, m in zip(axes, models):
        lengths = [int(k) for k in m["passkey"]]
        depths = list(m["passkey"][str(lengths[0])])
        grid = [[m["passkey"][str(L)][d] for d in depths] for L in lengths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for r, row in enumerate(grid):
            for c, acc in enumerate(row):
                ax.text(c, r, f"{acc:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length")
        ax.set_title(m["name"])
    fig.colorbar(image, ax=list(axes), label="passkey accuracy")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_probes(results: dict, path: str | Path) -> Path | None:
    """Two panels, one line per model: repeat-copy gain by start-to-start distance, and key-value
    retrieval accuracy by prompt length (mean over depths). A dotted line marks each model's
    max_position_embeddings."""
    models = [m for m in results["models"] if m.get("copy") or m.get("kv")]
    if not models:
        return None
    fig = Figure(figsize=(10.4, 3.8), layout="constrained")
    ax_copy, ax_kv = fig.subplots(1, 2)
    for i, m in enumerate(models):
        color = f"C{i % 10}"
        trained = (m.get("rope") or {}).get("max_position_embeddings")
        if m.get("copy"):
            ax_copy.plot([c["distance"] for c in m["copy"]], [c["gain"] for c in m["copy"]], marker="o",
                         color=color, label=m["name"])
        if m.get("kv"):
            lengths = sorted(int(k) for k in m["kv"])
            acc = [sum(m["kv"][str(L)].values()) / len(m["kv"][str(L)]) for L in lengths]
            ax_kv.plot(lengths, acc, marker="o", color=color, label=m["name"])
        for ax in (ax_copy, ax_kv):
            if trained:
                ax.axvline(trained, color=color, ls=":", lw=1)
    ax_copy.axhline(0, color="grey", lw=0.8)
    ax_copy.set_xlabel("start-to-start distance (tokens)")
    ax_copy.set_ylabel("copy gain (nats/token)")
    ax_copy.set_title("repeat-copy gain")
    ax_kv.set_ylim(-0.05, 1.05)
    ax_kv.set_xlabel("prompt length (tokens)")
    ax_kv.set_ylabel("accuracy (mean over depths)")
    ax_kv.set_title("key-value retrieval")
    for ax in (ax_copy, ax_kv):
        ax.grid(True, alpha=0.3)
        if ax.lines and any(not str(line.get_label()).startswith("_") for line in ax.lines):
            ax.legend(fontsize=8)
    fig.suptitle("Context probes (dotted: max_position_embeddings)")
    fig.savefig(path, dpi=110)
    return Path(path)
