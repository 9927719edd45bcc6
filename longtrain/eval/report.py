"""results.json and the Markdown summary table."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mean(cells: dict | None):
    return sum(cells.values()) / len(cells) if cells else None


def markdown_table(results: dict) -> str:
    """One row per model and length: overall and long-range perplexity, passkey accuracy, the
    repeat-copy gain of the distance whose sequence fills that length (nats/token, with the distance)
    and key-value retrieval accuracy (both means over the depths)."""
    lines = ["| model | length | ppl | ppl [L/4, L) | tokens | passkey | copy gain (d) | kv retrieval |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in results["models"]:
        copy = {c["tokens"]: c for c in m.get("copy", [])}
        keyed = [m.get(k, {}) for k in ("perplexity", "passkey", "kv")]
        lengths = sorted({int(k) for d in keyed for k in d} | set(copy))
        for length in lengths:
            ppl = m.get("perplexity", {}).get(str(length))
            c = copy.get(length)
            gain = f"{c['gain']:+.2f} ({c['distance']})" if c else "-"
            lines.append(
                f"| {m['name']} | {length} | {_fmt(ppl and ppl['ppl'])} "
                f"| {_fmt(ppl and ppl['long_range']['ppl'])} | {ppl['tokens'] if ppl else '-'} "
                f"| {_fmt(_mean(m.get('passkey', {}).get(str(length))))} | {gain} "
                f"| {_fmt(_mean(m.get('kv', {}).get(str(length))))} |")
    return "\n".join(lines)


def write_results(results: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)  # never leave a half-written results.json behind
    return path
