"""One plan per stage, from the resolved stages: peak memory per rank, whether it fits, the step time,
and, for a stage that does not fit, the smallest change that does."""
from __future__ import annotations

from dataclasses import dataclass, field

from longtrain.config import ConfigError, RunConfig, apply_override, config_from_dict
from longtrain.model import load_model_config
from longtrain.parallel import kv_repeat
from longtrain.plan.activations import Layout
from longtrain.plan.memory import MemoryPlan, plan_memory
from longtrain.plan.setup import TrainSetup
from longtrain.plan.shapes import ModelShape, model_shape
from longtrain.plan.target import GiB, Target
from longtrain.plan.time import TimeEstimate, estimate_time
from longtrain.stages import ModelFacts, ResolvedStage, resolve_stages


@dataclass
class Suggestion:
    """One change (as ``--set`` overrides) and what the stage would then need."""

    overrides: list[str]
    peak_bytes: int
    fits: bool
    short_bytes: int
    """How much it would still be over the limit (0 when it fits)."""


@dataclass
class StagePlan:
    stage: ResolvedStage
    memory: MemoryPlan
    time: TimeEstimate
    limit_bytes: int | None
    """What the peak of one rank may reach (device memory less reserve, or the host's share per rank)."""
    host_bytes_per_node: int
    host_limit_bytes: int | None
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def fits_device(self) -> bool:
        return self.limit_bytes is None or self.peak_bytes <= self.limit_bytes

    @property
    def fits_host(self) -> bool:
        return self.host_limit_bytes is None or self.host_bytes_per_node <= self.host_limit_bytes

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    @property
    def short_bytes(self) -> int:
        """How much more memory this stage needs than it has (0 when it fits)."""
        over = max(0, self.peak_bytes - self.limit_bytes) if self.limit_bytes is not None else 0
        host = max(0, self.host_bytes_per_node - self.host_limit_bytes) if self.host_limit_bytes is not None else 0
        return max(over, host)


@dataclass
class RunPlan:
    target: Target
    shape: ModelShape
    setup: TrainSetup
    stages: list[StagePlan]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def summary(self) -> str:
        """One line for the trainer's log: each stage's predicted peak per rank and its largest terms."""
        parts = []
        for plan in self.stages:
            top = sorted(((v, k) for k, v in plan.memory.breakdown.items() if v), reverse=True)[:3]
            terms = ", ".join(f"{k} {v / GiB:.2f}" for v, k in top)
            parts.append(f"{plan.stage.name} {plan.peak_bytes / GiB:.2f} GiB ({terms})")
        limit = self.stages[0].limit_bytes if self.stages else None
        return (f"memory plan per rank: {'; '.join(parts)}"
                + (f"; limit {limit / GiB:.2f} GiB" if limit else "")
                + f"; fixed overhead {self.target.fixed_overhead / GiB:.2f} GiB")

    def peak_gb(self, index: int) -> float:
        """Predicted peak of stage ``index`` in GiB (what metrics.jsonl logs next to ``peak_mem_gb``)."""
        return self.stages[index].peak_bytes / GiB


def stage_layout(stage: ResolvedStage, shape: ModelShape, setup: TrainSetup, target: Target) -> Layout:
    repeat = 1
    if stage.sp_size > 1 and stage.sp_mode == "ulysses":
        repeat = kv_repeat(shape.num_heads, shape.num_kv_heads, stage.sp_size)
    # the per-document loop runs on CPU, in fp32, and when train.attention forces it (longtrain.attention)
    varlen = target.on_cuda and setup.precision != "fp32" and setup.attention != "sdpa_loop"
    return Layout(local_tokens=stage.local_tokens, sp_size=stage.sp_size, sp_mode=stage.sp_mode,
                  on_cuda=target.on_cuda, kv_repeat=repeat, varlen=varlen)


def plan_stage(stage: ResolvedStage, shape: ModelShape, setup: TrainSetup, target: Target) -> StagePlan:
    layout = stage_layout(stage, shape, setup, target)
    memory = plan_memory(shape, setup, layout, target.world_size, target.fixed_overhead, stage.layout.grad_accum)
    time = estimate_time(
        shape, setup, tokens_per_step=stage.tokens_per_step, world_size=target.world_size,
        seq_len=stage.seq_len, local_tokens=layout.local_tokens, sp_size=stage.sp_size, sp_mode=stage.sp_mode,
        kv_repeat=layout.kv_repeat, grad_accum=stage.layout.grad_accum, sources=stage.config.sources(),
        peak_flops=target.peak_flops, efficiency=target.efficiency, zero_bandwidth=target.zero_bandwidth(),
        sp_bandwidth=target.sp_bandwidth(stage.sp_size))
    return StagePlan(stage=stage, memory=memory, time=time, limit_bytes=target.rank_limit(),
                     host_bytes_per_node=memory.host_bytes * target.ranks_per_node,
                     host_limit_bytes=target.host_memory if target.on_cuda else None)  # on CPU: in rank_limit


def plan_run(cfg: RunConfig, target: Target, shape: ModelShape | None = None,
             stages: list[ResolvedStage] | None = None, suggest: bool = True) -> RunPlan:
    """Plan every stage of ``cfg`` on ``target`` (``stages``: already resolved for its world size)."""
    if shape is None or stages is None:
        hf_config = load_model_config(cfg.model)
        shape = shape or model_shape(hf_config, trust_remote_code=cfg.model.trust_remote_code)
        stages = stages or resolve_stages(cfg, target.world_size, ModelFacts.from_config(hf_config))
    setup = TrainSetup.from_config(cfg, target.world_size, target.on_cuda, shape.vocab_size)
    plans = [plan_stage(stage, shape, setup, target) for stage in stages]
    run = RunPlan(target=target, shape=shape, setup=setup, stages=plans)
    if suggest:
        for plan in plans:
            if not plan.fits:
                plan.suggestions = suggestions(cfg, plan, shape, target)
    return run


# ------------------------------------------------------------------------------------------ suggestions
def _candidates(cfg: RunConfig, stage: ResolvedStage, shape: ModelShape, world: int) -> list[list[str]]:
    """Single changes, cheapest first: smaller micro-batches (same rows per step), checkpointing,
    higher sp_size, optimizer offload, a higher ZeRO stage, parameter offload."""
    where, sc, train = stage.where, stage.config, cfg.train
    out: list[list[str]] = []
    mb = sc.micro_batch_size
    while mb > 1:
        mb //= 2
        if sc.global_rows is not None:  # a global batch: grad_accum follows the micro-batch by itself
            out.append([f"{where}.micro_batch_size={mb}"])
        else:
            out.append([f"{where}.micro_batch_size={mb}",
                        f"{where}.grad_accum={stage.layout.grad_accum * sc.micro_batch_size // mb}"])
    if not train.activation_checkpointing:
        out.append(["train.activation_checkpointing=true"])
    modes = (sc.sp_mode,) + tuple(m for m in ("ulysses", "ring") if m != sc.sp_mode)  # the stage's mode first
    for sp in range(sc.sp_size + 1, world + 1):
        if world % sp == 0:
            for mode in modes:
                if mode == "ulysses" and shape.num_heads % sp:
                    continue
                out.append([f"{where}.sp_size={sp}", f"{where}.sp_mode={mode}"])
                break
    if train.zero_stage >= 1 and not train.offload_optimizer:
        out.append(["train.offload_optimizer=true"])
    for zero in range(train.zero_stage + 1, 4):
        out.append([f"train.zero_stage={zero}"])
    if train.zero_stage == 3 and not train.offload_param:
        out.append(["train.offload_optimizer=true", "train.offload_param=true"])
    return out


def _replan(cfg: RunConfig, overrides: list[str], index: int, shape: ModelShape, target: Target) -> StagePlan | None:
    """Stage ``index`` planned with ``overrides`` applied (None when they are not valid for this model
    and world size, e.g. an sp_size the heads do not allow)."""
    raw = cfg.to_dict()
    try:
        for item in overrides:
            apply_override(raw, item)
        new = config_from_dict(raw)
        stage = resolve_stages(new, target.world_size, ModelFacts.from_config(load_model_config(new.model)))[index]
    except (ConfigError, ValueError):
        return None
    setup = TrainSetup.from_config(new, target.world_size, target.on_cuda, shape.vocab_size)
    return plan_stage(stage, shape, setup, target)


def suggestions(cfg: RunConfig, plan: StagePlan, shape: ModelShape, target: Target, limit: int = 6) -> list[Suggestion]:
    """The single changes that make the stage fit, cheapest first; when none does, the one that comes
    closest and the combination of every change that helped (applied in order), with what each would
    still need."""
    index = plan.stage.index
    fitting: list[Suggestion] = []
    closest: Suggestion | None = None
    combined, combined_short = [], plan.short_bytes
    for change in _candidates(cfg, plan.stage, shape, target.world_size):
        new = _replan(cfg, change, index, shape, target)
        if new is None:
            continue
        option = Suggestion(change, new.peak_bytes, new.fits, new.short_bytes)
        if new.fits:
            fitting.append(option)
            if len(fitting) >= limit:
                break
            continue
        if closest is None or option.short_bytes < closest.short_bytes:
            closest = option
        trial = _replan(cfg, combined + change, index, shape, target)
        if trial is not None and trial.short_bytes < combined_short:
            combined, combined_short = combined + change, trial.short_bytes
    if fitting:
        return fitting
    out = [closest] if closest is not None else []
    if combined and (closest is None or combined != closest.overrides):
        together = _replan(cfg, combined, index, shape, target)
        out.append(Suggestion(combined, together.peak_bytes, together.fits, together.short_bytes))
    return out
