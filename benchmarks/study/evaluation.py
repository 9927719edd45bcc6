"""Evaluation: `longtrain export` the base, write the training-free variants, `longtrain eval` everything.

Trained models are evaluated straight from their run folders (latest checkpoint), the base and the
training-free variants from export folders. Every call's ``results.json`` is kept and reused while
it is newer than every model it covers, so a retrained model is evaluated again.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.study.corpus import HELDOUT_SETS
from benchmarks.study.recipe import BASE_L
from benchmarks.study.runner import Runner
from benchmarks.study.variants import variant_is_current, write_rope_variant
from longtrain.checkpoint import COMPLETE_FILE, latest_complete, tag_for

BUCKET = 32  # divides L/4 = 32, L = 128 and every eval length: range_ppl needs whole buckets


def model_mtime(path: Path) -> float:
    """When a model to evaluate last changed: its newest complete checkpoint, or its config.json."""
    tag = latest_complete(path / "checkpoints") if (path / "checkpoints").is_dir() else path
    for marker in (tag / COMPLETE_FILE if tag else None, path / "config.json"):
        if marker is not None and marker.is_file():
            return marker.stat().st_mtime
    return float("inf")  # unknown: evaluate again


def eval_call(runner: Runner, label: str, out: Path, models: list[tuple[str, Path]], data: Path,
              lengths: list[int]) -> dict | None:
    """One `longtrain eval` over several models; skipped when a finished results.json has the same
    models and lengths and is newer than every model (a retrained model is evaluated again)."""
    names = [n for n, _ in models]
    done = out / "results.json"
    if not runner.dry_run and done.is_file():
        old = json.loads(done.read_text(encoding="utf-8"))
        fresh = all(model_mtime(Path(p)) < done.stat().st_mtime for _, p in models)
        if fresh and "files" in old and [m["name"] for m in old["models"]] == names \
                and old["settings"]["lengths"] == lengths:
            return old
    args = ["eval", *[p for _, p in models], "--names", *names, "--data", data, "--lengths", *lengths,
            "--bucket-size", BUCKET, "--passkey-trials", 0, "--no-progress", "--out", out]
    runner.longtrain(label, args)
    return None if runner.dry_run else json.loads(done.read_text(encoding="utf-8"))


def arm_models(runner: Runner, arm_name: str, arm: dict, runs: list[dict], export: Path) -> list[tuple[str, Path]]:
    """(name, folder) of every model an arm evaluates: the base, its training-free variants (written
    here when missing or stale) and each of its runs."""
    work = runner.work
    models = [("base-128", export)]
    for tf in arm.get("training_free", []):
        folder = work / "export" / "training_free" / f"{arm_name}_{tf['name']}"
        if not runner.dry_run and not variant_is_current(folder, tf["rope"], BASE_L, model_mtime(export)):
            write_rope_variant(export, folder, tf["rope"], BASE_L)
        models.append((f"{tf['name']} (no training)", folder))
    models += [(f"{r['method']} s{r['seed']}", work / "runs" / r["dir"]) for r in runs if r["arm"] == arm_name]
    return models


def evaluate(runner: Runner, methods: dict, arms: list[str], runs: list[dict], base_dir: Path,
             steps: dict) -> dict:
    """All eval calls; returns {call name: results.json} (values None in a dry run)."""
    work = runner.work
    base_ckpt = base_dir / "checkpoints" / tag_for(steps["base"])
    export = work / "export" / "base"
    if runner.dry_run or not (export / "config.json").is_file():
        runner.longtrain("export base", ["export", base_ckpt, export, "--dtype", "fp32", "--overwrite",
                                         "--no-progress"])
    results = {}
    heldout = work / "corpus" / "heldout"
    # Held-out perplexity at L of the base along its training (is it converged?).
    every = max(1, steps["base"] // 4)
    curve = [(f"base@{s}", base_dir / "checkpoints" / tag_for(s)) for s in range(every, steps["base"] + 1, every)]
    for kind in HELDOUT_SETS:
        results[f"curve_{kind}"] = eval_call(runner, f"eval curve {kind}", work / "eval" / f"curve_{kind}",
                                             curve, heldout / kind, [BASE_L])
    for arm_name in arms:
        arm = methods["arms"][arm_name]
        models = arm_models(runner, arm_name, arm, runs, export)
        for kind in HELDOUT_SETS:
            results[f"{arm_name}_{kind}"] = eval_call(
                runner, f"eval {arm_name} {kind}", work / "eval" / f"{arm_name}_{kind}", models, heldout / kind,
                list(arm["eval_lengths"]))
    return results
