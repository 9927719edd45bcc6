"""Where a run stands: global step, stage, step in stage, tokens, and a record of every stage begun.

Saved in every checkpoint (``longtrain_state.json``, docs/internals.md "Checkpoint layout") and
restored from it; export reads the stage records to know which RoPE the checkpoint's model has, and
a resumed run compares them with its own config (``longtrain/resume_rules.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longtrain.stages import ResolvedStage


def stage_setting(stage: ResolvedStage) -> dict[str, Any]:
    """The settings of a stage that its checkpointed record keeps: as written (``rope``, ``data``, ...)
    and as resolved (``rope_parameters``, ``steps``, ``global_batch_rows``) for the resume check.
    ``data`` is the dataset folder, for a mixture its first source's; ``sources`` lists a mixture's
    sources with their weights (None for a single dataset)."""
    cfg = stage.config
    sources = cfg.sources()
    mixture = [{"name": s.name, "path": s.path, "weight": s.weight} for s in sources] if isinstance(cfg.data, list) else None
    return {"name": cfg.name, "seq_len": cfg.seq_len, "rope": dict(cfg.rope), "sp_size": cfg.sp_size,
            "data": sources[0].path, "sources": mixture, "rope_parameters": dict(stage.rope_params),
            "max_position_embeddings": stage.max_position_embeddings, "steps": stage.steps,
            "global_batch_rows": stage.layout.rows_per_step, "dp_size": stage.dp_size,
            "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum, "sp_mode": cfg.sp_mode,
            "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "min_lr": cfg.min_lr, "decay": cfg.decay}


@dataclass
class Progress:
    global_step: int = 0
    stage_index: int = 0
    step_in_stage: int = 0
    tokens_seen: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        """The fields of ``longtrain_state.json`` that say where the run stands."""
        return {"global_step": self.global_step, "stage_index": self.stage_index,
                "step_in_stage": self.step_in_stage, "tokens_seen": self.tokens_seen, "stages": self.stages}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Progress":
        return cls(global_step=state["global_step"], stage_index=state["stage_index"],
                   step_in_stage=state["step_in_stage"], tokens_seen=state["tokens_seen"],
                   stages=list(state["stages"]))

    def begin_stage(self, stages: list[ResolvedStage], index: int) -> None:
        """Records for every stage up to ``index``; what a resumed run may change (``resume_rules``:
        sp_size, the micro-batch split, learning rates) updates the current one."""
        while len(self.stages) <= index:
            self.stages.append({**stage_setting(stages[len(self.stages)]), "steps_done": 0, "tokens": 0,
                                "tokens_by_source": {}})
        self.stages[index].update(stage_setting(stages[index]))

    def advance(self, tokens: int, tokens_by_source: dict[str, int] | None = None) -> None:
        """One optimizer step of the current stage trained ``tokens`` tokens (``tokens_by_source``: of each
        data source, cumulated in the stage record)."""
        self.global_step += 1
        self.step_in_stage += 1
        self.tokens_seen += tokens
        record = self.stages[self.stage_index]
        record["steps_done"] = self.step_in_stage
        record["tokens"] += tokens
        by_source = record.setdefault("tokens_by_source", {})  # absent in checkpoints from before mixtures
        for name, count in (tokens_by_source or {}).items():
            by_source[name] = by_source.get(name, 0) + count

    def next_stage(self) -> None:
        self.stage_index += 1
        self.step_in_stage = 0
