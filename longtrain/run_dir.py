"""The run folder's bookkeeping (docs/internals.md "Checkpoint layout"): the resolved config, the
tokenizer copy, ``metrics.jsonl`` and the per-rank samples logs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_prep.tokenizer import resolve_tokenizer_file
from longtrain.config import RunConfig, dump_config

RESOLVED_CONFIG = "config.resolved.yaml"
METRICS = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"


def write_run_files(run_dir: Path, cfg: RunConfig, tokenizer: Path | None) -> None:
    """The resolved config, and a copy of the tokenizer (export and eval need it; the source may move)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / RESOLVED_CONFIG)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, run_dir / TOKENIZER_DIR)


def copy_tokenizer(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        # Under the standard name of its kind, which is what export and eval look for.
        _, kind = resolve_tokenizer_file(source)
        shutil.copy2(source, dest / ("tokenizer.json" if kind == "hf" else "tokenizer.model"))
        return
    for child in source.iterdir():
        if child.is_file() and (child.name.startswith("tokenizer") or child.name in
                                ("special_tokens_map.json", "vocab.json", "merges.txt")):
            shutil.copy2(child, dest / child.name)


def samples_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"samples.rank{rank}.jsonl"


def append_samples(run_dir: Path, rank: int, record: dict) -> None:
    """One line per step: the dataset rows this rank read (``train.log_samples``; audits data order)."""
    with open(samples_path(run_dir, rank), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_logs(run_dir: Path, last_step: int) -> None:
    """Forget what an interrupted run logged after the checkpoint it resumes from: those steps run again."""
    truncate_jsonl(run_dir / METRICS, last_step)
    for samples in run_dir.glob("samples.rank*.jsonl"):
        truncate_jsonl(samples, last_step)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records with ``step > last_step`` (a cut-off last line is dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
