"""Evaluate several models side by side: perplexity by position, passkey retrieval and the context
probes (repeat-copy gain by distance, key-value retrieval by length and depth)."""
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
from longtrain.eval.plots import plot_passkey, plot_ppl_by_position, plot_probes
from longtrain.eval.probes import kv_retrieval_accuracy, repeat_copy_gain
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
    copy_distances: list[int] | None = None
    """Start-to-start distances of the repeat-copy probe; None: ``length - copy_passage`` for each
    perplexity length (the sequence then fills that length: 96 and 480 for 128 and 512 at P = 32)."""
    copy_passage: int = 32
    """Tokens per copied passage."""
    copy_passages: int = 32
    """Passages (sequences) per distance; 0 skips the copy probe."""
    kv_lengths: list[int] | None = None
    """Prompt lengths of the key-value retrieval probe; None: the perplexity lengths."""
    kv_depths: tuple[float, ...] = DEFAULT_DEPTHS
    kv_trials: int = 10
    """Prompts per length and depth; 0 skips the retrieval probe."""
    kv_keys: int = 4
    """Key lines per prompt (one asked, the others distractors)."""
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
        for key in ("passkey_trials", "copy_passages", "kv_trials"):
            if getattr(self, key) < 0:
                raise EvalError(f"{key} must be >= 0")
        if self.copy_passage < 2 or self.kv_keys < 1:
            raise EvalError("copy_passage must be >= 2 tokens and kv_keys >= 1")
        for key in ("passkey_depths", "kv_depths"):
            bad = [d for d in getattr(self, key) if not 0 <= d <= 1]
            if bad:
                raise EvalError(f"{key} {bad}: depths are fractions between 0 and 1")
        short = [d for d in self.copy_distances or [] if d < self.copy_passage]
        if short:
            raise EvalError(f"copy_distances {short}: shorter than copy_passage ({self.copy_passage} tokens); the "
                            "distance is start-to-start, so the copies would overlap")


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
    entry.update(_probes(model, docs, lengths, cfg))
    return entry


def _probes(model: EvalModel, docs, lengths: list[int], cfg: EvalConfig) -> dict:
    """The context probes (longtrain/eval/probes.py) on the held-out documents: ``copy`` (one dict per
    distance) and ``kv`` (``{length: {depth: accuracy}}``, with ``kv_details``)."""
    if not (cfg.copy_passages or cfg.kv_trials):
        return {}
    stream = filler_tokens(docs, model.tokenizer)  # held-out text, BOS removed: passages and filler
    reset = lambda: reset_rotary_embeddings(model.model)  # noqa: E731  (a fresh RoPE state per forward)
    batch = max(1, cfg.batch_tokens // max(lengths + list(cfg.kv_lengths or [])))
    out = {}
    if cfg.copy_passages:
        distances = cfg.copy_distances or [L - cfg.copy_passage for L in lengths if L > cfg.copy_passage]
        log.info("%s: repeat-copy gain at distances %s", model.name, distances)
        try:
            out["copy"] = repeat_copy_gain(model.model, stream, distances, cfg.copy_passage, cfg.copy_passages,
                                           cfg.seed, batch, before_each=reset)
        except ValueError as exc:  # held-out text too short for the spans
            raise EvalError(f"{model.name}: repeat-copy probe: {exc} (--copy-passages 0 skips it)") from None
    if cfg.kv_trials:
        bos = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else []
        kv_lengths = cfg.kv_lengths or lengths
        log.info("%s: key-value retrieval at lengths %s", model.name, kv_lengths)
        try:
            cells = kv_retrieval_accuracy(model.model, model.tokenizer.encode, stream, kv_lengths, cfg.kv_depths,
                                          cfg.kv_trials, cfg.kv_keys, seed=cfg.seed, prefix=bos,
                                          batch_size=batch, before_each=reset)
        except ValueError as exc:  # the tokenizer merges newlines or values, or a length too short
            if cfg.kv_lengths:  # asked for by name: an error
                raise EvalError(f"{model.name}: key-value retrieval probe: {exc} (--kv-trials 0 skips it)") from None
            log.warning("%s: key-value retrieval skipped: %s", model.name, exc)
            out["kv_skipped"] = str(exc)  # on record in results.json, not silently missing
            return out
        out["kv"] = {}
        for c in cells:
            out["kv"].setdefault(str(c["length"]), {})[f"{c['depth']:g}"] = c["accuracy"]
        out["kv_details"] = cells
    return out


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
    probe_png = plot_probes(results, out / "probes.png")
    results["files"].update({k: str(v) for k, v in (("ppl_by_position", ppl_png), ("passkey", key_png),
                                                    ("probes", probe_png)) if v})
    (out / "summary.md").write_text(markdown_table(results) + "\n")
    write_results(results, out)
    return results
