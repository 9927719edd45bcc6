"""What may change when a run resumes, in one place (docs/training.md, "What may change on resume").

A checkpoint keeps a record of every stage begun (``longtrain/progress.py``: the stage as written and
as resolved). At resume, each started stage's record is compared with the same stage of the current
config, resolved for the current world size. The rules:

- A started stage (finished, or the one the checkpoint is in) keeps what decides which rows it
  trains on, with which positions and schedule: ``FIXED`` below. Changing one is refused (exit 2) with
  the key, the old and the new value.
- It may change how its steps are computed, and its learning rate from the resumed step on:
  ``MAY_CHANGE`` (a note is printed for each change).
- Stages not begun yet, stages added at the end, and everything in ``train`` but ``train.seed``
  (logging, checkpoint cadence, the divergence guard, ...) may change freely.
"""
from __future__ import annotations

from typing import Any

from longtrain.config import ConfigError, RunConfig
from longtrain.progress import stage_setting
from longtrain.stages import ResolvedStage

FIXED: dict[str, str] = {
    "name": "records are matched to stages by position: a new name means a stage was inserted, removed or moved",
    "seq_len": "the stage's rows and positions",
    "rope": "the RoPE the model was trained with in this stage",
    "max_position_embeddings": "the RoPE scaling of this stage",
    "data": "the stage's row order is a permutation of this dataset",
    "sources": "a mixture's row order follows its sources and their weights (longtrain/data.py, MixtureOrder)",
    "steps": "the stage's learning-rate schedule and where it ends",
    "global_batch_rows": "step s of the stage reads its rows [s * R, (s + 1) * R)",
}
"""Settings of a started stage that a resumed run must keep, and why."""

MAY_CHANGE: dict[str, str] = {
    "sp_size": "sequence parallelism computes the same loss (tested across a change of sp_size)",
    "sp_mode": "Ulysses and ring attention are exact",
    "micro_batch_size": "the same global rows per step, split differently",
    "grad_accum": "the same global rows per step, split differently",
    "dp_size": "with the global batch unchanged",
    "lr": "applies from the resumed step on",
    "warmup_steps": "applies from the resumed step on",
    "min_lr": "applies from the resumed step on",
    "decay": "applies from the resumed step on",
}
"""Settings of a started stage that may change on resume (a note says so)."""

FIXED_TRAIN: dict[str, str] = {"seed": "the row order of every stage depends on it"}


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e6`` as a string; compare numbers as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _same(key: str, old: Any, new: Any) -> bool:
    if isinstance(old, dict) and isinstance(new, dict):
        return ({k: _number(v) for k, v in old.items() if v is not None}
                == {k: _number(v) for k, v in new.items() if v is not None})
    return _number(old) == _number(new)


def _batch_text(record: dict[str, Any]) -> str:
    parts = [record.get(k) for k in ("dp_size", "micro_batch_size", "grad_accum")]
    shape = f" (dp_size {parts[0]} x micro_batch_size {parts[1]} x grad_accum {parts[2]})" if all(parts) else ""
    return f"{record['global_batch_rows']} rows{shape}"


def _stage_problems(index: int, old: dict[str, Any], new: dict[str, Any], notes: list[str]) -> list[str]:
    problems = []
    where = f"stages.{index}"
    for key in FIXED:
        if key == "rope":
            # the resolved form when both records have it (the written form may differ in spelling only)
            rope_key = "rope_parameters" if "rope_parameters" in old else "rope"
            if not _same(key, old.get(rope_key), new[rope_key]):
                problems.append(f"{where}.rope: {old.get('rope')} in the checkpoint, {new['rope']} now")
        elif key not in old:
            continue  # a record written before this key was kept
        elif key == "global_batch_rows" and not _same(key, old[key], new[key]):
            problems.append(f"{where} global batch (rows per optimizer step): {_batch_text(old)} in the checkpoint, "
                            f"{_batch_text(new)} now")
        elif key != "global_batch_rows" and not _same(key, old[key], new[key]):
            problems.append(f"{where}.{key}: {old[key]!r} in the checkpoint, {new[key]!r} now")
    for key in MAY_CHANGE:
        if key in old and not _same(key, old[key], new[key]):
            notes.append(f"{where}.{key}: {old[key]!r} in the checkpoint, {new[key]!r} now ({MAY_CHANGE[key]})")
    return problems


def check_resume(state: dict[str, Any], stages: list[ResolvedStage], cfg: RunConfig, tag_dir: Any) -> list[str]:
    """Compare a checkpoint's state with the current config. Returns notes on allowed changes; raises
    ``ConfigError`` naming every refused one (``stages.N.key``, old and new value)."""
    records = state.get("stages") or []
    reached = int(state.get("stage_index", 0))
    if records and reached >= len(stages):
        raise ConfigError(f"{tag_dir}: reached stage {reached} but the config has {len(stages)} stages "
                          f"(started stages cannot be removed)")
    notes: list[str] = []
    problems: list[str] = []
    for index, old in enumerate(records[: reached + 1]):
        problems += _stage_problems(index, old, stage_setting(stages[index]), notes)
    then = (state.get("config") or {}).get("train") or {}
    for key, why in FIXED_TRAIN.items():
        if key in then and then[key] != getattr(cfg.train, key):
            problems.append(f"train.{key}: {then[key]!r} in the checkpoint, {getattr(cfg.train, key)!r} now ({why})")
    if records and "steps" not in records[0]:
        notes.append(f"{tag_dir}: its stage records predate longtrain's resume check: steps and the global batch "
                     f"of started stages are not compared")
    if problems:
        raise ConfigError(f"cannot resume from {tag_dir} with this config: {'; '.join(problems)}. A started stage "
                          f"keeps its {', '.join(FIXED).replace('global_batch_rows', 'global batch')} (docs/training.md, "
                          f"'What may change on resume'); restore "
                          f"them or start a new run folder")
    return notes
