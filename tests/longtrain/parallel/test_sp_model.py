"""Model level, real gloo ranks: a tiny random HF model with SP=2 and SP=4 vs one process.

Same packed batch of real text (documents crossing slice boundaries, T not divisible by the
shard multiple, SP rank 0 with no target at all). Each rank runs the single-process
reference itself, then its slice with ``shard_batch`` + ``parallelize_attention`` +
``chunked_lm_loss_sum``; loss sums and gradients summed over the SP group must match
(loss <= 1e-6 relative, every parameter's gradient <= 1e-5 relative). One model per
architecture is re-parallelized case after case, as the trainer does at stage starts.
"""
from __future__ import annotations

import pytest

import longtrain.attention  # noqa: F401  (imported once here; the forked ranks inherit it)
import transformers  # noqa: F401
from tests.support.text import real_rows
from tests.support.distributed import run_distributed
from tests.longtrain.parallel._workers import model_worker

pytestmark = pytest.mark.multiproc
LOSS_TOL, GRAD_TOL = 1e-6, 1e-5


def _case(arch, heads, kv, sp, mode, **extra):
    name = f"{arch}-h{heads}-kv{kv}-sp{sp}-{mode}" + "".join(f"-{k}" for k in extra)
    return dict(name=name, arch=arch, heads=heads, kv_heads=kv, sp=sp, mode=mode, **extra)


CASES = {
    2: [
        _case("llama", 4, 4, 2, "ulysses", checkpointing=True),
        _case("llama", 4, 4, 2, "ring", checkpointing=True),
        _case("llama", 4, 1, 2, "ulysses"),  # kv_heads < sp: kv repeated
        _case("llama", 4, 1, 2, "ring"),
        _case("qwen2", 6, 3, 2, "ulysses"),  # odd kv head count: repeated to 6
        _case("qwen2", 6, 3, 2, "ring"),
        _case("llama", 3, 3, 2, "ring"),  # odd head count: only ring can split it
        _case("llama", 3, 3, 2, "ulysses"),  # -> refused, naming the allowed degrees
        _case("mistral", 4, 2, 2, "ulysses", sliding_window=24),  # window passes through Ulysses
        _case("mistral", 4, 2, 2, "ring", sliding_window=24),  # -> refused by ring
    ],
    4: [
        _case("llama", 8, 2, 4, "ulysses"),  # kv 2 < sp 4: repeated twice
        _case("llama", 8, 2, 4, "ring", checkpointing=True),
        _case("llama", 8, 2, 2, "ring"),  # sp 2 x dp 2 in a world of 4
        _case("llama", 8, 2, 2, "ulysses"),
        _case("llama", 3, 3, 4, "ring"),
        _case("llama", 6, 6, 4, "ulysses"),  # -> refused: 6 heads allow 1, 2, 3, 6
    ],
}
REFUSED = {
    "llama-h3-kv3-sp2-ulysses": r"sp_size=2 does not divide num_attention_heads=3.*\[1, 3\]",
    "mistral-h4-kv2-sp2-ring-sliding_window": "does not implement sliding windows",
    "llama-h6-kv6-sp4-ulysses": r"sp_size in \[1, 2, 3, 6\]",
}


@pytest.fixture(scope="module")
def rows():
    return real_rows(41, 3)  # T = 123: odd, so every layout pads (to 124 or 128)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def model_results(request, rows, tmp_path_factory):
    world = request.param
    return world, run_distributed(model_worker, world, tmp_path_factory.mktemp(f"model{world}"), CASES[world], rows)


def test_sp_matches_single_process(model_results):
    import re

    world, results = model_results
    for rank, per_case in enumerate(results):
        for case in CASES[world]:
            res, name = per_case[case["name"]], case["name"]
            if name in REFUSED:
                assert re.search(REFUSED[name], res.get("error", "")), (name, res)
                continue
            assert "error" not in res, (rank, name, res)
            assert res["attention"] == f"longtrain_{case['mode']}"
            assert res["finite"] and res["padded"] > 0
            assert res["params_with_grad"] == res["params"], "guard: every parameter gets a gradient"
            assert res["loss_rel"] <= LOSS_TOL, (rank, name, res["loss"], res["ref_loss"])
            assert res["grad_rel"] <= GRAD_TOL, (rank, name, res["grad_rel"])
            if rank % case["sp"] == 0:  # a rank without targets contributes exactly 0, and no NaN
                assert res["local_targets"] == 0 and res["local_loss"] == 0.0, (rank, name, res)
            else:
                assert res["local_targets"] > 0


def test_targets_are_partitioned(model_results):
    """Local target counts add up to the batch's count in every SP group (nothing lost at slice ends)."""
    world, results = model_results
    for case in CASES[world]:
        if case["name"] in REFUSED:
            continue
        sp = case["sp"]
        for first in range(0, world, sp):
            group = [results[r][case["name"]] for r in range(first, first + sp)]
            assert sum(g["local_targets"] for g in group) == group[0]["targets"] > 0
