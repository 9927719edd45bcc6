"""What checkpoint integrity costs: save, verify and load times with and without sha256 manifests.

A ~100M-parameter Llama (vocab 32000, tied embeddings) under the trainer's DeepSpeed settings
(ZeRO-2, fp32, torch AdamW) on 2 gloo ranks (CPU) takes one optimizer step, so that the Adam moments
exist, then is saved with ``longtrain.checkpoint.save`` (each rank hashes the files it wrote, rank 0
merges the manifest into COMPLETE), verified with ``checkpoint.verify`` (each rank checks its files)
and loaded with ``checkpoint.load``, ``--repeats`` times each, with hashes on (the default,
``train.checkpoint_hashes: true``) and off (sizes only). The ratio to read: verify time / load time,
and save time with hashes / without. The files are read back from the page cache (just written); a
cold read from a network file system costs more, for the load as well.

Run (about 2 minutes on 2 cores; writes ~1.6 GB under --dir, removed afterwards):

    python benchmarks/bench_checkpoint.py
    python benchmarks/bench_checkpoint.py --layers 4 --repeats 1 --json out.json   # smaller, quicker
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(args: dict):
    """The trainer's engine for a Llama of ``args`` (fp32, ZeRO-2, torch AdamW), after one step."""
    import numpy as np

    from longtrain.attention import register_attention
    from longtrain.batching import make_packed_batch
    from longtrain.config import config_from_dict
    from longtrain.ds_config import build_deepspeed_config
    from longtrain.engine import CausalLMLoss, build_engine
    from longtrain.model import load_model

    model_config = {"model_type": "llama", "vocab_size": 32000, "hidden_size": args["hidden"],
                    "intermediate_size": args["intermediate"], "num_hidden_layers": args["layers"],
                    "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                    "tie_word_embeddings": True}
    stage = {"seq_len": 64, "rope": {"type": "default", "theta": 10000}, "data": "unused", "steps": 1, "lr": 1e-4}
    cfg = config_from_dict({"model": {"config": model_config}, "stages": [stage],
                            "train": {"zero_stage": 2, "precision": "fp32", "optimizer": {"impl": "torch"}}})
    model = load_model(cfg.model)
    model.set_attn_implementation(register_attention())
    engine = build_engine(CausalLMLoss(model, 64), build_deepspeed_config(cfg, dist.get_world_size(), False), 0.1)
    rng = np.random.default_rng(dist.get_rank())
    batch = make_packed_batch([{"input_ids": rng.integers(4, 32000, 64), "doc_lens": [64],
                                "loss_mask": np.ones(64, dtype=np.uint8)}])
    loss = engine(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)
    engine.backward(loss / batch.num_targets)
    engine.step()
    return cfg, model, engine


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def run_rank(args: dict, out_dir: str) -> dict:
    from longtrain import checkpoint

    cfg, model, engine = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    root = Path(out_dir) / "checkpoints"
    result: dict = {"parameters": n_params, "world_size": dist.get_world_size()}
    for hashes in (True, False):
        times: dict[str, list[float]] = {"save": [], "verify": [], "load": []}
        for repeat in range(args["repeats"]):
            step = 1 + repeat + (0 if hashes else 100)
            state = {"global_step": step, "stage_index": 0, "step_in_stage": 1, "tokens_seen": 64, "stages": [],
                     "stage_name": "s", "source_model": "bench", "tokenizer": None, "config": cfg.to_dict()}
            tag_dir = root / checkpoint.tag_for(step)
            times["save"].append(timed(lambda: checkpoint.save(engine, root, state, model.config, keep_last=1,
                                                               hashes=hashes)))
            times["verify"].append(timed(lambda: checkpoint.verify(tag_dir, hashes=hashes)))
            times["load"].append(timed(lambda: checkpoint.load(engine, tag_dir)))
        size = checkpoint.read_complete(tag_dir)["manifest"]
        result["checkpoint_bytes"] = sum(e["size"] for e in size["files"].values())
        result["hashes" if hashes else "sizes_only"] = {k: statistics.median(v) for k, v in times.items()}
    return result


def _entry(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args["threads"])
    from longtrain.distributed import init_distributed, teardown

    init_distributed()
    result = run_rank(args, out_dir)
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result))
    teardown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--repeats", type=int, default=2, help="saves / verifies / loads per mode (median)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    from longtrain.distributed import free_port

    out_dir = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    try:
        mp.start_processes(_entry, args=(args.ranks, free_port(), vars(args), out_dir), nprocs=args.ranks,
                           join=True, start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn")
        result = json.loads(Path(out_dir, "result.json").read_text())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    gib = result["checkpoint_bytes"] / 2**30
    print(f"{result['parameters'] / 1e6:.1f}M parameters, {result['world_size']} ranks (gloo, CPU), ZeRO-2 fp32: "
          f"checkpoint {gib:.2f} GiB; median of {args.repeats}")
    print("| mode | save s | verify s | load s | verify / load |")
    print("|---|---|---|---|---|")
    for mode in ("hashes", "sizes_only"):
        t = result[mode]
        print(f"| {mode.replace('_', ' ')} | {t['save']:.2f} | {t['verify']:.3f} | {t['load']:.2f} | "
              f"{t['verify'] / t['load']:.2f} |")
    extra = result["hashes"]["save"] - result["sizes_only"]["save"]
    print(f"hashing at save: +{extra:.2f} s ({100 * extra / result['sizes_only']['save']:.0f}% of a save without); "
          f"verify with hashes: {gib / result['hashes']['verify']:.2f} GiB/s over {result['world_size']} ranks")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
