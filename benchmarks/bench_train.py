"""Training throughput and memory of longtrain against the standard Hugging Face packed-row baseline.

Both sides train the same HF Llama (same initial weights) on the same packed rows of real text
(../shared/data books and WikiText, OpenLLaMA tokenizer, `longtrain prepare --strategy best-fit`),
through DeepSpeed with the same generated config (ZeRO-2, fp32, torch AdamW, one process):

- baseline: transformers' own packed path: ``attn_implementation="sdpa"``, reset ``position_ids``
  (transformers builds the block-diagonal mask from them), full logits, cross-entropy over them;
- longtrain: our document attention (``cu_seqlens``, no mask), activation checkpointing and the
  chunked cross-entropy, exactly as ``longtrain train`` runs it.

It prints tokens/s of each and their ratio (with the first-step losses, which must agree), MFU
against this machine's measured fp32 matmul peak, and the longest ``seq_len`` each fits in a
memory budget (peak RSS of a fresh process per length; a watchdog stops a probe at the budget).

    python benchmarks/bench_train.py                       # seq_len 4096 speed, 3 GiB budget
    python benchmarks/bench_train.py --seq-len 2048 --steps 3 --budget-gb 2 --max-probe 16384

``--tiling`` measures instead what ``train.tiled_mlp: auto`` saves: peak RSS of one training step at 32k
and 64k tokens with and without tiling (a fresh process each; one row of 4096-token documents of random
ids, so no dataset is needed):

    python benchmarks/bench_train.py --tiling              # about 15 minutes on 2 busy cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LONGTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
CORPORA = [SHARED / "corpora" / name for name in
           ("pride_and_prejudice.txt", "frankenstein.txt", "wikitext2_valid.jsonl")]
TOKENIZER = SHARED / "tokenizers" / "open_llama_tokenizer.model"
MODEL = dict(model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=688,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)


def prepared(seq_len: int, out: Path) -> Path:
    """Packed rows at ``seq_len`` (prepared once, cached under ``out``)."""
    from data_prep.cli import prepare_main

    dest = out / f"data_{seq_len}"
    if not (dest / "meta.json").exists():
        args = ["--tokenizer", str(TOKENIZER), "--seq-len", str(seq_len), "--strategy", "best-fit",
                "--out", str(dest), "--no-plot", "--no-progress", "--overwrite"]
        for corpus in CORPORA:
            args += ["--input", str(corpus)]
        if prepare_main(args) != 0:
            raise SystemExit(f"preparing {dest} failed")
    return dest


class BaselineLoss:
    """transformers' standard packed path: sdpa + mask from reset position_ids, full logits."""

    @staticmethod
    def build(hf_model):
        import torch

        class _Module(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.hf_model = model

            def forward(self, input_ids, position_ids, labels, cu_seqlens, max_seqlen):
                logits = self.hf_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
                return torch.nn.functional.cross_entropy(logits[0].float(), labels[0], ignore_index=-100,
                                                         reduction="sum")

        return _Module(hf_model)


def build_variant(variant: str, seq_len: int, data: Path, **train):
    """A DeepSpeed engine for ``variant`` (baseline | longtrain) and a batch source. Both are assembled
    by the trainer's own builder (``longtrain.engine``); only the attention and loss module differ.
    ``train``: extra ``train.*`` keys (e.g. ``tiled_mlp``)."""
    from longtrain.config import config_from_dict
    from longtrain.data import PreparedDataset
    from longtrain.distributed import init_distributed
    from longtrain.ds_config import build_deepspeed_config
    from longtrain.engine import build_engine, loss_module
    from longtrain.model import load_model

    init_distributed()
    cfg = config_from_dict({"model": {"config": dict(MODEL, max_position_embeddings=seq_len), "init_seed": 0},
                            "train": {"zero_stage": 2, "precision": "fp32", "grad_clip": 1.0, **train},
                            "stages": [{"seq_len": seq_len, "rope": {"type": "default", "theta": 10000},
                                        "data": str(data), "lr": 3e-4, "steps": 1}]})
    hf_model = load_model(cfg.model)
    module = loss_module(hf_model, cfg.train) if variant == "longtrain" else BaselineLoss.build(hf_model)
    engine = build_engine(module, build_deepspeed_config(cfg, 1, False), 0.1)
    return engine, (PreparedDataset(data) if (data / "meta.json").exists() else None)


def train_steps(engine, dataset, steps: int, first_row: int = 0) -> tuple[list[float], list[float], int, int]:
    """Run ``steps`` optimizer steps of one row each; returns (losses, seconds, tokens, sum of len^2)."""
    from longtrain.batching import make_packed_batch

    losses, seconds, sum_sq, tokens = [], [], 0, 0
    for step in range(steps):
        batch = make_packed_batch(dataset.rows([first_row + step]))
        start = time.perf_counter()
        loss = engine(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)
        engine.backward(loss / max(batch.num_targets, 1))
        engine.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item() / max(batch.num_targets, 1))
        lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        sum_sq += int((lens * lens).sum())
        tokens += batch.input_ids.shape[1]
    return losses, seconds, tokens, sum_sq


def speed(args) -> dict:
    import torch

    from longtrain.metrics import measure_matmul_peak, training_flops
    from longtrain.model import count_parameters

    data = prepared(args.seq_len, args.out)
    results = {}
    peak = measure_matmul_peak(torch.device("cpu"))
    for variant in ("baseline", "longtrain"):
        engine, dataset = build_variant(variant, args.seq_len, data)
        train_steps(engine, dataset, 1, first_row=len(dataset) - 1)  # warm-up (allocator, first calls)
        losses, seconds, tokens, sum_sq = train_steps(engine, dataset, args.steps)
        hf = engine.module.hf_model
        flops = training_flops(count_parameters(hf), hf.config.num_hidden_layers, hf.config.hidden_size,
                               tokens, sum_sq)
        results[variant] = {"losses": losses, "tokens_per_s": tokens / sum(seconds),
                            "mfu": flops / sum(seconds) / peak}
        print(f"{variant:>9}: {results[variant]['tokens_per_s']:8.0f} tok/s, MFU {100 * results[variant]['mfu']:.1f}% "
              f"(fp32 matmul peak {peak / 1e9:.1f} GFLOP/s), losses {[round(x, 5) for x in losses]}", flush=True)
    base, ours = results["baseline"], results["longtrain"]
    diff = max(abs(a - b) / abs(a) for a, b in zip(base["losses"], ours["losses"]))
    results["ratio_tokens_per_s"] = ours["tokens_per_s"] / base["tokens_per_s"]
    results["max_rel_loss_diff"] = diff
    return results


def probe_child(variant: str, seq_len: int, data: str, budget: int) -> None:
    """One fresh process: 2 training steps at ``seq_len``; exit 3 as soon as RSS passes the budget."""
    def watchdog():
        while True:
            rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            if rss > budget:
                os._exit(3)
            time.sleep(0.005)

    threading.Thread(target=watchdog, daemon=True).start()
    engine, dataset = build_variant(variant, seq_len, Path(data))
    train_steps(engine, dataset, 2)
    print(json.dumps({"peak_rss": peak_rss()}), flush=True)
    os._exit(0)


def probe(variant: str, seq_len: int, args) -> int | None:
    """Peak RSS in bytes, or None when the run passed the budget (or failed)."""
    data = prepared(seq_len, args.out)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29700 + seq_len % 97))
    proc = subprocess.run([sys.executable, __file__, "--probe-child", variant, str(seq_len), str(data),
                           str(int(args.budget_gb * 2**30))], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["peak_rss"]
    if proc.returncode not in (3,):
        print(proc.stderr[-2000:], file=sys.stderr)
    return None


def peak_rss() -> int:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the benchmark parent's peak.
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))


def tiling_child(seq_len: int, tiled: bool, out: str) -> None:
    """One fresh process: one training step on one row of ``seq_len`` tokens (documents of 4096 random
    ids), ``tiled_mlp`` auto or off; prints the peak RSS and the step's loss."""
    import numpy as np

    from longtrain.batching import make_packed_batch

    engine, _ = build_variant("longtrain", seq_len, Path(out), tiled_mlp="auto" if tiled else 1)
    ids = np.random.default_rng(0).integers(3, MODEL["vocab_size"], seq_len)
    docs = [4096] * (seq_len // 4096) + ([seq_len % 4096] if seq_len % 4096 else [])
    batch = make_packed_batch([{"input_ids": ids, "doc_lens": docs, "loss_mask": np.ones(seq_len, np.uint8)}])
    start = time.perf_counter()
    loss = engine(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)
    engine.backward(loss / batch.num_targets)
    engine.step()
    print(json.dumps({"peak_rss": peak_rss(), "loss": loss.item() / batch.num_targets,
                      "seconds": time.perf_counter() - start}), flush=True)
    os._exit(0)


def tiling(args) -> dict:
    """Peak RSS at 32k and 64k tokens with and without ``train.tiled_mlp: auto`` (fresh process each)."""
    out = {}
    for seq_len in (32768, 65536):
        for tiled in (False, True):
            env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(29600 + seq_len % 89 + tiled))
            proc = subprocess.run([sys.executable, __file__, "--tiling-child", str(seq_len), str(int(tiled)),
                                   str(args.out)], env=env, capture_output=True, text=True)
            result = next((json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")), None)
            if result is None:
                print(proc.stderr[-2000:], file=sys.stderr)
            key = f"{seq_len}_{'tiled' if tiled else 'untiled'}"
            out[key] = result
            if result:
                print(f"seq_len {seq_len:>6} tiled_mlp {'auto' if tiled else 'off ':<4}: peak RSS "
                      f"{result['peak_rss'] / 2**30:.2f} GiB, loss {result['loss']:.5f}, {result['seconds']:.0f} s",
                      flush=True)
    return out


def memory(args) -> dict:
    out = {}
    lengths = [L for L in (1024, 2048, 4096, 8192, 16384, 32768, 65536) if L <= args.max_probe]
    for variant in ("baseline", "longtrain"):
        fits, peaks = 0, {}
        for seq_len in lengths:
            peak = probe(variant, seq_len, args)
            peaks[seq_len] = peak
            shown = f"{peak / 2**30:.2f} GiB" if peak else f"> {args.budget_gb} GiB (stopped)"
            print(f"{variant:>9} seq_len {seq_len:>6}: peak RSS {shown}", flush=True)
            if peak is None:
                break
            fits = seq_len
        out[variant] = {"longest_seq_len": fits, "peak_rss": peaks}
    base = out["baseline"]["longest_seq_len"]
    out["ratio_longest_seq_len"] = out["longtrain"]["longest_seq_len"] / base if base else None
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe-child":
        probe_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    if len(sys.argv) > 1 and sys.argv[1] == "--tiling-child":
        tiling_child(int(sys.argv[2]), bool(int(sys.argv[3])), sys.argv[4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096, help="row length of the speed comparison")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (after one warm-up)")
    parser.add_argument("--budget-gb", type=float, default=3.0, help="memory budget of the longest-seq_len probe")
    parser.add_argument("--max-probe", type=int, default=32768, help="longest seq_len probed")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--tiling", action="store_true", help="only: peak RSS at 32k / 64k with and without tiled MLP")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "train")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if args.tiling:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tiling.json").write_text(json.dumps(tiling(args), indent=2))
        return
    if not TOKENIZER.exists():
        raise SystemExit(f"needs ../shared/data (not found: {TOKENIZER}); set LONGTRAIN_SHARED_DATA")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RANK", "0"), os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0"), os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29699")
    print(f"model: {MODEL}; rows: {args.seq_len} tokens of packed books + WikiText; DeepSpeed ZeRO-2 fp32, "
          f"1 process, {os.environ.get('OMP_NUM_THREADS', 'default')} threads", flush=True)
    results = {"speed": speed(args)}
    s = results["speed"]
    print(f"tokens/s longtrain / baseline = {s['ratio_tokens_per_s']:.2f}x (goal >= 1.5x); "
          f"max relative loss difference {s['max_rel_loss_diff']:.2e}", flush=True)
    if not args.skip_memory:
        results["memory"] = memory(args)
        m = results["memory"]
        print(f"longest seq_len in {args.budget_gb} GiB: baseline {m['baseline']['longest_seq_len']}, longtrain "
              f"{m['longtrain']['longest_seq_len']} (ratio {m['ratio_longest_seq_len']}, goal >= 8x; probed up to "
              f"{args.max_probe})", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
