"""Resolved stages: every per-stage number of a run from the config, the world size and config.json alone
(no DeepSpeed, no process group, no dataset read)."""
from __future__ import annotations

import math

import pytest

from longtrain.config import ConfigError, config_from_dict
from longtrain.model import load_model_config
from longtrain.stages import ModelFacts, resolve_stages
from tests.support import models


def _cfg(**stage1):
    stages = [
        {"name": "short", "seq_len": 128, "rope": {"type": "default", "theta": 10000}, "data": "d128", "lr": 1e-3,
         "steps": 5, "warmup_steps": 2, "micro_batch_size": 2, "grad_accum": 2},
        {"name": "long", "seq_len": 512, "rope": {"type": "yarn", "theta": 1e6, "factor": 4}, "data": "d512",
         "lr": 5e-4, "min_lr": 5e-5, "tokens": 100000, "sp_size": 2, **stage1},
    ]
    return config_from_dict({"model": {"config": models.tiny_model_config(max_position_embeddings=128)},
                             "stages": stages})


def _facts(cfg):
    return ModelFacts.from_config(load_model_config(cfg.model))


def test_every_per_stage_number_is_resolved_once():
    cfg = _cfg()
    short, long = resolve_stages(cfg, 4, _facts(cfg))
    assert (short.index, short.name, short.where, short.dp_size, short.steps) == (0, "short", "stages.0", 4, 5)
    assert short.layout.rows_per_step == 4 * 2 * 2 and short.tokens_per_step == 16 * 128
    assert short.rope_params == {"rope_type": "default", "rope_theta": 10000.0}
    assert short.max_position_embeddings == 128
    # sp 2 on 4 ranks: data-parallel degree 2; a token budget becomes whole steps, rounded up
    assert long.dp_size == 2 and long.layout.rows_per_step == 2
    assert long.steps == math.ceil(100000 / (2 * 512)) == 98
    # yarn is relative to the pretraining length, read from the model's config
    assert long.rope_params == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                "original_max_position_embeddings": 128}
    assert long.max_position_embeddings == 512
    assert [short.lr(i) for i in range(5)] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 0.0])
    assert long.lr(0) == pytest.approx(5e-4) and long.lr(long.steps - 1) == pytest.approx(5e-5)
    assert "sp 2 (ulysses), dp 2" in long.describe()


def test_dynamic_ntk_keeps_the_pretraining_length():
    cfg = _cfg(rope={"type": "dynamic", "theta": 10000, "factor": 4})
    assert resolve_stages(cfg, 2, _facts(cfg))[1].max_position_embeddings == 128


@pytest.mark.parametrize("world, over, message", [
    (3, {}, r"stages.1.sp_size \(2\) must divide the number of ranks \(3\)"),
    (8, {"sp_size": 8}, r"stages.1.sp_size / sp_mode: .*8"),  # 4 heads cannot split 8 ways (Ulysses)
    (2, {"rope": {"type": "yarn", "theta": 1e6}}, r"stages.1.rope: .*factor"),
])
def test_refusals_name_the_stage_key(world, over, message):
    cfg = _cfg(**over)
    with pytest.raises(ConfigError, match=message):
        resolve_stages(cfg, world, _facts(cfg))


def test_ring_allows_degrees_beyond_the_head_count():
    cfg = _cfg(sp_size=8, sp_mode="ring")
    assert resolve_stages(cfg, 8, _facts(cfg))[1].dp_size == 1
