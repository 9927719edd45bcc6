"""longtrain's GPU path measured in one command: kernels, training speed, the longest row, export.

    python benchmarks/gpu_check.py --out DIR             # one GPU: under 8 minutes, its own time caps
    python benchmarks/gpu_check.py --cpu-dry-run --out DIR   # the same code at toy sizes on CPU (CI)

It writes ``DIR/gpu_check.json`` (after every section, so a run cut short keeps what it measured) and
prints a table. Sections (docs/gpu.md says what each measures and the goals they are held to):

- ``kernels``: every attention backend that runs here (flash_attn, torch_varlen, sdpa_loop) against
  the per-document fp32 reference, forward and gradients, bf16 tolerances, with GQA and a sliding
  window; the ring's block kernels and the ring on one device against the exact math;
- ``train``: a Llama-3.2-1B-shaped model built from a config (no download), bf16, ZeRO-2 and ZeRO-3,
  one process, packed multi-document rows at 8k and 32k: tokens/s, MFU against the device's dense bf16
  peak (``longtrain.metrics.GPU_PEAK_FLOPS``), peak allocated and reserved memory, and ``longtrain plan``'s
  prediction of the allocated peak (docs/plan.md);
- ``longest_seq_len``: a doubling probe from 32k tokens with tiled MLP, activation checkpointing and
  host offload on, each probe under a time cap;
- ``export``: ``longtrain train`` through two stages (4k at RoPE base 10k, then 8k at 1M) and
  ``longtrain export --dtype bf16 --verify``, as a user runs them.

On a GPU machine of this project (one H200, no internet; its image's ``python3`` holds a CUDA torch),
from the repository root, with ``.whl/`` carried (made here first by ``bash benchmarks/gpu_wheels.sh``,
on a machine with PyPI; where the GPU machine does reach PyPI, the script installs from it instead):

    bash benchmarks/gpu_check.sh "$OUT"

which installs torch 2.13.0 from PyPI only if the machine's torch has no CUDA, installs longtrain's
other needs without touching torch, and runs ``timeout 560 python3 benchmarks/gpu_check.py --out
"$OUT"``. flash-attn is not installable there (a source build of 25-60 minutes): the check runs
without it and reports it as unavailable.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from longtrain import attention_backends as ab  # noqa: E402
from longtrain.attention import document_attention  # noqa: E402
from longtrain.batching import make_packed_batch  # noqa: E402
from longtrain.metrics import peak_flops, training_flops  # noqa: E402
from longtrain.parallel import ParallelState, ring_attention  # noqa: E402
from longtrain.parallel.kernels import block_backward, block_forward, math_backward, math_forward  # noqa: E402
from tests.support.env import child_env  # noqa: E402
from tests.support.text import stdlib_corpus  # noqa: E402

LLAMA_1B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, max_position_embeddings=131072)
TOY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=160, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096)
TOL = {"out": 2e-2, "grad": 5e-2}  # rtol = atol for bf16 against fp32 (the gpu tests use the same)


@dataclasses.dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run (the code is the same)."""

    model: dict
    train_lengths: tuple[int, ...]
    warmup: int
    timed: int
    loss_chunk_tokens: int
    probe_start: int
    probe_max: int
    probe_doc_max: int
    kernel_docs: tuple[int, ...]
    kernel_heads: tuple[int, int, int]  # query heads, kv heads, head dim
    kernel_window: int
    export_model: dict
    export_lengths: tuple[int, int]
    export_steps: int
    export_vocab: int
    export_chars: int
    budgets: dict  # seconds per section
    total_s: float


GPU = Sizes(model=LLAMA_1B, train_lengths=(8192, 32768), warmup=2, timed=3, loss_chunk_tokens=1024,
            probe_start=32768, probe_max=1 << 22, probe_doc_max=32768,
            kernel_docs=(1, 777, 3000, 2414, 2000), kernel_heads=(32, 8, 64), kernel_window=1024,
            export_model=dict(TOY, hidden_size=256, num_hidden_layers=4, intermediate_size=688,
                              max_position_embeddings=4096),
            export_lengths=(4096, 8192), export_steps=4, export_vocab=2048, export_chars=2_000_000,
            budgets={"kernels": 30, "train": 140, "longest_seq_len": 160, "export": 100}, total_s=440)
DRY = Sizes(model=TOY, train_lengths=(256, 512), warmup=1, timed=1, loss_chunk_tokens=128,
            probe_start=512, probe_max=2048, probe_doc_max=512,
            kernel_docs=(1, 37, 100, 118), kernel_heads=(4, 2, 16), kernel_window=32,
            export_model=TOY, export_lengths=(128, 256), export_steps=2, export_vocab=400, export_chars=300_000,
            budgets={"kernels": 60, "train": 120, "longest_seq_len": 60, "export": 300}, total_s=600)


class Clock:
    """The run's deadline: a section gets its budget or what is left, whichever is less."""

    def __init__(self, total_s: float):
        self.start, self.total = time.perf_counter(), total_s

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def budget(self, seconds: float) -> float:
        return max(0.0, min(seconds, self.left()))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**30, 3)


def memory(device: torch.device) -> dict:
    """Peak allocated and reserved since the last reset (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return {"peak_allocated_gb": gib(torch.cuda.max_memory_allocated(device)),
                "peak_reserved_gb": gib(torch.cuda.max_memory_reserved(device))}
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"peak_allocated_gb": gib(hwm), "peak_reserved_gb": None, "note": "CPU: process peak RSS"}


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------ kernels

def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> tuple[float, bool]:
    err = (a.float() - b.float()).abs().max().item()
    ok = bool(torch.isclose(a.float(), b.float(), rtol=tol, atol=tol).all())
    return err, ok


def _qkv(heads: int, kv_heads: int, total: int, dim: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, total, dim, generator=g).to(device, torch.bfloat16).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def _compare(fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor], device) -> dict:
    """fn(bf16 inputs) vs ref_fn(fp32 copies): output and input gradients, errors and ok flags."""
    leaves = [x.detach().float().requires_grad_() for x in inputs]
    for _ in range(2):  # the second call is timed (the first pays for kernel selection and allocation)
        sync(device)
        start = time.perf_counter()
        out = fn(*inputs)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
        sync(device)
        seconds = time.perf_counter() - start
    ref = ref_fn(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    out_err, out_ok = _close(out, ref, TOL["out"])
    grad_errs = [_close(a, b, TOL["grad"]) for a, b in zip(grads, ref_grads)]
    return {"out_err": out_err, "grad_err": max(e for e, _ in grad_errs), "fwd_bwd_ms": round(1000 * seconds, 2),
            "ok": out_ok and all(ok for _, ok in grad_errs)}


def kernel_section(sizes: Sizes, device: torch.device) -> dict:
    heads, kv_heads, dim = sizes.kernel_heads
    docs = list(sizes.kernel_docs)
    total, longest = sum(docs), max(docs)
    cu = torch.tensor(np.cumsum([0] + docs), dtype=torch.int32, device=device)
    scale = dim ** -0.5
    out: dict[str, Any] = {"backends": {}, "cases": []}
    for name in ("flash_attn", "torch_varlen", "sdpa_loop"):
        why = ab.unavailable_reason(name, device, torch.bfloat16, dim)
        out["backends"][name] = "available" if why is None else f"unavailable: it {why}"
        if why is not None:
            continue
        backend = ab.AttentionBackend(name, "gpu_check")
        for case, kv, window in (("mha", heads, None), ("gqa", kv_heads, None), ("gqa+window", kv_heads,
                                                                                  sizes.kernel_window)):
            def fn(q, k, v, window=window, backend=backend):
                return document_attention(q, k, v, cu, longest, scale, sliding_window=window, backend=backend)

            def ref(q, k, v, window=window):  # the per-document fp32 path
                return document_attention(q, k, v, cu, longest, scale, sliding_window=window,
                                          backend=ab.AttentionBackend("sdpa_loop", "reference"))

            result = _compare(fn, ref, _qkv(heads, kv, total, dim, device), device)
            out["cases"].append({"kernel": f"document_attention[{name}]", "case": case, **result})
    out["cases"] += ring_cases(sizes, device, cu, scale)
    return out


class _Block(torch.autograd.Function):
    """The ring's kernel pair on one block (``kernel`` "math": the exact fp32 reference): forward with the
    lse, backward from the saved out and lse, as ``longtrain.parallel.ring`` calls them."""

    @staticmethod
    def forward(ctx, q, k, v, kernel: str, causal: bool, scale: float):
        if kernel == "math":
            out, lse = math_forward(q, k, v, causal, scale)
        else:
            out, lse = block_forward(q, k, v, causal, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (kernel, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        kernel, causal, scale = ctx.meta
        if kernel == "math":
            grads = math_backward(dout, q, k, v, out, lse, causal, scale)
        else:
            grads = block_backward(dout.contiguous(), q, k, v, out, lse, causal, scale, kernel)
        return (*grads, None, None, None)


def ring_cases(sizes: Sizes, device: torch.device, cu: torch.Tensor, scale: float) -> list[dict]:
    """The ring's block kernels (causal and full blocks, GQA) vs math, and the ring on one device."""
    heads, kv_heads, dim = sizes.kernel_heads
    if device.type == "cpu":
        kernels = ["cpu"]
    else:
        kernels = ((["flash_attn"] if ab.flash_attn_status() is None else [])
                   + (["torch_varlen"] if ab.torch_varlen_status() is None else []) + ["sdpa"])
    length = sum(sizes.kernel_docs) // 4
    cases = []
    for kernel in kernels:
        for causal, lk in ((True, length), (False, 2 * length)):
            g = torch.Generator().manual_seed(2)
            q = torch.randn(heads, length, dim, generator=g).to(device, torch.bfloat16).requires_grad_()
            k, v = (torch.randn(kv_heads, lk, dim, generator=g).to(device, torch.bfloat16).requires_grad_()
                    for _ in range(2))
            result = _compare(lambda q, k, v, kernel=kernel, causal=causal: _Block.apply(q, k, v, kernel, causal, scale),
                              lambda q, k, v, causal=causal: _Block.apply(q, k, v, "math", causal, scale),
                              [q, k, v], device)
            cases.append({"kernel": f"ring block[{kernel}]", "case": "causal" if causal else "full", **result})
    state = ParallelState(1, 0, 1)  # the whole ring (plan, merge, backward) on one device: sp_size 1
    backend = "torch_varlen" if "torch_varlen" in kernels else None
    total, longest = sum(sizes.kernel_docs), max(sizes.kernel_docs)
    result = _compare(lambda q, k, v: ring_attention(q, k, v, cu, state, scale, backend=backend),
                      lambda q, k, v: document_attention(q, k, v, cu, longest, scale),
                      _qkv(heads, kv_heads, total, dim, device, seed=3), device)
    cases.append({"kernel": f"ring_attention sp=1[{backend or 'auto'}]", "case": "gqa", **result})
    return cases


# ------------------------------------------------------------------------------ train

def run_config(sizes: Sizes, seq_len: int, **train: Any):
    from longtrain.config import config_from_dict

    base = {"precision": "bf16", "zero_stage": 2, "loss_chunk_tokens": sizes.loss_chunk_tokens, "tensorboard": False}
    return config_from_dict({"model": {"config": dict(sizes.model), "init_seed": 0}, "train": {**base, **train},
                             "stages": [{"seq_len": seq_len, "rope": {"type": "default", "theta": 500000},
                                         "data": "unused", "lr": 1e-5, "steps": 1}]})


def build(cfg, device: torch.device):
    """The trainer's own builders: model, loss module (kernel choice, tiling, checkpointing), engine."""
    from longtrain.ds_config import build_deepspeed_config
    from longtrain.engine import build_engine, loss_module
    from longtrain.model import load_model

    hf_model = load_model(cfg.model)
    module = loss_module(hf_model, cfg.train, device)
    engine = build_engine(module, build_deepspeed_config(cfg, 1, device.type == "cuda"),
                          cfg.train.optimizer.weight_decay)
    return engine


def release(engine) -> None:
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()  # ZeRO-3's hooks and buffers


def packed_row(seq_len: int, vocab: int, doc_max: int, seed: int) -> dict:
    """A row of documents with log-uniform lengths in [min(256, seq_len), doc_max], random token ids."""
    rng = np.random.default_rng(seed)
    lens, left = [], seq_len
    low = min(256, doc_max)
    while left:
        n = int(np.exp(rng.uniform(np.log(low), np.log(doc_max))))
        lens.append(min(left, max(1, n)))
        left -= lens[-1]
    return {"input_ids": rng.integers(3, vocab, seq_len), "doc_lens": lens, "loss_mask": np.ones(seq_len, np.uint8)}


def train_steps(engine, device, seq_len: int, vocab: int, doc_max: int, steps: int, seed: int = 0) -> dict:
    """``steps`` optimizer steps of one packed row each: per-step seconds and sums of squared document
    lengths (attention FLOPs), the last loss."""
    seconds, sum_sq, loss_value = [], [], None
    for i in range(steps):
        batch = make_packed_batch([packed_row(seq_len, vocab, doc_max, seed + i)])
        args = (batch.input_ids.to(device), batch.position_ids.to(device), batch.labels.to(device),
                batch.cu_seqlens.to(device), batch.max_seqlen)
        sync(device)
        start = time.perf_counter()
        loss = engine(*args)
        engine.backward(loss / max(batch.num_targets, 1))
        engine.step()
        sync(device)
        seconds.append(time.perf_counter() - start)
        loss_value = loss.item() / max(batch.num_targets, 1)
        lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        sum_sq.append(int((lens * lens).sum()))
    return {"seconds": seconds, "loss": loss_value, "sum_sq": sum_sq}


def planned_peak(cfg, device: torch.device) -> dict:
    """What ``longtrain plan`` predicts for this run's peak (the trainer's start-up plan: one rank, this
    device), in GiB, next to what the section measures (``peak_allocated_gb``) and its error; on CPU the
    fixed overhead is the process's resident size now (docs/plan.md "Fixed overhead")."""
    from longtrain.plan import build_target, plan_run

    target = build_target(cfg, world_size=1, device=device.type, peak_tflops=1.0)  # peak: time is not compared
    stage = plan_run(cfg, target, suggest=False).stages[0]
    return {"predicted_gb": gib(stage.peak_bytes), "predicted_terms": {k: gib(v) for k, v in
                                                                        stage.memory.breakdown.items() if v}}


def train_section(sizes: Sizes, device: torch.device, budget: float) -> dict:
    from longtrain.model import attention_width, count_parameters

    deadline = time.perf_counter() + budget
    peak = peak_flops(device, None)
    runs: list[dict] = []
    out: dict[str, Any] = {"peak_flops": peak, "runs": runs}
    configs = [dict(zero_stage=2), dict(zero_stage=3), dict(zero_stage=2, activation_checkpointing=False)]
    for train in configs:
        lengths = sizes.train_lengths if train.get("activation_checkpointing", True) else sizes.train_lengths[-1:]
        if time.perf_counter() > deadline:
            runs.append({**train, "skipped": "time cap"})
            continue
        engine = None
        try:
            reset_memory(device)
            cfg = run_config(sizes, max(lengths), **train)
            engine = build(cfg, device)
            hf = engine.module.hf_model
            n_params, layers, width = count_parameters(hf), hf.config.num_hidden_layers, attention_width(hf.config)
            out["parameters"] = n_params
            for seq_len in lengths:
                if time.perf_counter() > deadline:
                    runs.append({**train, "seq_len": seq_len, "skipped": "time cap"})
                    continue
                reset_memory(device)
                train_steps(engine, device, seq_len, hf.config.vocab_size, seq_len, sizes.warmup, seed=100)
                timed = train_steps(engine, device, seq_len, hf.config.vocab_size, seq_len, sizes.timed)
                measured = memory(device)
                plan = planned_peak(run_config(sizes, seq_len, **train), device)
                seconds = sum(timed["seconds"])
                flops = sum(training_flops(n_params, layers, width, seq_len, sq) for sq in timed["sum_sq"])
                runs.append({**train, "seq_len": seq_len, "tokens_per_s": round(seq_len * sizes.timed / seconds, 1),
                             "mfu": round(flops / seconds / peak, 4), "step_s": [round(x, 3) for x in timed["seconds"]],
                             "loss": timed["loss"], "kernel": str(engine.module.attention_backend),
                             **measured, **plan,
                             "plan_error": round(plan["predicted_gb"] / measured["peak_allocated_gb"] - 1, 4)})
        except Exception as exc:  # noqa: BLE001 - one configuration's failure (e.g. OOM) must not end the check
            runs.append({**train, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "oom": is_oom(exc)})
        finally:
            release(engine)
            engine = None
            reset_memory(device)
    return out


# ------------------------------------------------------------------------------ longest row

def host_bytes_free() -> int:
    """Host memory available for offloaded activations (MemAvailable; this VM's RAM grows on demand,
    so also at least LONGTRAIN_HOST_GB, default 100 GiB, where the machine is known to have it)."""
    avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    return max(avail, int(float(os.environ.get("LONGTRAIN_HOST_GB", "0")) * 2**30))


def longest_section(sizes: Sizes, device: torch.device, budget: float) -> dict:
    """Doubling probe: one optimizer step per length with tiled MLP, full checkpointing (ZeRO-3) and
    host offload; stops at the first out-of-memory, or when the next probe would pass the time cap or
    the host memory its offloaded layer inputs need."""
    deadline = time.perf_counter() + budget
    probes: list[dict] = []
    out: dict[str, Any] = {"probes": probes, "longest": 0, "stopped_by": None, "doc_len_max": sizes.probe_doc_max,
                           "config": {"zero_stage": 3, "tiled_mlp": "auto", "activation_checkpointing": True,
                                      "offload_activations": True}}
    engine = None
    try:
        engine = build(run_config(sizes, sizes.probe_max, **out["config"]), device)
        cfg = engine.module.hf_model.config
        seq_len, last_s = sizes.probe_start, 0.0
        while seq_len <= sizes.probe_max:
            offload_bytes = cfg.num_hidden_layers * seq_len * cfg.hidden_size * 2  # bf16 layer inputs
            if device.type == "cuda" and offload_bytes > 0.8 * host_bytes_free():
                out["stopped_by"] = f"host memory ({gib(offload_bytes)} GiB of layer inputs to offload)"
                break
            if last_s and time.perf_counter() + 2.5 * last_s > deadline:
                out["stopped_by"] = f"time cap (the next probe would take ~{2.5 * last_s:.0f} s)"
                break
            reset_memory(device)
            try:
                step = train_steps(engine, device, seq_len, cfg.vocab_size, min(seq_len, sizes.probe_doc_max), 1)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                probes.append({"seq_len": seq_len, "ok": False, "error": "out of memory", **memory(device)})
                out["stopped_by"] = "out of memory"
                break
            last_s = step["seconds"][0]
            probes.append({"seq_len": seq_len, "ok": math.isfinite(step["loss"]), "step_s": round(last_s, 2),
                           **memory(device)})
            out["longest"] = seq_len
            seq_len *= 2
        out["stopped_by"] = out["stopped_by"] or f"reached probe_max {sizes.probe_max}"
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        release(engine)
        engine = None
        reset_memory(device)
    return out


# ------------------------------------------------------------------------------ export

def _run(cmd: list[str], log: Path, timeout: float, threads: int) -> dict:
    start = time.perf_counter()
    env = child_env(threads=threads, PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # this process's, not the child's
        env.pop(key, None)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=max(timeout, 1))
        rc, text = proc.returncode, proc.stdout + "\n--- stderr ---\n" + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "log": str(log),
            "tail": "" if rc == 0 else str(text)[-600:]}


def export_section(sizes: Sizes, budget: float, work: Path) -> dict:
    import yaml

    deadline = time.perf_counter() + budget
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    threads = min(8, os.cpu_count() or 1)
    cli = [sys.executable, "-m", "longtrain.cli"]
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, dict] = {}
    out: dict[str, Any] = {"steps": steps, "ok": False}
    sources = [arg for src in stdlib_corpus() for arg in ("--input", src)]
    steps["tokenizer"] = _run(cli + ["tokenizer", "--vocab-size", str(sizes.export_vocab), "--out", str(work / "tok"),
                                     "--max-chars", str(sizes.export_chars), "--skip-bad", "--overwrite", *sources],
                              work / "tokenizer.log", left(), threads)
    data = {}
    for seq_len in sizes.export_lengths:
        data[seq_len] = work / f"data{seq_len}"
        if steps["tokenizer"]["rc"] == 0:
            steps[f"prepare{seq_len}"] = _run(cli + [
                "prepare", "--tokenizer", str(work / "tok" / "tokenizer.model"), "--seq-len", str(seq_len),
                "--strategy", "best-fit", "--out", str(data[seq_len]), "--no-plot", "--no-progress", "--overwrite",
                "--skip-bad", *sources], work / f"prepare{seq_len}.log", left(), threads)
    if any(s["rc"] for s in steps.values()):
        return out
    (short, long), run_dir = sizes.export_lengths, work / "run"
    recipe = {"model": {"config": dict(sizes.export_model, vocab_size=sizes.export_vocab,
                                       max_position_embeddings=short), "tokenizer": str(work / "tok")},
              "train": {"precision": "bf16", "zero_stage": 2, "tensorboard": False, "checkpoint_every": 0},
              "stages": [{"name": f"s{short}_base10k", "seq_len": short, "rope": {"type": "default", "theta": 10000},
                          "data": str(data[short]), "steps": sizes.export_steps, "lr": 1e-3},
                         {"name": f"s{long}_base1M", "seq_len": long, "rope": {"type": "default", "theta": 1000000},
                          "data": str(data[long]), "steps": sizes.export_steps, "lr": 5e-4}]}
    (work / "run.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    steps["train"] = _run(cli + ["train", "--config", str(work / "run.yaml"), "--run-dir", str(run_dir)],
                          work / "train.log", left(), threads)
    if steps["train"]["rc"] == 0:
        steps["export"] = _run(cli + ["export", str(run_dir), str(work / "export"), "--dtype", "bf16", "--verify",
                                      "--no-progress", "--overwrite"], work / "export.log", left(), threads)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    out["stages"] = {r["stage"]: {k: r.get(k) for k in ("step", "loss", "tokens_per_s", "peak_mem_gb",
                                                        "peak_reserved_gb", "rope_theta")} for r in metrics}
    exported = work / "export" / "config.json"
    out["export_config"] = {k: v for k, v in json.loads(exported.read_text()).items()
                            if k in ("rope_theta", "rope_parameters", "torch_dtype", "max_position_embeddings")} \
        if exported.exists() else None
    out["ok"] = all(s["rc"] == 0 for s in steps.values()) and "export" in steps and len(out["stages"]) == 2
    return out


# ------------------------------------------------------------------------------ report

def meta(device: torch.device, dry: bool) -> dict:
    import deepspeed
    import transformers

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_dry_run": dry, "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "device": "cpu",
            "flash_attn": ab.flash_attn_status() or "installed", "torch_varlen": ab.torch_varlen_status() or "available"}
    if device.type == "cuda":
        info.update(device=torch.cuda.get_device_name(device),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    memory_gb=gib(torch.cuda.get_device_properties(device).total_memory))
    return info


def goals(results: dict, dry: bool) -> dict:
    """The issue's goals, checked on what was measured (None: not measured; the dry run sets none)."""
    if dry:
        return {"note": "CPU dry run: toy sizes, no goal applies"}
    runs = [r for r in results.get("train", {}).get("runs", []) if r.get("seq_len") == 32768 and "mfu" in r]
    cases = results.get("kernels", {}).get("cases", [])
    longest = results.get("longest_seq_len", {}).get("longest")
    measured = [r for r in results.get("train", {}).get("runs", []) if "loss" in r]
    return {"mfu_32k_ge_50pct": (max(r["mfu"] for r in runs) >= 0.5) if runs else None,
            "longest_row_ge_512k": (longest >= 524288) if longest is not None else None,
            "kernels_within_bf16_tolerance": all(c["ok"] for c in cases) if cases else None,
            "train_losses_finite": all(math.isfinite(r["loss"]) for r in measured) if measured else None,
            "plan_within_15pct_of_allocated": all(abs(r["plan_error"]) <= 0.15 for r in measured) if measured else None}


def table(results: dict) -> str:
    lines = [f"gpu_check on {results['meta']['device']} (torch {results['meta']['torch']}, "
             f"{results['meta']['date_utc']}){' - CPU DRY RUN, toy sizes' if results['meta']['cpu_dry_run'] else ''}"]
    row = lambda *cols: lines.append("  ".join(f"{c:<{w}}" for c, w in zip(cols, (16, 44, 60))))  # noqa: E731
    k = results.get("kernels", {})
    for name, status in k.get("backends", {}).items():
        row("kernels", f"backend {name}", status)
    for c in k.get("cases", []):
        row("kernels", f"{c['kernel']} {c['case']}", f"{'ok' if c['ok'] else 'OUT OF TOLERANCE'}  out err "
            f"{c['out_err']:.2e}  grad err {c['grad_err']:.2e}  {c['fwd_bwd_ms']} ms")
    for r in results.get("train", {}).get("runs", []):
        what = f"ZeRO-{r['zero_stage']}{'' if r.get('activation_checkpointing', True) else ' no ckpt'} " \
               f"{r.get('seq_len', '')}"
        if "tokens_per_s" in r:
            row("train", what, f"{r['tokens_per_s']:.0f} tok/s  MFU {100 * r['mfu']:.1f}%  alloc "
                f"{r['peak_allocated_gb']} GiB  reserved {r['peak_reserved_gb']} GiB  plan {r['predicted_gb']} GiB "
                f"({100 * r['plan_error']:+.1f}% of alloc)")
        else:
            row("train", what, r.get("skipped") or r.get("error", "?"))
    lo = results.get("longest_seq_len", {})
    for p in lo.get("probes", []):
        row("longest_seq_len", str(p["seq_len"]), f"{'ok' if p['ok'] else p.get('error')}  {p.get('step_s', '')} s  "
            f"alloc {p['peak_allocated_gb']} GiB  reserved {p['peak_reserved_gb']} GiB")
    if lo:
        row("longest_seq_len", f"longest {lo.get('longest')}", f"stopped by {lo.get('stopped_by') or lo.get('error')}")
    ex = results.get("export", {})
    if ex:
        row("export", "train 2 stages, export bf16 --verify",
            ("ok" if ex.get("ok") else "FAILED") + "  " + ", ".join(f"{n} {s['seconds']} s" for n, s in
                                                                     ex.get("steps", {}).items()))
    for name, value in results.get("goals", {}).items():
        row("goals", name, str(value))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "gpu_check", help="folder for the JSON")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same code at toy sizes on CPU (< 3 min)")
    parser.add_argument("--sections", default="kernels,train,longest_seq_len,export",
                        help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    from longtrain.distributed import init_distributed, teardown

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu-dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    sizes = DRY if dry else GPU
    clock = Clock(sizes.total_s)
    args.out.mkdir(parents=True, exist_ok=True)
    device = init_distributed()  # one process; DeepSpeed needs its process group
    results: dict[str, Any] = {"meta": meta(device, dry), "sizes": dataclasses.asdict(sizes)}
    print(f"[gpu_check] {results['meta']['device']}, torch {torch.__version__}: set-up took "
          f"{sizes.total_s - clock.left():.0f} s", flush=True)
    wanted = args.sections.split(",")
    sections = {"kernels": lambda budget: kernel_section(sizes, device),
                "train": lambda budget: train_section(sizes, device, budget),
                "longest_seq_len": lambda budget: longest_section(sizes, device, budget),
                "export": lambda budget: export_section(sizes, budget, args.out / "export_run")}
    for name, run in sections.items():
        if name not in wanted:
            continue
        start = time.perf_counter()
        try:
            results[name] = run(clock.budget(sizes.budgets[name]))
        except Exception as exc:  # noqa: BLE001 - a broken section is reported, the others still run
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        results[name]["wall_s"] = round(time.perf_counter() - start, 1)
        results["goals"] = goals(results, dry)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"[gpu_check] {name} done in {results[name]['wall_s']} s ({clock.left():.0f} s left)", flush=True)
    print(table(results), flush=True)
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
