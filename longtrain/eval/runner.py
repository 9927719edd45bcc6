"""Evaluate several models side by side: perplexity by position and passkey retrieval."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

import longtrain
from longtrain.eval.data import EvalData, filler_tokens, read_data, tokenize_documents
from longtrain.eval.loading import EvalModel, load_eval_model, reset_rotary_embeddings, rope_settings
from longtrain.eval.passkey import DEFAULT_DEPTHS, check_passkey_setup, evaluate_passkey
from longtrain.eval.perplexity import check_chunked_loss, perplexity_at_length
from longtrain.eval.plots import plot_passkey, plot_ppl_by_position
from longtrain.eval.report import markdown_table, write_results
from longtrain.eval.errors import EvalError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalConfig:
    lengths: list[int] | None = None
    """Context lengths for perplexity; None: each model's max_position_embeddings."""
    stride: int | None = None
    """Sliding-window stride; None: cut documents into full-length chunks."""
    bucket_size: int | None = None
    """Positions per bucket; None: length // 16."""
    max_tokens: int | None = None
    """Scored tokens per model and length (None: every window of every document)."""
    passkey_lengths: list[int] | None = None
    """None: the perplexity lengths."""
    passkey_depths: tuple[float, ...] = DEFAULT_DEPTHS
    passkey_trials: int = 5
    """0 skips passkey retrieval."""
    passkey_max_new_tokens: int = 8
    filler: str | None = None
    """An input (as --data) whose tokens fill passkey prompts; None: the --data documents."""
    text_field: str = "text"
    """JSONL field / Parquet or datasets column holding the text (as `longtrain prepare --text-field`)."""
    skip_bad: bool = False
    """Skip and count bad documents instead of stopping at the first (as `longtrain prepare --skip-bad`)."""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    attn_implementation: str = "sdpa"
    batch_tokens: int = 8192
    progress: bool = True

    def __post_init__(self):
        for key in ("lengths", "passkey_lengths"):
            for v in getattr(self, key) or []:
                if v < 2:
                    raise EvalError(f"{key}: {v} is too short (at least 2 tokens)")
        for v in (self.stride, self.bucket_size, self.max_tokens):
            if v is not None and v < 1:
                raise EvalError("stride, bucket_size and max_tokens must be >= 1")
        if self.passkey_trials < 0:
            raise EvalError("passkey_trials must be >= 0")
        bad = [d for d in self.passkey_depths if not 0 <= d <= 1]
        if bad:
            raise EvalError(f"passkey_depths {bad}: depths are fractions between 0 and 1")


def _unique_names(paths: list[str], names: list[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(paths):
            raise EvalError(f"--names: {len(names)} names for {len(paths)} models")
        return names
    base = [Path(p.rstrip("/")).name or p for p in paths]
    return [b if base.count(b) == 1 else f"{b}#{i}" for i, b in enumerate(base)]


def _lengths_for(model: EvalModel, cfg: EvalConfig) -> list[int]:
    if cfg.lengths:
        return list(cfg.lengths)
    trained = getattr(model.model.config, "max_position_embeddings", None)
    if not trained:
        raise EvalError(f"{model.path}: no max_position_embeddings in config; pass --lengths")
    return [int(trained)]


def evaluate_model(model: EvalModel, data: EvalData, cfg: EvalConfig, filler_data: EvalData | None = None) -> dict:
    """Everything for one model: per-length perplexity on a fresh RoPE state, then passkey."""
    check_chunked_loss(model.model, model.tokenizer.vocab_size)
    docs = tokenize_documents(data, model.tokenizer)
    lengths = _lengths_for(model, cfg)
    longest = max((len(d) for d in docs), default=0)
    too_long = [L for L in lengths if L > longest]
    if too_long:  # say so before hours of evaluation at the other lengths
        raise EvalError(f"--lengths {too_long}: no document has that many tokens with {model.name}'s "
                         f"tokenizer (longest: {longest}); use shorter lengths or longer documents")
    passkey_lengths = cfg.passkey_lengths or lengths
    if cfg.passkey_trials:
        check_passkey_setup(model.tokenizer, passkey_lengths, cfg.passkey_max_new_tokens)
    entry = {"name": model.name, "path": model.path, "kind": model.kind,
             "rope": rope_settings(model.model.config), "tokenizer": model.tokenizer.identity(),
             "parameters": sum(p.numel() for p in model.model.parameters()), "perplexity": {}}
    for length in lengths:
        reset_rotary_embeddings(model.model)  # DESIGN.md 3b trap b: no stale dynamic-NTK base
        entry["perplexity"][str(length)] = perplexity_at_length(
            model.model, docs, length, stride=cfg.stride, bucket_size=cfg.bucket_size,
            max_tokens=cfg.max_tokens, batch_tokens=cfg.batch_tokens, progress=cfg.progress,
            desc=f"{model.name} ppl@{length}")
    if cfg.passkey_trials:
        filler_docs = docs if filler_data is None else tokenize_documents(filler_data, model.tokenizer)
        filler = filler_tokens(filler_docs, model.tokenizer)
        cells = []
        for length in passkey_lengths:
            cells += evaluate_passkey(
                model.model, model.tokenizer, filler, length, cfg.passkey_depths, cfg.passkey_trials,
                cfg.seed, cfg.passkey_max_new_tokens, before_each=lambda: reset_rotary_embeddings(model.model),
                progress=cfg.progress, desc=f"{model.name} passkey@{length}")
        entry["passkey"] = {}
        for c in cells:
            entry["passkey"].setdefault(str(c["length"]), {})[f"{c['depth']:g}"] = c["accuracy"]
        entry["passkey_details"] = cells
    return entry


def run_eval(model_paths: list[str], data_paths: list[str], out_dir: str | Path, cfg: EvalConfig,
             names: list[str] | None = None) -> dict:
    """Evaluate each model in turn (one in memory at a time); write results.json and the plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(model_paths, names)
    data = read_data(data_paths, cfg.text_field, cfg.skip_bad)
    filler_data = read_data([cfg.filler], cfg.text_field, cfg.skip_bad) if cfg.filler else None
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}
    results = {"format": 1, "longtrain_version": longtrain.__version__, "settings": settings,
               "data": data.describe(), "models": []}
    for path, name in zip(model_paths, names):
        start = time.perf_counter()
        model = load_eval_model(path, name, cfg.device, cfg.dtype, cfg.attn_implementation)
        entry = evaluate_model(model, data, cfg, filler_data)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        results["models"].append(entry)
        del model
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
        write_results(results, out)  # after every model: a crash later keeps what was measured
    results["files"] = {"results": str(out / "results.json")}
    ppl_png = plot_ppl_by_position(results, out / "ppl_by_position.png")
    key_png = plot_passkey(results, out / "passkey.png")
    results["files"].update({k: str(v) for k, v in (("ppl_by_position", ppl_png), ("passkey", key_png)) if v})
    (out / "summary.md").write_text(markdown_table(results) + "\n")
    write_results(results, out)
    return results
