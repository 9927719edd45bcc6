"""Counts for people: the document length histogram, the summary text, and ``stats.png``."""
from __future__ import annotations

from pathlib import Path


class LengthHistogram:
    """Document lengths in tokens, in power-of-two bins ``[2**k, 2**(k+1))``: constant memory."""

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.n = self.total = self.max = 0
        self.min: int | None = None

    def add(self, length: int) -> None:
        k = max(0, int(length).bit_length() - 1)
        self.counts[k] = self.counts.get(k, 0) + 1
        self.n += 1
        self.total += length
        self.max = max(self.max, length)
        self.min = length if self.min is None else min(self.min, length)

    def as_dict(self) -> dict:
        ks = sorted(self.counts)
        return {"bin_starts": [2**k for k in ks], "counts": [self.counts[k] for k in ks], "documents": self.n,
                "min": self.min, "max": self.max, "mean": round(self.total / self.n, 1) if self.n else None}


def _fmt(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _by_reason(counts: dict) -> str:
    """``3 (empty 2, not_utf8 1)``."""
    total = _fmt(sum(counts.values()))
    return f"{total} ({', '.join(f'{k} {v:,}' for k, v in counts.items())})" if counts else total


def summary_lines(meta: dict) -> list[str]:
    """The end-of-run report (also what ``longtrain inspect`` prints)."""
    c, tok = meta["counts"], meta["tokenizer"]
    stride = f", stride {meta['stride']}" if meta.get("stride") else ""
    lines = [f"strategy {meta['strategy']}{stride}, seq_len {meta['seq_len']}, seed {meta['seed']}",
             f"tokenizer {tok['path']} ({tok['kind']}, vocab {tok['vocab_size']}, sha256 {tok['sha256'][:12]}...), "
             f"add_bos={meta['add_bos']} add_eos={meta['add_eos']}, padding id {meta['padding']['id']} "
             f"({meta['padding']['source']})",
             f"documents: {_fmt(c['documents_read'])} read, {_by_reason(c['documents_skipped'])} skipped, "
             f"{_by_reason(c['documents_filtered'])} filtered, {_fmt(c['documents_truncated'])} truncated, "
             f"{_fmt(c['documents_cut_by_weight'])} cut by weights; {_fmt(c['documents_train'])} train, "
             f"{_fmt(c['documents_validation'])} validation"]
    for name, s in meta["splits"].items():
        rows_tokens = s["rows"] * meta["seq_len"]
        share = lambda k: f"{100 * s[k] / rows_tokens:.2f}%" if rows_tokens else "-"  # noqa: E731
        lines.append(f"{name}: {_fmt(s['rows'])} rows, {_fmt(rows_tokens)} tokens, {_fmt(s['target_tokens'])} "
                     f"targets; not targets {_fmt(s['non_target_tokens'])} ({share('non_target_tokens')}): padding "
                     f"{_fmt(s['padding_tokens'])} ({share('padding_tokens')}), document first tokens "
                     f"{_fmt(s['document_first_tokens'])}, repeated context {_fmt(s['repeated_context_tokens'])}, "
                     f"lost targets {_fmt(s['lost_target_tokens'])}; {_fmt(s['documents_split'])} documents split")
    for src in meta["sources"]:
        lines.append(f"source {src['path']}: weight {src['weight']} (realized {src['weight_realized']}), "
                     f"{_fmt(src['documents_read'])} documents read, tokens in {_fmt(src['tokens_train_in'])} -> "
                     f"out {_fmt(src['tokens_train_out'])}, validation {_fmt(src['tokens_validation'])}"
                     + (f", skipped {_by_reason(src['skipped'])}" if src["skipped"] else "")
                     + (f", filtered {_by_reason(src['filtered'])}" if src["filtered"] else ""))
    return lines + [f"warning: {w}" for w in meta.get("warnings", [])]


def write_stats_png(meta: dict, path: Path) -> None:
    """Document length histogram and tokens by source (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    hist = meta["doc_length_histogram"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    starts = hist["bin_starts"]
    ax1.bar(starts, hist["counts"], width=starts, align="edge", color="tab:blue", edgecolor="white")
    ax1.set_xscale("log", base=2)
    ax1.axvline(meta["seq_len"], color="tab:red", linestyle="--", label=f"seq_len {meta['seq_len']:,}")
    ax1.set_xlabel("document length in tokens (bins [2^k, 2^(k+1)))")
    ax1.set_ylabel("documents")
    ax1.set_title(f"{hist['documents']:,} documents, mean {hist['mean']} tokens")
    ax1.legend()
    names = [Path(s["path"]).name or s["path"] for s in meta["sources"]]
    y = range(len(names))
    ax2.barh([i + 0.2 for i in y], [s["tokens_train_in"] for s in meta["sources"]], height=0.4, label="read (train)")
    ax2.barh([i - 0.2 for i in y], [s["tokens_train_out"] for s in meta["sources"]], height=0.4,
             label="after weights")
    ax2.set_yticks(list(y), names, fontsize=8)
    ax2.set_xlabel("tokens")
    ax2.set_title("tokens by source")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
