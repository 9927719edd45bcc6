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


# ------------------------------------------------------------------------------------ a world-size-independent batch


def _global(**stage1):
    """Stage 0 with 8 rows per step, stage 1 (512 tokens, a token budget) with 4096 tokens = 8 rows per step."""
    return _cfg(**{"global_batch_tokens": 8 * 512, **stage1})


@pytest.mark.parametrize("world, sp, accum", [(1, 1, 8), (2, 1, 4), (4, 1, 2), (8, 1, 1), (4, 2, 4), (8, 2, 2)])
def test_global_batch_gives_the_same_steps_schedule_and_rows_on_any_world(world, sp, accum):
    cfg = _global(sp_size=sp)
    cfg.stages[0].grad_accum, cfg.stages[0].global_batch_rows, cfg.stages[0].micro_batch_size = 1, 8, 1
    short, long = resolve_stages(cfg, world, _facts(cfg))
    assert short.layout.grad_accum == 8 // world  # stage 0 has no sequence parallelism: dp = world
    assert long.dp_size == world // sp and long.layout.grad_accum == accum
    for stage in (short, long):
        assert stage.layout.rows_per_step == 8
    assert long.steps == math.ceil(100000 / (8 * 512)) == 25  # a token budget: the same step count everywhere
    assert [long.lr(i) for i in range(long.steps)] == [resolve_stages(cfg, 8, _facts(cfg))[1].lr(i)
                                                        for i in range(long.steps)]
    # Optimizer step k reads the stage positions [8k, 8k + 8) however they are split over ranks.
    for k in (0, 3):
        got = sorted(p for dp_rank in range(long.dp_size) for micro in long.layout.positions(k, dp_rank)
                     for p in micro)
        assert got == list(range(8 * k, 8 * k + 8))


def test_global_batch_rows_that_do_not_split_name_the_stage_and_the_numbers():
    cfg = _global(sp_size=1)
    with pytest.raises(ConfigError, match=r"stages.1.global_batch_tokens: 8 rows per step do not split into whole "
                                          r"micro-batches on 16 ranks .*data-parallel size 16.*multiple of 16"):
        resolve_stages(cfg, 16, _facts(cfg))


@pytest.mark.parametrize("stage1, message", [
    ({"global_batch_rows": 8, "grad_accum": 2}, r"give stages.1.grad_accum \(2\) or stages.1.global_batch_rows, not"),
    ({"global_batch_rows": 8, "global_batch_tokens": 4096}, r"at most one of stages.1.global_batch_rows or"),
    ({"global_batch_tokens": 1000}, r"stages.1.global_batch_tokens \(1000\) must be a multiple of stages.1.seq_len"),
    ({"global_batch_rows": 6, "micro_batch_size": 4}, r"stages.1.global_batch_rows \(6\) must be a multiple of "
                                                      r"stages.1.micro_batch_size \(4\)"),
    ({"global_batch_tokens": 3 * 512, "micro_batch_size": 2}, r"stages.1.global_batch_tokens \(1536 = 3 rows of "
                                                              r"512\) must be a multiple of stages.1.micro_batch_size"),
    ({"global_batch_rows": 0}, r"stages.1.global_batch_rows must be > 0"),
])
def test_global_batch_keys_are_validated(stage1, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**stage1)


def test_existing_grad_accum_configs_resolve_as_before():
    cfg = _cfg()
    short, long = resolve_stages(cfg, 4, _facts(cfg))
    assert (short.layout.grad_accum, short.layout.rows_per_step) == (2, 16)   # dp 4 x micro 2 x accum 2
    assert (long.layout.grad_accum, long.layout.rows_per_step) == (1, 2)      # grows with the world size
    assert resolve_stages(cfg, 8, _facts(cfg))[0].layout.rows_per_step == 32
