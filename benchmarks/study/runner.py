"""Running longtrain commands as a user would: one subprocess per step, skipped when its output exists.

Each command's output goes to ``WORK/logs/<label>.log``; a failure stops the study with the log's
tail. Re-running the study continues where it stopped: finished steps are skipped and interrupted
training resumes from its last complete checkpoint.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.study.corpus import build_corpus
from benchmarks.study.recipe import BASE_L, REPO, method_overrides, seq_lens_needed
from longtrain.checkpoint import latest_complete, read_state
from tests.support.env import child_env


class Runner:
    """Starts ``python -m longtrain ...`` (or, with ``dry_run``, only prints it) and times it."""

    def __init__(self, work: Path, dry_run: bool, threads: int):
        self.work, self.dry_run = work, dry_run
        self.timings: dict[str, float] = {}
        # The same environment as the tests' subprocesses: offline, `threads` OMP threads, unbuffered.
        self.env = child_env(threads=threads)

    def longtrain(self, label: str, args: list) -> None:
        cmd = [sys.executable, "-m", "longtrain", *[str(a) for a in args]]
        print(f"[study] {label}: {' '.join(cmd[1:])}", flush=True)
        if self.dry_run:
            return
        log = self.work / "logs" / f"{label.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as handle:
            code = subprocess.call(cmd, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        self.timings[label] = round(time.perf_counter() - start, 1)
        if code != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
            raise SystemExit(f"[study] {label} failed (exit {code}); log {log}:\n{tail}")
        print(f"[study]   done in {self.timings[label]:.0f} s", flush=True)


def finished_step(run_dir: Path) -> int:
    """Global step of the run's latest complete checkpoint (0 if none)."""
    tag = latest_complete(run_dir / "checkpoints")
    return int(read_state(tag)["global_step"]) if tag else 0


def prepare_data(runner: Runner, recipe: dict, methods: dict, arms: list[str], shared: Path,
                 quick: bool) -> Path:
    """Corpus, tokenizer (trained on the training split only) and one dataset per length; returns
    the data folder. Each step is skipped when its output is there."""
    work = runner.work
    corpus = work / "corpus"
    if not (corpus / "manifest.json").is_file() and not runner.dry_run:
        build_corpus(corpus, shared, quick)
    tok_dir = work / "tokenizer"
    if runner.dry_run or not (tok_dir / "tokenizer.model").is_file():
        runner.longtrain("tokenizer", ["tokenizer", "--input", corpus / "train", "--vocab-size",
                                       recipe["model"]["config"]["vocab_size"], "--out", tok_dir, "--overwrite"])
    data_dir = work / "data"
    for seq_len in seq_lens_needed(methods, arms):
        out = data_dir / f"ds{seq_len}"
        if runner.dry_run or not (out / "meta.json").is_file():
            runner.longtrain(f"prepare {seq_len}", [
                "prepare", "--input", corpus / "train" / "prose", "--input", corpus / "train" / "code",
                "--tokenizer", tok_dir, "--seq-len", seq_len, "--out", out, "--overwrite", "--no-progress"])
    return data_dir


def train_base(runner: Runner, recipe_path: Path, data_dir: Path, steps: dict) -> Path:
    run_dir = runner.work / "runs" / "base"
    if runner.dry_run or finished_step(run_dir) < steps["base"]:
        # stop_after_steps ends the run at the end of stage 0, with its checkpoint (the one every
        # method resumes from); checkpoints every quarter give the held-out loss curve of the base.
        every = max(1, steps["base"] // 4)
        runner.longtrain("train base", [
            "train", "--config", recipe_path, "--run-dir", run_dir, "--resume", "auto",
            "--set", f"stages.0.data={data_dir / f'ds{BASE_L}'}", "--set", f"stages.0.steps={steps['base']}",
            "--set", f"stages.1.data={data_dir / 'ds512'}", "--set", f"train.stop_after_steps={steps['base']}",
            "--set", f"train.checkpoint_every={every}", "--set", "train.keep_checkpoints=0",
            "--set", f"train.log_every={max(1, steps['base'] // 40)}"])
    return run_dir


def train_method(runner: Runner, recipe_path: Path, base_ckpt: Path, run: dict, arm: dict,
                 data_dir: Path, steps: dict) -> Path:
    """Stage 1 of one method and seed, from the base checkpoint (or from its own, once it has one
    past the base: an interrupted extension resumes)."""
    run_dir = runner.work / "runs" / run["dir"]
    done = 0 if runner.dry_run else finished_step(run_dir)
    if done >= steps["base"] + steps["extend"]:
        return run_dir
    resume = "auto" if done > steps["base"] else base_ckpt
    args = ["train", "--config", recipe_path, "--run-dir", run_dir, "--resume", resume]
    for item in method_overrides(arm, run["spec"], data_dir, run["seed"], steps):
        args += ["--set", item]
    args += ["--set", f"train.log_every={max(1, steps['extend'] // 10)}"]
    runner.longtrain(f"train {run['dir']}", args)
    return run_dir
