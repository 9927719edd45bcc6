"""Step time estimate: compute over a peak, plus communication over a bandwidth.

- FLOPs: ``longtrain.metrics.training_flops`` (6N per token, Kaplan et al. 2020, plus attention's
  ``6 layers width sum(len^2)``), plus what checkpointing recomputes (one more forward of the layers:
  ``2 N_layers`` per token, and under full recomputation the attention's forward too; selective keeps
  the attention output). Divided by the ranks (data and sequence parallelism split tokens and
  attention work evenly) and by ``peak x efficiency``.
- ``sum(len^2)``: from the dataset's ``meta.json`` document-length histogram (``data_prep/stats.py``:
  power-of-two bins; a bin counts as documents of 1.5x its start, capped at the longest; each
  document is cut into rows of ``seq_len``), else the worst case, one document per row; a mixture
  takes each source's by its share of the rows.
- Communication per rank (ring algorithms: ``(W-1)/W`` of the message crosses each rank's link): ZeRO-0
  all-reduce ``2N`` per step; ZeRO-1 reduce-scatter + all-gather ``2N`` per step; ZeRO-2 reduce-scatter
  per micro-batch + all-gather ``N``; ZeRO-3 all-gathers in forward, recomputation and backward plus a
  reduce-scatter per micro-batch (Rajbhandari et al. 2020, section 7: 1.5x data parallelism's volume
  without recomputation); sequence parallelism's bytes per layer from docs/sequence_parallel.md. Not
  overlapped with compute (an upper bound); ZeRO traffic crosses nodes when there are several, a
  sequence-parallel group stays inside a node when ``sp_size`` divides the GPUs per node.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from longtrain.metrics import training_flops
from longtrain.plan.setup import TrainSetup
from longtrain.plan.shapes import ModelShape


@dataclass(frozen=True)
class TimeEstimate:
    flops_per_step: float
    """Hardware FLOPs of one optimizer step, all ranks (model FLOPs + recomputation)."""
    model_flops_per_step: float
    """``training_flops``: what MFU counts."""
    compute_seconds: float
    zero_comm_bytes: int
    """Per rank per step."""
    sp_comm_bytes: int
    comm_seconds: float
    sum_sq_per_token: float
    """Mean document length seen by a token: ``sum(len^2) / tokens`` of the stage's rows."""
    sum_sq_source: str

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.comm_seconds


def sum_sq_per_token(data_dir: str, seq_len: int) -> tuple[float, str]:
    """``sum(len^2) / tokens`` of the segments of rows of ``seq_len``, from ``meta.json``'s histogram."""
    meta_path = Path(data_dir) / "meta.json"
    try:
        hist = json.loads(meta_path.read_text(encoding="utf-8"))["doc_length_histogram"]
        starts, counts, longest = hist["bin_starts"], hist["counts"], hist["max"]
    except (OSError, ValueError, KeyError, TypeError):
        return float(seq_len), f"worst case (one document per row: no histogram in {meta_path})"
    tokens = squares = 0.0
    for start, count in zip(starts, counts):
        length = min(1.5 * start, longest or 1.5 * start)
        full, rest = divmod(length, seq_len)
        tokens += count * length
        squares += count * (full * seq_len**2 + rest**2)
    if tokens <= 0:
        return float(seq_len), f"worst case (empty histogram in {meta_path})"
    return min(float(seq_len), squares / tokens), f"{meta_path} document-length histogram"


def mixture_sum_sq_per_token(sources, seq_len: int) -> tuple[float, str]:
    """``sum_sq_per_token`` of a stage's sources (``config.DataSource``), weighted by their share of the
    rows: every row holds ``seq_len`` tokens, so a source's share of rows is its share of tokens."""
    total = sum(s.weight for s in sources)
    parts = [(s.weight / total, *sum_sq_per_token(s.path, seq_len)) for s in sources]
    mean = sum(share * value for share, value, _ in parts)
    if len(parts) == 1:
        return mean, parts[0][2]
    return mean, "mixture of " + "; ".join(f"{share:.0%}: {source}" for share, _, source in parts)


def recompute_flops(shape: ModelShape, setup: TrainSetup, tokens: int, sum_sq: float) -> float:
    """One more forward of the decoder layers (2 FLOPs per layer parameter and token), with the
    attention's forward under full recomputation (selective keeps the kernel's output)."""
    if setup.checkpointing == "none":
        return 0.0
    flops = 2.0 * shape.num_layers * shape.layer_params * tokens
    if setup.checkpointing == "full":
        flops += 2.0 * shape.num_layers * shape.q_width * sum_sq
    return flops


def zero_comm_bytes(shape: ModelShape, setup: TrainSetup, world_size: int, grad_accum: int) -> int:
    """Bytes one rank sends per optimizer step for ZeRO's gradient reduction and parameter gathers."""
    if world_size == 1:
        return 0
    share = (world_size - 1) / world_size
    n, b = shape.n_params, setup.param_bytes
    if setup.zero_stage == 0:
        volume = 2 * n * b
    elif setup.zero_stage == 1:
        volume = 2 * n * b
    elif setup.zero_stage == 2:
        volume = grad_accum * n * b + n * b
    else:
        gathers = 3 if setup.checkpointing != "none" else 2
        volume = grad_accum * (gathers + 1) * n * b
    return int(share * volume)


def sp_comm_bytes(shape: ModelShape, setup: TrainSetup, local_tokens: int, sp_size: int, sp_mode: str,
                  kv_repeat: int, grad_accum: int) -> int:
    """Bytes one rank sends per optimizer step for sequence parallelism (docs/sequence_parallel.md)."""
    if sp_size == 1:
        return 0
    b, d, p, t = setup.param_bytes, shape.head_dim, sp_size, local_tokens
    forwards = 2 if setup.checkpointing != "none" else 1  # checkpointing runs the layer's forward twice
    if sp_mode == "ulysses":
        per = (p - 1) / p * t * d * (2 * shape.num_heads + 2 * shape.num_kv_heads * kv_repeat) * b
        layer = forwards * per + per
    else:
        kv = 2 * shape.num_kv_heads * t * d
        layer = forwards * (p - 1) * kv * b + (p - 1) * kv * b + p * kv * 4
    return int(layer * shape.num_layers * grad_accum)


def estimate_time(shape: ModelShape, setup: TrainSetup, *, tokens_per_step: int, world_size: int,
                  seq_len: int, local_tokens: int, sp_size: int, sp_mode: str, kv_repeat: int, grad_accum: int,
                  sources: list, peak_flops: float, efficiency: float, zero_bandwidth: float,
                  sp_bandwidth: float) -> TimeEstimate:
    per_token, source = mixture_sum_sq_per_token(sources, seq_len)
    sum_sq = per_token * tokens_per_step
    model = training_flops(shape.n_params, shape.num_layers, shape.q_width, tokens_per_step, int(sum_sq))
    hardware = model + recompute_flops(shape, setup, tokens_per_step, sum_sq)
    compute = hardware / world_size / (peak_flops * efficiency)
    zero = zero_comm_bytes(shape, setup, world_size, grad_accum)
    sp = sp_comm_bytes(shape, setup, local_tokens, sp_size, sp_mode, kv_repeat, grad_accum)
    comm = zero / zero_bandwidth + (sp / sp_bandwidth if sp else 0.0)
    return TimeEstimate(flops_per_step=hardware, model_flops_per_step=model, compute_seconds=compute,
                        zero_comm_bytes=zero, sp_comm_bytes=sp, comm_seconds=comm,
                        sum_sq_per_token=per_token, sum_sq_source=source)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
