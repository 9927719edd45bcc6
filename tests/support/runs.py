"""Write run configs, launch real training runs (subprocesses, gloo on 127.0.0.1), read what they logged.

The corpus of these runs is the Python standard library's own sources (``tests.support.text``):
real text present on every machine, CI included, where ../shared/data may be absent.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.support.env import REPO_ROOT, child_env

BIN = Path(sys.executable).parent


def two_stage_recipe(datasets: dict[int, Path], **stage_over) -> list[dict]:
    """Stage 1: 64 tokens at base 10k; stage 2: 128 tokens at base 1M (the mission's recipe, tiny)."""
    stages = [
        {"name": "s64_base10k", "seq_len": 64, "rope": {"type": "default", "theta": 10000},
         "data": str(datasets[64]), "steps": 4, "lr": 2e-3, "warmup_steps": 1, "micro_batch_size": 2,
         "grad_accum": 2},
        {"name": "s128_base1M", "seq_len": 128, "rope": {"type": "default", "theta": 1000000},
         "data": str(datasets[128]), "steps": 4, "lr": 1e-3, "micro_batch_size": 1, "grad_accum": 2},
    ]
    for key, value in stage_over.items():
        index, _, field = key.partition("__")
        stages[int(index[1:])][field] = value
    return stages


def write_config(path: Path, stages: list[dict], model: dict, train: dict | None = None) -> Path:
    base_train = {"precision": "fp32", "zero_stage": 2, "tensorboard": False, "log_samples": True,
                  "activation_checkpointing": True, "loss_chunk_tokens": 48}
    base_train.update(train or {})
    path.write_text(yaml.safe_dump({"model": model, "train": base_train, "stages": stages}, sort_keys=False))
    return path


def torchrun_cmd(nproc: int, port: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port), "-m", "longtrain.cli"]


def single_cmd() -> list[str]:
    return [sys.executable, "-m", "longtrain.cli"]


def train_args(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--run-dir", str(run_dir), *extra]


def run(cmd: list[str], timeout: float = 600, log: Path | None = None, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(proc.args[:6])} ...\n"
                             f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n--- stderr (tail) ---\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def start(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    """Start a run in its own process group (so a SIGKILL takes every rank and the launcher)."""
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(**env), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return out


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def samples(run_dir: Path) -> dict[tuple[int, int], list]:
    """{(step, dp_rank): rows} over all ranks' sample logs (SP ranks of one DP rank agree)."""
    out: dict[tuple[int, int], list] = {}
    for path in sorted(run_dir.glob("samples.rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            key = (rec["step"], rec["dp_rank"])
            if key in out:
                assert out[key] == rec["rows"], f"SP ranks of dp {key[1]} read different rows at step {key[0]}"
            out[key] = rec["rows"]
    return out


def rows_per_step(run_dir: Path) -> dict[int, list[int]]:
    """{step: sorted dataset rows of the whole step over all DP ranks}."""
    out: dict[int, list[int]] = {}
    for (step, _), rows in samples(run_dir).items():
        out.setdefault(step, []).extend(r for micro in rows for r in micro)
    return {k: sorted(v) for k, v in out.items()}
