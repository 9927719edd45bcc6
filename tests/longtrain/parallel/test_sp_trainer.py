"""Sequence parallelism through the real trainer and DeepSpeed (gloo, fp32, CPU).

- The first step's loss and every parameter's gradient with SP=2 (Ulysses and ring; ZeRO-2 and
  ZeRO-3) equal one process on the same global batch, on packed rows whose documents cross the
  slice boundaries, including a row on which one SP rank has no target at all.
- A run whose stages change ``sp_size`` (1 -> 2) reproduces the single-process reference run's
  losses, also when stopped and resumed right after the change.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.integrity import record_files
from longtrain.batching import make_packed_batch
from longtrain.data import PreparedDataset
from longtrain.parallel import ParallelState, shard_batch
from tests.support import env, models, runs

pytestmark = [pytest.mark.multiproc]
PROBE = Path(__file__).with_name("sp_grad_probe.py")
COMBOS = ["2:ulysses:2", "2:ring:3", "2:ulysses:3", "2:ring:2"]


def _crafted_dataset(dest: Path, source: Path) -> Path:
    """Two 128-token rows built from real packed 64-token rows (documents cross every slice boundary):
    a plain row, and one whose targets are all in its first quarter, so that SP rank 1 has none
    in both Ulysses (positions 64..127) and zigzag ring (chunks 1 and 2: positions 32..95) layouts."""
    import datasets

    src = PreparedDataset(source)
    pairs = [src.rows([2 * i, 2 * i + 1]) for i in range(2)]
    rows = []
    for n, (a, b) in enumerate(pairs):
        row = {k: np.concatenate([a[k], b[k]]) for k in ("input_ids", "doc_lens", "loss_mask")}
        if n == 1:
            row["loss_mask"][32:] = 0
        rows.append(row)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "doc_lens": datasets.Sequence(datasets.Value("int32")),
                                  "loss_mask": datasets.Sequence(datasets.Value("uint8"))})
    table = datasets.Dataset.from_dict({k: [r[k].tolist() for r in rows] for k in features}, features=features)
    table.save_to_disk(str(dest / "train"))
    meta = json.loads((source / "meta.json").read_text())
    meta["seq_len"] = 128
    meta["files"] = record_files(dest, ["train"])  # these files, not the source's (checked on open)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


@pytest.fixture(scope="module")
def probe_config(tmp_path_factory, stdlib_tokenizer, stdlib_datasets) -> Path:
    root = tmp_path_factory.mktemp("sp_probe")
    data = _crafted_dataset(root / "data", stdlib_datasets[64])
    stage = {"name": "sp", "seq_len": 128, "rope": {"type": "default", "theta": 10000}, "data": str(data),
             "steps": 1, "lr": 1e-3, "micro_batch_size": 1, "grad_accum": 2}
    model = {"config": models.tiny_model_config(max_position_embeddings=128), "tokenizer": str(stdlib_tokenizer)}
    return runs.write_config(root / "run.yaml", [stage], model, {"loss_chunk_tokens": 40})


def test_crafted_rows_cross_slices_and_starve_a_rank(probe_config):
    """Guard: the probe's data really exercises boundary-crossing documents and a target-less rank."""
    import yaml

    data = yaml.safe_load(probe_config.read_text())["stages"][0]["data"]
    rows = PreparedDataset(data).rows([0, 1])
    starts = np.cumsum([0] + list(rows[0]["doc_lens"]))
    crossing = [b for b in (32, 64, 96) if not np.isin(b, starts)]
    assert crossing, "no document crosses a slice boundary"
    for mode in ("ulysses", "ring"):
        full = make_packed_batch([rows[1]])
        starved = shard_batch(full, ParallelState(2, 1, 2), mode)
        assert starved.num_targets == 0 and full.num_targets > 0, mode


@pytest.mark.slow
def test_sp2_loss_and_every_gradient_equal_one_process(tmp_path, probe_config):
    single = runs.check(runs.run([sys.executable, str(PROBE), str(probe_config), str(tmp_path), "1:ulysses:2"],
                                 log=tmp_path / "single.log", **env.single_rank_vars()))
    assert single.returncode == 0
    cmd = [str(runs.BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(env.free_port()), str(PROBE), str(probe_config), str(tmp_path), *COMBOS]
    runs.check(runs.run(cmd, log=tmp_path / "sp.log"))
    ref = torch.load(tmp_path / "1_ulysses_z2.pt")
    assert ref["targets"] > 0 and all(g is not None for g in ref["grads"].values())
    for combo in COMBOS:
        sp, mode, zero = combo.split(":")
        got = torch.load(tmp_path / f"{sp}_{mode}_z{zero}.pt")
        assert got["targets"] == ref["targets"], combo
        assert abs(got["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (combo, got["loss"], ref["loss"])
        assert got["grads"].keys() == ref["grads"].keys()
        for name, want in ref["grads"].items():
            have = got["grads"][name]
            rel = float((have - want).norm() / want.norm().clamp_min(1e-30))
            assert rel <= 1e-5, f"{combo} {name}: relative gradient error {rel:.2e}"
    shutil.rmtree(tmp_path / "run_1_ulysses_z2", ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode, zero", [("ulysses", 2), ("ring", 3)])
def test_stages_changing_sp_size_match_reference_and_resume_exactly(tmp_path, mode, zero, baseline_run,
                                                                     stdlib_tokenizer, stdlib_datasets):
    """Two ranks: stage 1 data parallel (sp 1, dp 2), stage 2 sequence parallel (sp 2, dp 1), with the
    reference run's global batches. The Ulysses run is stopped after step 5 (one step after the sp
    change) and resumed; both must reproduce the single-process losses (fp32, <= 1e-5)."""
    stages = runs.two_stage_recipe(stdlib_datasets, s0__grad_accum=1, s1__sp_size=2, s1__sp_mode=mode)
    config = runs.write_config(tmp_path / "run.yaml", stages,
                               {"config": models.tiny_model_config(), "tokenizer": str(stdlib_tokenizer)},
                               {"zero_stage": zero})
    run_dir = tmp_path / "run"
    launch = runs.torchrun_cmd(2, env.free_port())
    if mode == "ulysses":
        runs.check(runs.run(launch + runs.train_args(config, run_dir, "--set", "train.stop_after_steps=5"),
                            log=tmp_path / "part1.log"))
        assert [r["step"] for r in runs.metrics(run_dir)] == [1, 2, 3, 4, 5]
        launch = runs.torchrun_cmd(2, env.free_port())
        resumed = runs.check(runs.run(launch + runs.train_args(config, run_dir, "--resume", "auto"),
                                      log=tmp_path / "part2.log"))
        assert "step_00000005" in resumed.stdout
    else:
        runs.check(runs.run(launch + runs.train_args(config, run_dir), log=tmp_path / "log.txt"))
    records = runs.metrics(run_dir)
    assert [r["sp_size"] for r in records] == [1] * 4 + [2] * 4
    want = runs.losses(baseline_run)
    for step, (a, b) in enumerate(zip([r["loss"] for r in records], want), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: {a} vs {b}"
    assert len(records) == len(want) == 8
    assert runs.rows_per_step(run_dir) == runs.rows_per_step(baseline_run)
