"""What may change on resume (``longtrain/resume_rules.py``): one test per rule, on the stage records
a real run writes (``Progress.begin_stage``) and stages resolved as the trainer resolves them."""
from __future__ import annotations

import pytest

from longtrain.config import ConfigError, config_from_dict
from longtrain.progress import Progress
from longtrain.resume_rules import FIXED, MAY_CHANGE, check_resume
from longtrain.stages import ModelFacts, resolve_stages
from tests.support import models


def _raw(**train):
    stages = [
        {"name": "short", "seq_len": 64, "rope": {"type": "default", "theta": 10000}, "data": "/data/d64",
         "steps": 4, "lr": 2e-3, "warmup_steps": 1, "micro_batch_size": 2, "grad_accum": 2},
        {"name": "long", "seq_len": 128, "rope": {"type": "default", "theta": 1000000}, "data": "/data/d128",
         "steps": 4, "lr": 1e-3, "micro_batch_size": 1, "grad_accum": 2},
        {"name": "longer", "seq_len": 256, "rope": {"type": "yarn", "theta": 1000000, "factor": 2}, "data": "/data/d256",
         "steps": 4, "lr": 1e-3},
    ]
    return {"model": {"config": models.tiny_model_config(num_attention_heads=4, num_key_value_heads=2)},
            "stages": stages, "train": {"seed": 1, **train}}


def _resolved(raw, world=2):
    cfg = config_from_dict(raw)
    return cfg, resolve_stages(cfg, world, ModelFacts.from_config(models.tiny_config()))


def _checkpoint_in_stage_1(world=2):
    """The state a checkpoint written in stage 1 (stage 0 finished) holds."""
    cfg, stages = _resolved(_raw(), world)
    progress = Progress()
    for index in (0, 1):
        progress.begin_stage(stages, index)
        progress.stage_index = index
    return {**progress.to_state(), "config": cfg.to_dict()}


def _check(edit, world=2):
    raw = _raw()
    edit(raw)
    cfg, stages = _resolved(raw, world)
    return check_resume(_checkpoint_in_stage_1(), stages, cfg, "CKPT")


def _refused(edit, world=2) -> str:
    with pytest.raises(ConfigError) as info:
        _check(edit, world)
    return str(info.value)


def _set(stage, key, value):
    def edit(raw):
        raw["stages"][stage][key] = value
    return edit


def test_an_unchanged_config_resumes_without_notes():
    assert _check(lambda raw: None) == []


@pytest.mark.parametrize("stage", [0, 1])  # finished and current
@pytest.mark.parametrize("key, value, old_text, new_text", [
    ("seq_len", 32, "in the checkpoint", "32 now"),
    ("data", "/data/elsewhere", "'/data/d", "'/data/elsewhere'"),
    ("steps", 6, "4", "6"),
    ("name", "renamed", "in the checkpoint", "'renamed' now"),
    ("max_position_embeddings", 4096, "in the checkpoint", "4096 now"),
])
def test_a_started_stage_keeps_its_fixed_settings(stage, key, value, old_text, new_text):
    message = _refused(_set(stage, key, value))
    assert f"stages.{stage}.{key}: " in message and old_text in message and new_text in message
    assert message.startswith("cannot resume from CKPT with this config")


@pytest.mark.parametrize("stage", [0, 1])
def test_a_started_stage_keeps_its_rope(stage):
    message = _refused(_set(stage, "rope", {"type": "linear", "theta": 10000, "factor": 2}))
    assert f"stages.{stage}.rope: {{'type': 'default'" in message and "'type': 'linear'" in message


def test_the_same_rope_written_differently_is_the_same():
    # The resolved RoPE is what counts: an int or a float base, keys in any order.
    assert _check(_set(1, "rope", {"theta": 1.0e6, "type": "default"})) == []


def test_tokens_instead_of_steps_is_compared_as_resolved_steps():
    def tokens(raw):
        raw["stages"][1].pop("steps")
        raw["stages"][1]["tokens"] = 4 * 2 * 2 * 128  # 4 steps of dp 2 x 1 x 2 rows of 128: the same steps
    assert _check(tokens) == []
    def more(raw):
        raw["stages"][1].pop("steps")
        raw["stages"][1]["tokens"] = 10 * 4 * 128
    assert "stages.1.steps: 4 in the checkpoint, 10 now" in _refused(more)


def test_the_global_batch_is_fixed_but_its_split_may_change():
    message = _refused(_set(0, "micro_batch_size", 4))
    assert ("stages.0 global batch (rows per optimizer step): 8 rows (dp_size 2 x micro_batch_size 2 x grad_accum 2) "
            "in the checkpoint, 16 rows (dp_size 2 x micro_batch_size 4 x grad_accum 2) now") in message

    def split(raw):
        raw["stages"][0].update(micro_batch_size=4, grad_accum=1)
    notes = _check(split)
    assert any(n.startswith("stages.0.micro_batch_size: 2 in the checkpoint, 4 now") for n in notes)
    assert any(n.startswith("stages.0.grad_accum: 2 in the checkpoint, 1 now") for n in notes)


def test_a_different_world_size_with_the_same_global_batch_is_allowed():
    """Issue 11's case: 4 ranks instead of 2, the accumulation halved: the same rows per step."""
    def half(raw):
        raw["stages"][0]["grad_accum"] = 1
        raw["stages"][1]["grad_accum"] = 1
    notes = _check(half, world=4)
    assert any(n.startswith("stages.0.dp_size: 2 in the checkpoint, 4 now") for n in notes)


def test_sp_size_and_learning_rates_may_change_with_a_note():
    def edit(raw):
        raw["stages"][1].update(sp_size=2, sp_mode="ring", lr=5e-4, warmup_steps=2, min_lr=1e-5, decay="linear")
        raw["stages"][1]["grad_accum"] = 4  # dp 1 now: the same 2 rows x 2 global rows as before
    notes = _check(edit)
    for key in ("sp_size", "sp_mode", "lr", "warmup_steps", "min_lr", "decay"):
        assert any(n.startswith(f"stages.1.{key}: ") and MAY_CHANGE[key] in n for n in notes), key


def test_stages_not_started_may_change_or_be_added():
    def edit(raw):
        raw["stages"][2].update(seq_len=512, steps=40, data="/data/d512", rope={"type": "default", "theta": 5e6})
        raw["stages"].append(dict(raw["stages"][2], name="longest"))
    assert _check(edit) == []


def test_started_stages_cannot_be_removed():
    def edit(raw):
        del raw["stages"][1:]
    assert "reached stage 1 but the config has 1 stages" in _refused(edit)


def test_train_seed_is_fixed_and_the_rest_of_train_may_change():
    def seed(raw):
        raw["train"]["seed"] = 2
    assert "train.seed: 1 in the checkpoint, 2 now (the row order of every stage depends on it)" in _refused(seed)

    def cadence(raw):
        raw["train"].update(checkpoint_every=7, keep_checkpoints=1, log_every=5, max_nonfinite_steps=10,
                            zero_stage=3)
    assert _check(cadence) == []


def test_every_refused_change_is_named_at_once():
    def edit(raw):
        raw["stages"][0]["seq_len"] = 32
        raw["stages"][1]["data"] = "/data/other"
    message = _refused(edit)
    assert "stages.0.seq_len" in message and "stages.1.data" in message
    kept = message.split("A started stage keeps its ")[1]
    assert all(key.replace("global_batch_rows", "global batch") in kept for key in FIXED)


def test_records_written_before_the_resume_check_are_compared_where_they_can_be():
    """Checkpoints of earlier versions: stage records with name, seq_len, rope, sp_size, data only."""
    state = _checkpoint_in_stage_1()
    old_keys = ("name", "seq_len", "rope", "sp_size", "data", "steps_done", "tokens")
    state["stages"] = [{k: v for k, v in record.items() if k in old_keys} for record in state["stages"]]
    cfg, stages = _resolved(_raw())
    notes = check_resume(state, stages, cfg, "CKPT")
    assert notes == ["CKPT: its stage records predate longtrain's resume check: steps and the global batch of "
                     "started stages are not compared"]
    raw = _raw()
    raw["stages"][0]["seq_len"] = 32
    cfg, stages = _resolved(raw)
    with pytest.raises(ConfigError, match="stages.0.seq_len: 64 in the checkpoint, 32 now"):
        check_resume(state, stages, cfg, "CKPT")
