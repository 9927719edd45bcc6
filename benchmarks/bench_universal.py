"""What resuming on another number of ranks costs: DeepSpeed's universal conversion of a checkpoint.

Trains a ~100M-parameter Llama (vocab 32000, hidden 768, 11 layers, tied embeddings) for one step on
2 ranks (``longtrain train`` under torchrun, gloo on CPU), which saves a ZeRO checkpoint, then converts
it exactly as ``longtrain train --resume`` does on another world size
(``longtrain.universal_checkpoint.convert``: DeepSpeed's ``ds_to_universal`` in a subprocess) and
prints the conversion time and the disk use of the original DeepSpeed files and of the universal copy.
With ``--resume-ranks N`` it then resumes the checkpoint on N ranks for one more step (the converted
copy is reused) and prints that run's wall time.

    python benchmarks/bench_universal.py                          # ZeRO-2, fp32, 2 ranks
    python benchmarks/bench_universal.py --zero 3 --precision bf16 --resume-ranks 1

The corpus and tokenizer are ../shared/data's (Pride and Prejudice, OpenLLaMA's tokenizer); the
numbers of a run are printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LONGTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
CORPUS = SHARED / "corpora" / "pride_and_prejudice.txt"
TOKENIZER = SHARED / "tokenizers" / "open_llama_tokenizer.model"
MODEL = dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=11,
             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=128, tie_word_embeddings=True)
SEQ_LEN = 128


def prepared(work: Path) -> Path:
    from data_prep.cli import prepare_main

    dest = work / "data"
    if not (dest / "meta.json").exists():
        args = ["--tokenizer", str(TOKENIZER), "--seq-len", str(SEQ_LEN), "--strategy", "best-fit", "--input",
                str(CORPUS), "--out", str(dest), "--no-plot", "--no-progress", "--overwrite"]
        if prepare_main(args) != 0:
            raise SystemExit(f"preparing {dest} failed")
    return dest


def write_config(work: Path, data: Path, zero: int, precision: str) -> Path:
    import yaml

    cfg = {"model": {"config": MODEL, "tokenizer": str(TOKENIZER)},
           "train": {"zero_stage": zero, "precision": precision, "tensorboard": False, "checkpoint_every": 0,
                     "optimizer": {"impl": "torch"}},
           "stages": [{"name": "s128", "seq_len": SEQ_LEN, "rope": {"type": "default", "theta": 10000},
                       "data": str(data), "steps": 1, "lr": 1.0e-4, "micro_batch_size": 1,
                       "global_batch_rows": 2}]}
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(config: Path, run_dir: Path, nproc: int, *extra: str) -> tuple[float, str]:
    """Wall seconds and stdout of one `longtrain train` (torchrun for several ranks)."""
    from tests.support.env import child_env, free_port

    launcher = ([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port()), "-m", "longtrain.cli"]
                if nproc > 1 else [sys.executable, "-m", "longtrain.cli"])
    cmd = launcher + ["train", "--config", str(config), "--run-dir", str(run_dir), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=child_env(threads=max(1, (os.cpu_count() or 2) // nproc)),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def deepspeed_bytes(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.glob("*_states.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench_universal")
    parser.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the run that saves the checkpoint")
    parser.add_argument("--resume-ranks", type=int, default=0, help="also resume on this many ranks (0: no)")
    args = parser.parse_args()
    if not TOKENIZER.is_file() or not CORPUS.is_file():
        raise SystemExit(f"needs {TOKENIZER} and {CORPUS} (../shared/data; set LONGTRAIN_SHARED_DATA)")

    from longtrain import checkpoint, universal_checkpoint

    work = args.work_dir / f"zero{args.zero}_{args.precision}"
    shutil.rmtree(work / "run", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(work, prepared(work), args.zero, args.precision)
    train_s, out = train(config, work / "run", args.ranks)
    n_params = re.search(r"model: ([\d,]+) parameters", out).group(1)  # the trainer's own count
    tag_dir = checkpoint.latest_complete(work / "run" / "checkpoints")
    state = checkpoint.read_state(tag_dir)
    start = time.perf_counter()
    universal = universal_checkpoint.convert(tag_dir, log=print)
    convert_s = time.perf_counter() - start
    record = json.loads((universal / universal_checkpoint.DONE_FILE).read_text())
    original = deepspeed_bytes(tag_dir)
    rows = [("model", f"Llama, {n_params} parameters (fp32 master weights + Adam moments)"),
            ("saved by", f"{args.ranks} ranks, ZeRO-{args.zero}, {args.precision} (global step "
                         f"{state['global_step']}; training run {train_s:.0f} s)"),
            ("DeepSpeed files", f"{original / 2**20:,.0f} MiB"),
            ("conversion", f"{convert_s:.1f} s wall; DeepSpeed's converter used {record['converter_cpu_seconds']:.1f} "
                           f"CPU s (its subprocess and workers; importing torch and deepspeed takes 2.4 of them)"),
            ("universal copy", f"{record['bytes'] / 2**20:,.0f} MiB ({record['bytes'] / original:.2f}x the "
                               f"DeepSpeed files)")]
    if args.resume_ranks:
        steps = state["global_step"] + 1
        resume_s, _ = train(config, work / "resumed", args.resume_ranks, "--resume", str(tag_dir), "--set",
                         f"stages.0.steps={steps}")
        rows.append((f"resume on {args.resume_ranks}", f"{resume_s:.0f} s wall for one more step (conversion "
                                                       "reused)"))
    print("\n| what | measured |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
