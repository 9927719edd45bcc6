"""results.json and the Markdown summary table."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(results: dict) -> str:
    """One row per model and length: overall and long-range perplexity, passkey accuracy."""
    lines = ["| model | length | ppl | ppl [L/4, L) | tokens | passkey |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in results["models"]:
        lengths = sorted({int(k) for k in m.get("perplexity", {})} | {int(k) for k in m.get("passkey", {})})
        for length in lengths:
            ppl = m.get("perplexity", {}).get(str(length))
            acc = m.get("passkey", {}).get(str(length))
            mean_acc = sum(acc.values()) / len(acc) if acc else None
            lines.append(
                f"| {m['name']} | {length} | {_fmt(ppl and ppl['ppl'])} "
                f"| {_fmt(ppl and ppl['long_range']['ppl'])} | {ppl['tokens'] if ppl else '-'} "
                f"| {_fmt(mean_acc)} |")
    return "\n".join(lines)


def write_results(results: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)  # never leave a half-written results.json behind
    return path
