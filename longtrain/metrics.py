"""Per-step metrics: metrics.jsonl (always), a console line with ETA, TensorBoard when installed,
Weights & Biases when configured (``train.wandb``) and installed, and the MFU estimate."""
from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import time
import uuid
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


def release_freed_memory(device: torch.device) -> None:
    """On CPU (glibc), return every freed block of 64 KiB or more to the OS at once, so that the peak RSS
    ``peak_memory_bytes`` reports is the peak of live tensors, the number ``longtrain plan`` predicts.

    glibc's malloc raises its mmap threshold after large frees (up to 32 MiB) and then keeps freed
    blocks of that size in its heap: the measured peak RSS of a long-sequence step was 20-50% above
    the live peak and depended on the order of earlier allocations (docs/plan.md). Setting
    ``M_MMAP_THRESHOLD`` (which also disables the dynamic threshold) and ``M_TRIM_THRESHOLD`` to 64 KiB
    is what ``benchmarks/bench_sp.py`` measures activation memory with. CUDA is untouched."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): RSS may exceed the live peak there
        pass


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


def flat_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """Nested per-source mappings as ``key/name`` entries (``tokens_by_source/code``): TensorBoard and
    W&B chart scalars."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{name}": item for name, item in value.items()})
        else:
            out[key] = value
    return out


STAGE_COLUMNS = ("step", "event", "stage_index", "stage", "seq_len", "rope_type", "rope_theta", "sp_size")


class WandbLogger:
    """Every step's metrics against the training step, and a ``stages`` table that gains a row at each
    stage transition (``begin``; ``resume`` for the first step of a resumed run). The run id is kept in
    the run folder (``wandb_run_id``), so a resumed run continues the same W&B run; steps that run again
    after a resume are logged again at the same ``step``."""

    ID_FILE = "wandb_run_id"

    def __init__(self, run_dir: Path, cfg, run_config: dict[str, Any] | None):
        # Imported here: wandb is optional and takes a second to import; runs without train.wandb never pay it.
        import wandb

        id_file = run_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.resolve().name,
                              mode=cfg.mode, id=run_id, resume="allow", config=run_config,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._stages: list[list[Any]] = []
        self._stage_index: int | None = None

    def log(self, record: dict[str, Any]) -> None:
        values = flat_metrics(record)
        if record.get("stage_index") != self._stage_index:
            self._stage_index = record.get("stage_index")
            event = "begin" if record.get("step_in_stage") == 1 else "resume"
            self._stages.append([record.get(c) if c != "event" else event for c in STAGE_COLUMNS])
            values["stages"] = self._wandb.Table(columns=list(STAGE_COLUMNS), data=[list(r) for r in self._stages])
        self.run.log(values)

    def close(self) -> None:
        self.run.finish()


def open_wandb(run_dir: Path, cfg, run_config: dict[str, Any] | None) -> WandbLogger | None:
    """A WandbLogger, or None with a warning line when wandb is not installed or does not start: the
    run goes on, metrics.jsonl holds every step."""
    try:
        return WandbLogger(run_dir, cfg, run_config)
    except ImportError:
        print("warning: train.wandb is set but the wandb package is not installed (pip install 'longtrain[wandb]'); "
              "metrics go to metrics.jsonl only", flush=True)
    except Exception as exc:  # any wandb start-up failure (login, network): training must not stop for it
        print(f"warning: Weights & Biases did not start ({type(exc).__name__}: {str(exc)[:200]}); metrics go to "
              "metrics.jsonl only", flush=True)
    return None


class MetricsLogger:
    """Rank 0 writes; other ranks call the same methods and nothing happens."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, log_every: int, tensorboard: bool,
                 wandb=None, run_config: dict[str, Any] | None = None):
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
        self._wandb = open_wandb(run_dir, wandb, run_config) if enabled and wandb is not None else None
        self._start = time.perf_counter()  # the ETA counts training steps, not W&B's start-up

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
            for key, value in flat_metrics(record).items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
        if self._wandb is not None:
            self._wandb.log(record)
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
        if self._wandb is not None:
            self._wandb.close()
