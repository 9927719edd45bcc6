"""Sequence parallelism on CPU: per-rank activation memory, tokens/s and bytes sent per layer.

One packed row of real text (OpenLLaMA tokenizer, several documents crossing slice boundaries)
goes through a ~20M-parameter Llama (vocab 32000) with the trainer's activation checkpointing
(selective: attention outputs kept) and ``chunked_lm_loss_sum``, as a real run does: forward + backward at SP=1 (one process), then at
SP=2 with Ulysses and with ring attention (two gloo processes on 127.0.0.1). Reported per rank:

- peak activation memory: peak RSS during the step minus RSS before it (``VmHWM`` reset through
  ``/proc/self/clear_refs``; parameters and their gradients are allocated by a warm-up step first,
  so only what the step itself allocates is counted);
- tokens/s of the whole row (SP=1 uses all ``--threads`` cores; each SP=2 rank uses ``threads / 2``);
- bytes this rank sends per layer, counted inside our collectives (``longtrain.parallel.count_comm``)
  for one forward and for one forward+backward, against the formulas of docs/sequence_parallel.md.

Run (about 3 minutes on 2 cores; needs ../shared/data):

    OMP_NUM_THREADS=1 python benchmarks/bench_sp.py                 # 16384 tokens
    python benchmarks/bench_sp.py --tokens 8192 --layers 2 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("LONGTRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ------------------------------------------------------------------------------------------ data
def packed_row(tokens: int, docs: int):
    """One PackedBatch of ``tokens`` real tokens in ``docs`` uneven documents (chapters of a novel)."""
    import sentencepiece as spm

    from longtrain.batching import make_packed_batch

    sp = spm.SentencePieceProcessor(model_file=str(SHARED / "tokenizers" / "open_llama_tokenizer.model"))
    text = (SHARED / "corpora" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    ids = sp.encode(text)
    weights = [1.0 + (i % 3) for i in range(docs)]  # uneven: 1, 2, 3, 1, ... parts
    lens = [int(tokens * w / sum(weights)) for w in weights]
    lens[-1] += tokens - sum(lens)
    row = {"input_ids": ids[:tokens], "doc_lens": lens, "loss_mask": [1] * tokens}
    return make_packed_batch([row])


def build_model(layers: int, hidden: int, heads: int, kv_heads: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=65536,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().train()
    from longtrain.activation_checkpointing import enable_activation_checkpointing

    enable_activation_checkpointing(model)  # the trainer's own (ZeRO < 3): selective, keeps attention outputs
    return model


# ---------------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1))


def exact_rss_accounting() -> None:
    """Make RSS follow live memory: glibc otherwise keeps freed blocks (the warm-up step's
    activations) resident and reuses them, so a later step's peak would not show up in RSS.
    ``M_MMAP_THRESHOLD`` 64 KiB: every larger block is its own mmap, returned to the OS on free."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also disables the dynamic threshold)
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ step
def run_rank(rank: int, world: int, mode: str, args: dict) -> dict:
    from longtrain.loss import chunked_lm_loss_sum
    from longtrain.parallel import (count_comm, init_parallel_states, parallelize_attention, shard_batch)

    states = init_parallel_states([world])
    state = states[world]
    model = build_model(args["layers"], args["hidden"], args["heads"], args["kv_heads"])
    batch = packed_row(args["tokens"], args["docs"])
    local = shard_batch(batch, state, mode)
    parallelize_attention(model, state, mode)

    def forward():
        hidden = model.model(input_ids=local.input_ids, position_ids=local.position_ids, use_cache=False,
                             cu_seq_lens_q=local.cu_seqlens, cu_seq_lens_k=local.cu_seqlens,
                             max_length_q=local.max_seqlen, max_length_k=local.max_seqlen).last_hidden_state
        return chunked_lm_loss_sum(hidden, model.lm_head, local.labels, args["chunk"])

    forward().backward()  # warm-up: allocates parameter gradients (kept: zero_grad(set_to_none=False))
    with torch.no_grad(), count_comm() as fwd_comm:
        forward()
    times, peaks = [], []
    for _ in range(args["repeats"]):
        model.zero_grad(set_to_none=False)
        if world > 1:
            dist.barrier()
        base_kb = _status_kb("VmRSS")
        exact = reset_peak_rss()
        start = time.perf_counter()
        with count_comm() as step_comm:
            forward().backward()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
        peaks.append((_status_kb("VmHWM") - base_kb) * 1024 if exact else float("nan"))
    return {"rank": rank, "local_tokens": local.input_ids.shape[1], "step_s": min(times),
            "peak_activation_bytes": min(peaks), "fwd_bytes": fwd_comm.total_bytes,
            "step_bytes": step_comm.total_bytes, "calls": dict(step_comm.calls)}


def _entry(rank: int, world: int, port: int, mode: str, args: dict, out: str) -> None:
    exact_rss_accounting()
    torch.set_num_threads(max(1, args["threads"] // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        Path(out, f"{mode}{world}_rank{rank}.json").write_text(json.dumps(run_rank(rank, world, mode, args)))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_config(world: int, mode: str, args: dict, out: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks inherit torch/transformers imports; spawn where fork is missing
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_entry, args=(world, port, mode, args, out), nprocs=world, join=True, start_method=method)
    return [json.loads(Path(out, f"{mode}{world}_rank{r}.json").read_text()) for r in range(world)]


# -------------------------------------------------------------------------------------- formulas
def predicted_bytes(mode: str, sp: int, tokens: int, heads: int, kv_heads: int, head_dim: int,
                    elem: int = 4, grad_elem: int = 4) -> tuple[int, int]:
    """Bytes one rank sends per layer: (forward, backward). docs/sequence_parallel.md derives them."""
    local = tokens // sp
    if mode == "ulysses":
        from longtrain.parallel import kv_repeat

        kv = kv_heads * kv_repeat(heads, kv_heads, sp)
        # all-to-all keeps 1/P of its input: q,k,v in (H + 2 Hkv') and the output back (H)
        fwd = (sp - 1) * local * head_dim * (2 * heads + 2 * kv) * elem // sp
        return fwd, fwd  # the backward exchanges the gradients of the same tensors
    kv_block = 2 * kv_heads * local * head_dim  # K and V of this rank's slice
    fwd = (sp - 1) * kv_block * elem  # P-1 hops of K/V
    bwd = (sp - 1) * kv_block * elem + sp * kv_block * grad_elem  # K/V again, dK/dV (fp32) P hops home
    return fwd, bwd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--docs", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256, help="chunked loss chunk size (tokens)")
    p.add_argument("--threads", type=int, default=2, help="cores used in total")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path, help="write all numbers here")
    a = p.parse_args(argv)
    args = vars(a).copy()
    args.pop("json")
    head_dim = a.hidden // a.heads
    import tempfile

    import longtrain.attention  # noqa: F401  (imported before forking the ranks)
    from longtrain.parallel import padded_length

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for world, mode in ((1, "ulysses"), (2, "ulysses"), (2, "ring")):
            results[f"sp{world}" if world == 1 else f"sp{world}-{mode}"] = run_config(world, mode, args, out)

    base = results["sp1"][0]
    print(f"{a.tokens} tokens, {a.docs} documents, Llama {a.layers} layers hidden {a.hidden} heads "
          f"{a.heads}/{a.kv_heads} vocab 32000, activation checkpointing + chunked loss, fp32, {a.threads} cores")
    print(f"{'config':<14}{'rank':>5}{'tokens/s':>10}{'peak act MiB':>14}{'vs SP=1':>9}"
          f"{'fwd B/layer':>13}{'(formula)':>11}{'step B/layer':>14}{'(formula)':>11}")
    for name, ranks in results.items():
        sp = len(ranks)
        mode = "ring" if name.endswith("ring") else "ulysses"
        padded = padded_length(a.tokens, sp, mode)
        f_fwd, f_bwd = predicted_bytes(mode, sp, padded, a.heads, a.kv_heads, head_dim) if sp > 1 else (0, 0)
        for r in ranks:
            fwd, step = r["fwd_bytes"] / a.layers, r["step_bytes"] / a.layers
            ratio = r["peak_activation_bytes"] / base["peak_activation_bytes"]
            r.update(tokens_per_s=a.tokens / r["step_s"], ratio=ratio,
                     fwd_bytes_per_layer=fwd, step_bytes_per_layer=step,
                     formula_fwd_per_layer=f_fwd, formula_step_per_layer=2 * f_fwd + f_bwd)  # ckpt: fwd twice
            print(f"{name:<14}{r['rank']:>5}{r['tokens_per_s']:>10.0f}{r['peak_activation_bytes'] / 2**20:>14.0f}"
                  f"{r['ratio']:>9.2f}{fwd:>13.0f}{f_fwd:>11.0f}{step:>14.0f}{2 * f_fwd + f_bwd:>11.0f}")
    if a.json:
        a.json.write_text(json.dumps({"args": args, "results": results}, indent=1))


if __name__ == "__main__":
    main()
