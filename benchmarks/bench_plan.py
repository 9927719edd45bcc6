"""How close is ``longtrain plan`` to what the trainer measures? Predicted vs measured peak memory on CPU.

Each configuration trains a few steps through the real trainer (``longtrain train`` subprocesses; two
ranks under ``torchrun`` for sequence parallelism), which logs, every step, the peak it measured
(``peak_mem_gb``: peak RSS of rank 0) next to the peak its start-up plan predicted
(``peak_mem_pred_gb``: the same ``longtrain.plan`` code as ``longtrain plan``). The table compares the
last step's values (the first step runs before Adam's moments exist). Goal: within +-15% for every one.

Corpora: ../shared/data books and WikiText (packed best-fit), the OpenLLaMA tokenizer (vocab 32000)
and a 2048-piece BPE trained here by ``longtrain tokenizer``; models built from a config (Llama shapes).

    python benchmarks/bench_plan.py                     # every configuration (~50 min on 2 busy cores)
    python benchmarks/bench_plan.py --only zero3_full_16k sp2_ring_16k
    python benchmarks/bench_plan.py --list

The parent process imports no torch: the trainer's ``ru_maxrss`` would otherwise start from the
parent's resident size (it survives fork and exec).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LONGTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
CORPORA = [SHARED / "corpora" / name for name in ("pride_and_prejudice.txt", "frankenstein.txt",
                                                   "wikitext2_valid.jsonl", "tinyshakespeare.txt")]
TOKENIZER_32K = SHARED / "tokenizers" / "open_llama_tokenizer.model"
GOAL = 0.15

SMALL = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
WIDE = dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
            num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)


def config(name, what, model, vocab, seq_len, train, micro=1, sp=1, mode="ulysses", ranks=1, accum=1, **model_over):
    return {"name": name, "what": what, "model": {**model, **model_over}, "vocab": vocab, "seq_len": seq_len,
            "train": train, "micro": micro, "sp": sp, "mode": mode, "ranks": ranks, "accum": accum}


CONFIGS = [
    config("zero0_none_2k", "ZeRO-0, no checkpointing, vocab 2k, untied 30M", WIDE, 2048, 2048,
           {"zero_stage": 0, "activation_checkpointing": False}),
    config("zero1_sel_4k_mb2", "ZeRO-1, selective, micro batch 2 x 4k, vocab 32k", SMALL, 32000, 4096,
           {"zero_stage": 1}, micro=2),
    config("zero2_sel_gqa_8k", "ZeRO-2, selective, GQA 4/2 heads, vocab 32k", SMALL, 32000, 8192,
           {"zero_stage": 2}, num_key_value_heads=2),
    config("zero2_none_4k", "ZeRO-2, no checkpointing, vocab 32k", SMALL, 32000, 4096,
           {"zero_stage": 2, "activation_checkpointing": False}),
    config("zero2_offload_2k", "ZeRO-2 + optimizer offload (DeepSpeedCPUAdam), untied 30M, vocab 32k", WIDE,
           32000, 2048, {"zero_stage": 2, "offload_optimizer": True}),
    config("zero3_full_16k", "ZeRO-3, full recomputation, vocab 32k", SMALL, 32000, 16384, {"zero_stage": 3}),
    config("zero2_sel_32k", "ZeRO-2, selective, 32k tokens, vocab 2k", SMALL, 2048, 32768, {"zero_stage": 2}),
    config("sp2_ulysses_16k", "SP 2 Ulysses, ZeRO-2, selective, GQA 4/2, vocab 32k", SMALL, 32000, 16384,
           {"zero_stage": 2}, sp=2, ranks=2, num_key_value_heads=2),
    config("sp2_ring_16k", "SP 2 ring, ZeRO-3, full, vocab 32k", SMALL, 32000, 16384, {"zero_stage": 3}, sp=2,
           mode="ring", ranks=2),
    config("dp2_zero2_accum2_8k", "2 ranks data parallel, ZeRO-2, selective, 2 micro-batches per step, vocab 2k",
           SMALL, 2048, 8192, {"zero_stage": 2}, ranks=2, accum=2),
    config("zero2_tiled4_16k", "ZeRO-2, selective, MLP in 4 tiles (train.tiled_mlp), vocab 32k", SMALL, 32000,
           16384, {"zero_stage": 2, "tiled_mlp": 4}),
]


def env() -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
    return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "longtrain.cli", *args]


def tokenizer_2k(out: Path) -> Path:
    dest = out / "tok2k"
    if not (dest / "tokenizer.model").exists():
        args = ["tokenizer", "--vocab-size", "2048", "--out", str(dest)]
        for corpus in CORPORA:
            args += ["--input", str(corpus)]
        subprocess.run(cli(*args), check=True, env=env(), cwd=REPO, capture_output=True)
    return dest / "tokenizer.model"


def dataset(out: Path, vocab: int, seq_len: int) -> tuple[Path, Path]:
    tokenizer = TOKENIZER_32K if vocab == 32000 else tokenizer_2k(out)
    dest = out / f"data_v{vocab}_{seq_len}"
    if not (dest / "meta.json").exists():
        args = ["prepare", "--tokenizer", str(tokenizer), "--seq-len", str(seq_len), "--strategy", "best-fit",
                "--out", str(dest), "--no-plot", "--no-progress", "--overwrite"]
        for corpus in CORPORA:
            args += ["--input", str(corpus)]
        subprocess.run(cli(*args), check=True, env=env(), cwd=REPO, capture_output=True)
    return dest, tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(c: dict, out: Path, steps: int) -> dict:
    data, tokenizer = dataset(out, c["vocab"], c["seq_len"])
    run_dir = out / "runs" / c["name"]
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    recipe = {
        "model": {"config": {**c["model"], "vocab_size": c["vocab"], "max_position_embeddings": c["seq_len"]},
                  "tokenizer": str(tokenizer)},
        "train": {"precision": "fp32", "tensorboard": False, "checkpoint_every": 0, "keep_checkpoints": 1,
                  "activation_checkpointing": True, **c["train"]},
        "stages": [{"name": c["name"], "seq_len": c["seq_len"], "rope": {"type": "default", "theta": 10000},
                    "data": str(data), "steps": steps, "lr": 1e-4, "micro_batch_size": c["micro"], "grad_accum": c["accum"],
                    "sp_size": c["sp"], "sp_mode": c["mode"]}],
    }
    cfg_path = run_dir / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    args = ["train", "--config", str(cfg_path), "--run-dir", str(run_dir / "out")]
    if c["ranks"] == 1:
        cmd = cli(*args)
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(c["ranks"]),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "longtrain.cli", *args]
    start = time.time()
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True)
    (run_dir / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{c['name']} failed (exit {proc.returncode}); log: {run_dir / 'log.txt'}\n"
                         f"{proc.stderr[-3000:]}")
    return {**plan_vs_measured(run_dir / "out"), "seconds": time.time() - start}


def plan_vs_measured(run_dir: str | Path) -> dict:
    """Predicted and measured peak of a finished run: the last step's record of ``metrics.jsonl``
    (``peak_mem_pred_gb`` is the trainer's start-up plan; ``peak_mem_gb`` what it measured: peak RSS on
    CPU, ``torch.cuda.max_memory_allocated`` on CUDA; ``peak_reserved_gb`` when logged). Used by this
    benchmark and meant for ``benchmarks/gpu_check.py``'s plan section."""
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line]
    last = records[-1]
    pred, meas = last["peak_mem_pred_gb"], last["peak_mem_gb"]
    return {"predicted_gb": pred, "measured_gb": meas, "error": pred / meas - 1,
            "reserved_gb": last.get("peak_reserved_gb"), "steps": len(records),
            "step_seconds": last["step_seconds"], "tokens": last["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_plan")
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration (the last one is compared)")
    parser.add_argument("--only", nargs="*", default=None, help="configuration names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    args = parser.parse_args()
    if args.list:
        for c in CONFIGS:
            print(f"{c['name']:<20} {c['what']} ({c['seq_len']} tokens x {c['micro']})")
        return
    by_name = {c["name"]: c for c in CONFIGS}
    unknown = [name for name in args.only or [] if name not in by_name]
    if unknown:
        raise SystemExit(f"unknown configuration {unknown[0]!r}; --list shows them")
    chosen = [by_name[name] for name in args.only] if args.only else CONFIGS  # in the order given
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in chosen:
        result = run_config(c, args.out, args.steps)
        rows.append((c, result))
        print(f"{c['name']}: predicted {result['predicted_gb']:.3f} GiB, measured {result['measured_gb']:.3f} GiB "
              f"({100 * result['error']:+.1f}%), {result['seconds']:.0f} s", flush=True)
    print("\n| configuration | what | tokens per micro-batch | predicted GiB | measured GiB | error |")
    print("|---|---|---|---|---|---|")
    for c, r in rows:
        print(f"| {c['name']} | {c['what']} | {c['seq_len'] * c['micro']} | {r['predicted_gb']:.3f} | "
              f"{r['measured_gb']:.3f} | {100 * r['error']:+.1f}% |")
    worst = max(abs(r["error"]) for _, r in rows)
    print(f"\nworst |error| {100 * worst:.1f}% (goal {100 * GOAL:.0f}%): {'met' if worst <= GOAL else 'MISSED'}")
    (args.out / "bench_plan.json").write_text(json.dumps(
        [{"name": c["name"], "what": c["what"], **r} for c, r in rows], indent=1))


if __name__ == "__main__":
    main()
