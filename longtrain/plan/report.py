"""A plan for people (a table per run, the breakdown per stage, suggestions) and for scripts (JSON)."""
from __future__ import annotations

from typing import Any

from longtrain.plan.memory import TERMS
from longtrain.plan.planner import RunPlan, StagePlan
from longtrain.plan.target import GiB
from longtrain.plan.time import format_seconds


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def size(n: int | float) -> str:
    """``1.23 GiB``, or ``45.6 MiB`` below a tenth of a GiB (CPU runs of small models)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def stage_summary(plan: StagePlan) -> str:
    s = plan.stage
    sp = f"{s.sp_size}" + (f" {s.sp_mode}" if s.sp_size > 1 else "")
    limit = f"{gib(plan.limit_bytes)}" if plan.limit_bytes is not None else "-"
    verdict = "yes" if plan.fits else f"NO (short {gib(plan.short_bytes)} GiB)"
    return (f"| {s.index} {s.name} | {s.seq_len} | {sp} | {s.config.micro_batch_size} x {s.layout.grad_accum} | "
            f"{s.local_tokens} | {gib(plan.peak_bytes)} | {limit} | {verdict} | "
            f"{plan.memory.peak_phase.replace('_', ' ')} | {format_seconds(plan.time.step_seconds)} | "
            f"{format_seconds(plan.time.step_seconds * s.steps)} |")


def breakdown_lines(plan: StagePlan) -> list[str]:
    terms = ", ".join(f"{name} {size(value)}" for name, value in plan.memory.breakdown.items() if value)
    lines = [f"  stage {plan.stage.index} '{plan.stage.name}': {terms}"]
    if plan.memory.host_bytes:
        host = ", ".join(f"{k} {size(v)}" for k, v in plan.memory.host_breakdown.items() if v)
        lines.append(f"    host memory per rank: {host}; per node {size(plan.host_bytes_per_node)}"
                     + (f" of {size(plan.host_limit_bytes)}" if plan.host_limit_bytes else ""))
    t = plan.time
    lines.append(f"    step: {t.flops_per_step / 1e12:.1f} TFLOP (all ranks) -> {format_seconds(t.compute_seconds)} "
                 f"compute + {format_seconds(t.comm_seconds)} communication ({t.zero_comm_bytes / GiB:.2f} GiB ZeRO, "
                 f"{t.sp_comm_bytes / GiB:.2f} GiB sequence parallel per rank); sum(len^2): {t.sum_sq_source}")
    for suggestion in plan.suggestions:
        state = "fits" if suggestion.fits else f"still {gib(suggestion.short_bytes)} GiB short"
        lines.append(f"    try: --set {' --set '.join(suggestion.overrides)}  -> peak {size(suggestion.peak_bytes)}, "
                     f"{state}")
    return lines


def format_plan(run: RunPlan) -> str:
    t, m = run.target, run.shape
    mem = f"{gib(t.device_memory)} GiB per device, " if t.device_memory else ""
    host = f"{gib(t.host_memory)} GiB host per node" if t.host_memory else "host memory not checked"
    lines = [
        f"plan: {t.world_size} ranks on {t.nodes} node(s), {t.device}, {mem}{host}",
        f"model: {m.n_params:,} parameters, {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/"
        f"{m.num_kv_heads}, vocab {m.vocab_size}; ZeRO {run.setup.zero_stage}, {run.setup.precision}, "
        f"checkpointing {run.setup.checkpointing}, loss chunk {run.setup.loss_chunk_tokens} tokens"
        + (", optimizer offload" if run.setup.offload_optimizer else "")
        + (", parameter offload" if run.setup.offload_param else ""),
        "",
        "| stage | seq_len | sp | micro x accum | tokens/rank | peak GiB/rank | limit GiB | fits | peak at | step | stage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [stage_summary(p) for p in run.stages]
    lines.append("")
    for plan in run.stages:
        lines += breakdown_lines(plan)
    return "\n".join(lines)


def refusal_message(run: RunPlan) -> str:
    """One line for the trainer's refusal: every stage that does not fit and the first change that does."""
    parts = []
    for plan in run.stages:
        if plan.fits:
            continue
        text = (f"stage {plan.stage.index} '{plan.stage.name}' needs {gib(plan.peak_bytes)} GiB per rank, "
                f"{gib(plan.short_bytes)} GiB more than it has ({gib(plan.limit_bytes or 0)} GiB)")
        fitting = [s for s in plan.suggestions if s.fits]
        if fitting:
            text += f"; fits with --set {' --set '.join(fitting[0].overrides)} ({gib(fitting[0].peak_bytes)} GiB)"
        elif plan.suggestions:
            best = plan.suggestions[-1]
            text += f"; closest: --set {' --set '.join(best.overrides)} (still {gib(best.short_bytes)} GiB short)"
        parts.append(text)
    return ("memory plan: " + "; ".join(parts) + " (see `longtrain plan`; set train.ignore_memory_plan: true "
            "to start anyway)")


def stage_json(plan: StagePlan) -> dict[str, Any]:
    s, t = plan.stage, plan.time
    return {
        "index": s.index, "name": s.name, "seq_len": s.seq_len, "sp_size": s.sp_size, "sp_mode": s.sp_mode,
        "micro_batch_size": s.config.micro_batch_size, "grad_accum": s.layout.grad_accum, "dp_size": s.dp_size,
        "local_tokens": s.local_tokens, "peak_bytes_per_rank": plan.peak_bytes, "peak_phase": plan.memory.peak_phase,
        "limit_bytes_per_rank": plan.limit_bytes, "fits": plan.fits, "short_bytes": plan.short_bytes,
        "breakdown": {name: plan.memory.breakdown.get(name, 0) for name in TERMS},
        "phases": plan.memory.phases,
        "host_bytes_per_rank": plan.memory.host_bytes, "host_breakdown": plan.memory.host_breakdown,
        "host_bytes_per_node": plan.host_bytes_per_node,
        "step_seconds_estimate": t.step_seconds, "steps": s.steps,
        "stage_seconds_estimate": t.step_seconds * s.steps,
        "time": {"flops_per_step": t.flops_per_step, "model_flops_per_step": t.model_flops_per_step,
                 "compute_seconds": t.compute_seconds, "comm_seconds": t.comm_seconds,
                 "zero_comm_bytes_per_rank": t.zero_comm_bytes, "sp_comm_bytes_per_rank": t.sp_comm_bytes,
                 "sum_sq_per_token": t.sum_sq_per_token, "sum_sq_source": t.sum_sq_source},
        "suggestions": [{"set": sg.overrides, "peak_bytes_per_rank": sg.peak_bytes, "fits": sg.fits,
                         "short_bytes": sg.short_bytes} for sg in plan.suggestions],
    }


def plan_json(run: RunPlan) -> dict[str, Any]:
    t, m = run.target, run.shape
    return {
        "world_size": t.world_size, "nodes": t.nodes, "device": t.device, "device_memory_bytes": t.device_memory,
        "host_memory_bytes": t.host_memory, "fixed_overhead_bytes": t.fixed_overhead, "peak_flops": t.peak_flops,
        "efficiency": t.efficiency, "fits": run.fits,
        "model": {"n_params": m.n_params, "layers": m.num_layers, "hidden_size": m.hidden_size,
                  "intermediate_size": m.intermediate_size, "heads": m.num_heads, "kv_heads": m.num_kv_heads,
                  "head_dim": m.head_dim, "vocab_size": m.vocab_size, "tied_embeddings": m.tied_embeddings},
        "train": {"zero_stage": run.setup.zero_stage, "precision": run.setup.precision,
                  "checkpointing": run.setup.checkpointing, "offload_optimizer": run.setup.offload_optimizer,
                  "offload_param": run.setup.offload_param, "loss_chunk_tokens": run.setup.loss_chunk_tokens},
        "stages": [stage_json(p) for p in run.stages],
    }
