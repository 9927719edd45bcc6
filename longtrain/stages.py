"""Resolved stages: every per-stage number of a run, computed once, before anything is launched.

``resolve_stages(cfg, world_size, facts)`` is a pure function (no DeepSpeed, no process group, no
file read): it turns the stages as written in the run config into :class:`ResolvedStage` objects
holding the step count, the step layout over data-parallel ranks, the RoPE parameters in
transformers' form, ``max_position_embeddings``, the sequence-parallel degree and mode, and the
learning-rate schedule, and it runs every check that can be made from the config, the world size
and the model's config alone (errors name ``stages.N.key``). The trainer, the memory planner and
the tests all read these objects instead of re-deriving them from ``cfg.stages[i]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from longtrain.config import ConfigError, RunConfig, StageConfig
from longtrain.data import StepLayout
from longtrain.parallel import check_sp_for_model, padded_length
from longtrain.rope import original_max_position_embeddings, rope_parameters


@dataclass(frozen=True)
class ModelFacts:
    """What resolving stages needs to know about the model, read before any stage changes it."""

    hf_config: Any
    """The model's HF config (head counts for the sequence-parallel checks)."""
    original_max_position_embeddings: int
    """The pretraining length (scaled RoPE types and dynamic NTK are relative to it)."""

    @classmethod
    def from_config(cls, hf_config) -> "ModelFacts":
        return cls(hf_config, original_max_position_embeddings(hf_config))


def learning_rate(stage: StageConfig, step_in_stage: int, total_steps: int) -> float:
    """Linear warmup to ``lr``, then cosine / linear decay to ``min_lr`` at the last step, or constant.

    A pure function of (stage, step): resuming needs no scheduler state."""
    if stage.warmup_steps and step_in_stage < stage.warmup_steps:
        return stage.lr * (step_in_stage + 1) / stage.warmup_steps
    if stage.decay == "constant":
        return stage.lr
    span = max(1, total_steps - stage.warmup_steps - 1)
    progress = min(1.0, (step_in_stage - stage.warmup_steps) / span)
    if stage.decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return stage.min_lr + (stage.lr - stage.min_lr) * factor


def stage_steps(stage: StageConfig, rows_per_step: int) -> int:
    """Optimizer steps of a stage: ``steps``, or a token budget rounded up to whole steps."""
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.tokens / (rows_per_step * stage.seq_len)))


def stage_grad_accum(stage: StageConfig, where: str, world_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank: ``grad_accum`` as written, or derived
    from the stage's global batch (``global_batch_rows`` / ``global_batch_tokens``) and this world size,
    so that the rows of every step, hence the step count and the LR schedule, do not depend on it."""
    rows = stage.global_rows
    if rows is None:
        return stage.grad_accum
    dp_size = world_size // stage.sp_size
    per_step = stage.micro_batch_size * dp_size
    if rows % per_step:
        key = "global_batch_tokens" if stage.global_batch_tokens is not None else "global_batch_rows"
        raise ConfigError(
            f"{where}.{key}: {rows} rows per step do not split into whole micro-batches on {world_size} ranks "
            f"(micro_batch_size {stage.micro_batch_size} x data-parallel size {dp_size} = {per_step} rows per "
            f"micro-step, sp_size {stage.sp_size}); use a multiple of {per_step} or another number of ranks")
    return rows // per_step


def stage_max_position_embeddings(stage: StageConfig, original_max: int) -> int:
    """The stage's ``max_position_embeddings``: its seq_len by default; for dynamic NTK the original
    length, because transformers scales the base only beyond ``max_position_embeddings``."""
    if stage.max_position_embeddings is not None:
        return stage.max_position_embeddings
    return original_max if stage.rope.get("type") == "dynamic" else stage.seq_len


@dataclass(frozen=True)
class ResolvedStage:
    """One stage as the trainer runs it (``config`` is the stage as written)."""

    index: int
    config: StageConfig
    rope_params: dict[str, Any]
    """transformers' ``rope_parameters`` form of ``config.rope`` (``longtrain.rope.rope_parameters``)."""
    max_position_embeddings: int
    dp_size: int
    layout: StepLayout
    steps: int

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def where(self) -> str:
        """The config key prefix of this stage, for messages."""
        return f"stages.{self.index}"

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def sp_size(self) -> int:
        return self.config.sp_size

    @property
    def sp_mode(self) -> str:
        return self.config.sp_mode

    @property
    def tokens_per_step(self) -> int:
        return self.layout.rows_per_step * self.config.seq_len

    # --- what the memory planner (longtrain/plan/) reads: one rank's share of a micro-batch
    @property
    def world_size(self) -> int:
        return self.dp_size * self.config.sp_size

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens of one flattened micro-batch (``micro_batch_size`` rows of ``seq_len``; batching.py)."""
        return self.config.micro_batch_size * self.config.seq_len

    @property
    def local_tokens(self) -> int:
        """Tokens each sequence-parallel rank holds of one micro-batch: padded to the SP multiple
        (``longtrain.parallel.sharding.padded_length``), then split ``sp_size`` ways."""
        return padded_length(self.micro_batch_tokens, self.sp_size, self.sp_mode) // self.sp_size

    def lr(self, step_in_stage: int) -> float:
        return learning_rate(self.config, step_in_stage, self.steps)

    def describe(self) -> str:
        sp = f"sp {self.sp_size}" + (f" ({self.sp_mode})" if self.sp_size > 1 else "")
        return (f"stage {self.index} '{self.name}': seq_len {self.seq_len}, rope {self.rope_params}, "
                f"{self.steps} steps x {self.layout.rows_per_step} rows, {sp}, dp {self.dp_size}, "
                f"lr {self.config.lr:g}")


def resolve_stage(cfg: RunConfig, index: int, world_size: int, facts: ModelFacts) -> ResolvedStage:
    stage, where = cfg.stages[index], f"stages.{index}"
    if world_size % stage.sp_size:
        raise ConfigError(f"{where}.sp_size ({stage.sp_size}) must divide the number of ranks ({world_size})")
    try:
        check_sp_for_model(facts.hf_config, stage.sp_size, stage.sp_mode)
    except ValueError as exc:
        raise ConfigError(f"{where}.sp_size / sp_mode: {exc}") from None
    try:
        rope = rope_parameters(stage.rope, original_max_position_embeddings=facts.original_max_position_embeddings)
    except ValueError as exc:
        raise ConfigError(f"{where}.rope: {exc}") from None
    dp_size = world_size // stage.sp_size
    layout = StepLayout(dp_size, stage.micro_batch_size, stage_grad_accum(stage, where, world_size))
    return ResolvedStage(index=index, config=stage, rope_params=rope,
                         max_position_embeddings=stage_max_position_embeddings(
                             stage, facts.original_max_position_embeddings),
                         dp_size=dp_size, layout=layout, steps=stage_steps(stage, layout.rows_per_step))


def resolve_stages(cfg: RunConfig, world_size: int, facts: ModelFacts) -> list[ResolvedStage]:
    """Every stage of ``cfg`` for ``world_size`` ranks; the first bad setting raises a ConfigError."""
    return [resolve_stage(cfg, i, world_size, facts) for i in range(len(cfg.stages))]
