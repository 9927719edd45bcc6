"""Per-step metrics: metrics.jsonl (always), a console line with ETA, TensorBoard when installed,
and the MFU estimate."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peak per device, FLOP/s, for the MFU estimate (vendor datasheets;
# V100 has no bf16: its fp16 peak). Matched against torch.cuda.get_device_name, longest name first, so
# "H100 PCIe" wins over "H100" and "A100" over "A10" (gpu_peak_flops).
GPU_PEAK_FLOPS = {"B200": 2250e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
                  "H800": 989e12, "A100": 312e12, "A800": 312e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12,
                  "L4": 121e12, "4090": 165e12, "V100": 125e12}


def gpu_peak_flops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a device name such as ``NVIDIA H200``, or None when unknown."""
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            return GPU_PEAK_FLOPS[key]
    return None


def training_flops(n_params: int, n_layers: int, attn_width: int, tokens: int, sum_sq_doc_lens: int) -> float:
    """Model FLOPs of one forward+backward (Kaplan et al. 2020 6N per token, plus attention).

    Attention scores and the weighted sum cost ``2 * 2 * width * len^2 / 2`` per layer and document
    forward (causal: half the square), times 3 for forward + backward. Recomputation for activation
    checkpointing is not counted (MFU, not hardware utilisation), as in PaLM's definition.
    """
    return 6.0 * n_params * tokens + 6.0 * n_layers * attn_width * sum_sq_doc_lens


def measure_matmul_peak(device: torch.device, size: int = 1024, repeats: int = 8) -> float:
    """Measured matmul FLOP/s of this process (fp32 on CPU, bf16 on CUDA): MFU's denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def peak_flops(device: torch.device, configured_tflops: float | None) -> float:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        known = gpu_peak_flops(torch.cuda.get_device_name(device))
        if known:
            return known
    return measure_matmul_peak(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory (CUDA) or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_reserved_bytes(device: torch.device) -> int | None:
    """Peak memory the CUDA caching allocator held (allocated + cached + fragmentation), None off CUDA:
    what decides an out-of-memory, while ``peak_memory_bytes`` is what tensors used."""
    return int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None


def current_cuda_device() -> torch.device | None:
    """The CUDA device this process trains on, once CUDA is in use (None on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class MetricsLogger:
    """Rank 0 writes; other ranks call the same methods and nothing happens."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, log_every: int, tensorboard: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_every = log_every
        self._start = time.perf_counter()
        self._steps_timed = 0
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self._tb = None  # optional: pip install tensorboard

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        cuda = current_cuda_device()
        if cuda is not None and "peak_mem_gb" in record:  # peak_mem_gb is allocated; reserved decides OOMs
            record.setdefault("peak_reserved_gb", peak_reserved_bytes(cuda) / 2**30)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
        self._steps_timed += 1
        step = record["step"]
        if step % self.log_every == 0 or step == self.total_steps:
            elapsed = time.perf_counter() - self._start
            eta = elapsed / self._steps_timed * max(0, self.total_steps - step)
            print(f"[{record['stage']}] step {step}/{self.total_steps} loss {record['loss']:.4f} "
                  f"lr {record['lr']:.3g} gnorm {record.get('grad_norm') or 0:.3f} "
                  f"tok/s {record['tokens_per_s']:.0f} mfu {100 * record.get('mfu', 0):.1f}% "
                  f"mem {record['peak_mem_gb']:.2f}GB seq {record['seq_len']} rope {record['rope_theta']:g} "
                  f"({record['step_seconds']:.2f}s/step, ETA {format_duration(eta)})", flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
