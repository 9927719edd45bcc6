"""Memory and time planning: will every stage fit, and how long will a step take (docs/plan.md).

Built from the resolved stages (``longtrain.stages.resolve_stages``) and the model's ``config.json``
(parameters counted on the meta device); no weight, dataset row or GPU is needed. Modules:
``shapes`` (the model's sizes), ``setup`` (the training settings that decide memory, from the run
config and the generated DeepSpeed JSON), ``states`` (parameters, gradients, master copy, optimizer
states, ZeRO buffers), ``activations`` (saved bytes per token by checkpointing mode), ``memory`` (the
phases of a step and their peak), ``time`` (FLOPs and communication), ``target`` (the machine),
``planner`` (per-stage plans and suggestions), ``report`` (table and JSON).

Used by ``longtrain plan`` and by the trainer, which refuses a run a stage of which cannot fit before it
loads any weight (``check_memory_plan``) and logs the predicted peak next to the measured one.
"""
from __future__ import annotations

import os

import torch

from longtrain.config import ConfigError, RunConfig
from longtrain.metrics import GPU_PEAK_FLOPS, measure_matmul_peak
from longtrain.plan.planner import RunPlan, StagePlan, plan_run
from longtrain.plan.report import format_plan, plan_json, refusal_message
from longtrain.plan.shapes import model_shape
from longtrain.plan.target import (CPU_ENGINE_OVERHEAD, Target, current_rss_bytes, host_memory_bytes,
                                   load_trainer_libraries, measure_cpu_fixed_overhead, parse_bytes)

__all__ = ["RunPlan", "StagePlan", "Target", "build_target", "check_memory_plan", "format_plan", "plan_json",
           "plan_run", "model_shape"]

DEFAULT_GPU = "H100"
DEFAULT_GPU_MEMORY = 80 * 10**9


def _gpu_peak(name: str) -> float:
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100", "A100" before "A10"
        if key.lower() in name.lower():
            return GPU_PEAK_FLOPS[key]
    raise ConfigError(f"--gpu {name!r}: unknown GPU; known: {', '.join(GPU_PEAK_FLOPS)} (or give --peak-tflops)")


def build_target(cfg: RunConfig, *, world_size: int, nodes: int = 1, device: str | None = None,
                 device_memory: str | int | None = None, host_memory: str | int | None = None,
                 gpu: str | None = None, peak_tflops: float | None = None, efficiency: float | None = None,
                 bandwidth_gbs: float = 25.0, intra_node_bandwidth_gbs: float = 150.0,
                 fixed_overhead: int | None = None) -> Target:
    """The machine to plan for; defaults come from this machine where it is that machine (its GPU, its
    memory, its measured matmul peak and fixed overhead on CPU)."""
    has_gpu = torch.cuda.is_available()
    device = device or ("cuda" if has_gpu else "cpu")
    on_cuda = device == "cuda"

    def size(value, what):
        return parse_bytes(value, what) if isinstance(value, str) else value

    dev_mem = size(device_memory, "--device-memory")
    if dev_mem is None and on_cuda:
        dev_mem = torch.cuda.get_device_properties(0).total_memory if has_gpu else DEFAULT_GPU_MEMORY
    host = size(host_memory, "--host-memory")
    if host is None and not on_cuda:
        host = host_memory_bytes()
    tflops = peak_tflops or cfg.train.peak_tflops
    if tflops:
        peak = tflops * 1e12
    elif on_cuda:
        peak = _gpu_peak(gpu or (torch.cuda.get_device_name(0) if has_gpu else DEFAULT_GPU))
    else:
        peak = measure_matmul_peak(torch.device("cpu"))
    if fixed_overhead is None:
        fixed_overhead = measure_cpu_fixed_overhead() if not on_cuda else 0
    return Target(device=device, world_size=world_size, nodes=nodes, device_memory=dev_mem, host_memory=host,
                  fixed_overhead=fixed_overhead, peak_flops=peak,
                  efficiency=efficiency or (0.5 if on_cuda else 0.7), bandwidth=bandwidth_gbs * 1e9,
                  intra_node_bandwidth=intra_node_bandwidth_gbs * 1e9)


def ranks_on_this_node(world_size: int) -> int:
    """Ranks sharing this node's memory, from the launcher's variables (torchrun: LOCAL_WORLD_SIZE,
    deepspeed: LOCAL_SIZE, Slurm: SLURM_NTASKS_PER_NODE); all ranks when none is set."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return min(world_size, int(value))
    return world_size


class SkippedPlan:
    """Stands in for a RunPlan when the model cannot be planned (never a reason to refuse a run)."""

    def __init__(self, reason: str):
        self.reason = reason

    def summary(self) -> str:
        return f"memory plan skipped: {self.reason}"

    def peak_gb(self, index: int) -> None:
        return None


def check_memory_plan(cfg: RunConfig, stages, hf_config, device: torch.device) -> RunPlan | SkippedPlan:
    """The trainer's start-up check: plan every stage for this world size and device; raise a
    ConfigError naming each stage that cannot fit and the change that would, unless
    ``train.ignore_memory_plan``. Runs before any weight loads.

    On CPU the limit is this machine's memory (MemTotal) shared by the ranks of this node, and the fixed
    overhead is this process's resident size now (its libraries are loaded); on CUDA the device's memory."""
    world = stages[0].world_size if stages else 1
    per_node = ranks_on_this_node(world)
    on_cuda = device.type == "cuda"
    try:
        shape = model_shape(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    except ConfigError as exc:  # an architecture the meta device cannot build: train without a plan
        return SkippedPlan(str(exc))
    if not on_cuda:
        load_trainer_libraries()  # measured with what the process will hold (the data reader's library)
    target = Target(
        device="cuda" if on_cuda else "cpu", world_size=world, nodes=max(1, world // per_node),
        device_memory=torch.cuda.get_device_properties(device).total_memory if on_cuda else None,
        host_memory=host_memory_bytes() if not on_cuda else None,
        fixed_overhead=0 if on_cuda else current_rss_bytes() + CPU_ENGINE_OVERHEAD,
        peak_flops=(cfg.train.peak_tflops or 1.0) * 1e12)  # the step time is not needed here
    if world % target.nodes:  # uneven launcher layout: plan as one node holding every rank
        target = Target(**{**target.__dict__, "nodes": 1})
    run = plan_run(cfg, target, shape=shape, stages=stages, suggest=False)
    if not run.fits and not getattr(cfg.train, "ignore_memory_plan", False):
        run = plan_run(cfg, target, shape=shape, stages=stages, suggest=True)
        raise ConfigError(refusal_message(run))
    return run
