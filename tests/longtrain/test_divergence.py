"""The divergence guard (``longtrain/divergence.py``): what DeepSpeed 0.19.8 really does with a
non-finite gradient under every ZeRO stage and precision (a real engine, a real inf gradient), and the
guard's counting, stopping and spike rules. The end-to-end run (lr 1e4, exit code 3):
tests/longtrain/test_faults.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longtrain.divergence import DivergenceGuard
from tests.support import models
from tests.support.distributed import run_distributed

# (ZeRO stage, precision, extra DeepSpeed keys) -> (update applied, weights finite afterwards)
DEEPSPEED_CASES = {
    "zero0_fp32": (0, "fp32", {}, True),  # torch AdamW, no check: the NaN update is applied
    "zero0_bf16": (0, "bf16", {}, False),  # FP16_Optimizer in bf16 skips (BF16_Optimizer, ZeRO-1: alike, by its source)
    "zero2_fp32": (2, "fp32", {}, False),  # stage_1_and_2: an invalid norm is an overflow, skipped
    "zero2_bf16": (2, "bf16", {}, False),
    "zero2_bf16_unchecked": (2, "bf16", {"bf16": {"check_grad_overflow": False}}, True),
    "zero3_fp32": (3, "fp32", {}, False),
}


def _step_with_inf_gradient(rank, world, cases):
    """One engine per case: a backward of an infinite loss (every gradient inf or NaN), then the
    trainer's own ``TrainModule.optim_step``."""
    from deepspeed.utils import safe_get_full_fp32_param

    from longtrain.attention import register_attention
    from longtrain.batching import make_packed_batch
    from longtrain.config import config_from_dict
    from longtrain.ds_config import build_deepspeed_config
    from longtrain.engine import CausalLMLoss, build_engine
    from longtrain.model import load_model
    from longtrain.train_module import TrainModule

    rng = np.random.default_rng(0)
    batch = make_packed_batch([{"input_ids": rng.integers(4, 512, 64), "doc_lens": [40, 24],
                                "loss_mask": np.ones(64, dtype=np.uint8)}])
    stage = {"seq_len": 64, "rope": {"type": "default", "theta": 10000}, "data": "unused", "steps": 1, "lr": 1e-3}
    out = {}
    for name, (zero, precision, extra, _) in cases.items():
        cfg = config_from_dict({"model": {"config": models.tiny_model_config()}, "stages": [stage],
                                "train": {"zero_stage": zero, "precision": precision}, "deepspeed": extra})
        model = load_model(cfg.model)
        model.set_attn_implementation(register_attention())
        engine = build_engine(CausalLMLoss(model, 48), build_deepspeed_config(cfg, world, False), 0.1)
        module = TrainModule(engine, model, torch.device("cpu"), {})

        def weights():
            params = list(engine.module.parameters())
            full = [p if zero == 0 else safe_get_full_fp32_param(p) for p in params]
            return torch.cat([w.detach().float().flatten() for w in full])

        before = weights()
        loss = engine(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)
        engine.backward(loss * float("inf"))
        norm, applied = module.optim_step(1e-3)
        after = weights()
        out[name] = {"norm": repr(norm), "applied": applied, "unchanged": bool(torch.equal(before, after)),
                     "finite": bool(torch.isfinite(after).all())}
    return out


@pytest.mark.multiproc
def test_what_deepspeed_does_with_an_inf_gradient_and_that_the_guard_sees_it(tmp_path):
    (result,) = run_distributed(_step_with_inf_gradient, 1, tmp_path, DEEPSPEED_CASES)
    for name, (_, precision, _, applied) in DEEPSPEED_CASES.items():
        got = result[name]
        assert got["applied"] == applied, (name, got)
        norm = float(got["norm"]) if got["norm"] != "None" else None
        assert norm is not None and not math.isfinite(norm), (name, got)  # reported, or computed by TrainModule
        if applied:
            assert not got["finite"], (name, got)  # the NaN update went in
        else:
            assert got["unchanged"] and got["finite"], (name, got)  # skipped: the weights are as before
        guard = DivergenceGuard(max_nonfinite_steps=1, fp16=precision == "fp16")
        health = guard.observe(1, 6.2, norm, got["applied"])
        assert health.nonfinite and health.stop and health.update_skipped == (not applied), (name, health)


def test_consecutive_non_finite_steps_stop_the_run_and_a_finite_one_resets_the_count():
    guard = DivergenceGuard(max_nonfinite_steps=3)
    assert not guard.observe(1, 6.0, 1.2, True).flagged
    first = guard.observe(2, 6.0, float("inf"), False)
    assert first.nonfinite and first.update_skipped and first.streak == 1 and first.stop is None
    assert not guard.healthy
    assert guard.observe(3, float("nan"), float("nan"), True).streak == 2
    assert guard.observe(4, 5.9, 1.1, True).streak == 0 and guard.healthy  # recovered: counting restarts
    for step in (5, 6):
        assert guard.observe(step, 6.0, float("inf"), False).stop is None
    stop = guard.observe(7, 6.0, float("inf"), False).stop
    assert stop == ("3 consecutive non-finite steps (steps 5-7; train.max_nonfinite_steps is 3; this step: loss 6, "
                    "grad_norm inf, update skipped by DeepSpeed)")
    assert guard.total_nonfinite == 5


def test_zero_max_nonfinite_steps_counts_but_never_stops():
    guard = DivergenceGuard(max_nonfinite_steps=0)
    health = [guard.observe(step, float("nan"), None, True) for step in range(1, 50)]
    assert all(h.nonfinite and h.stop is None for h in health) and health[-1].streak == 49


def test_fp16_loss_scale_overflow_with_a_finite_loss_is_not_divergence():
    guard = DivergenceGuard(max_nonfinite_steps=1, fp16=True)
    skipped = guard.observe(1, 6.0, float("inf"), False)
    assert skipped.update_skipped and skipped.flagged and not skipped.nonfinite and skipped.stop is None
    assert guard.observe(2, float("inf"), float("inf"), False).stop  # a non-finite loss still is


def test_loss_spikes_over_the_recent_median_are_logged_and_optionally_stop():
    guard = DivergenceGuard(max_nonfinite_steps=3, spike_factor=2.0, spike_window=10)
    for step, loss in enumerate([3.0, 2.9, 2.8, 2.7], 1):
        assert guard.observe(step, loss * 3, 1.0, True).spike_ratio is None  # fewer than 5: no median yet
    guard.begin_stage()  # a new stage: its own loss level
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.2], 5):
        assert guard.observe(step, loss, 1.0, True).spike_ratio is None
    spike = guard.observe(10, 5.0, 1.0, True)
    assert spike.spike_ratio == pytest.approx(2.5) and spike.flagged and spike.stop is None
    assert guard.observe(11, 4.1, 1.0, True).spike_ratio is not None  # the spike did not raise the median
    stopping = DivergenceGuard(max_nonfinite_steps=3, spike_factor=2.0, stop_on_spike=True)
    for step in range(1, 6):
        stopping.observe(step, 2.0, 1.0, True)
    assert stopping.observe(6, 4.5, 1.0, True).stop == (
        "loss spike: loss 4.5 is 2.25x the median 2 of the stage's last 5 losses (train.loss_spike_factor 2, "
        "train.stop_on_loss_spike true)")
