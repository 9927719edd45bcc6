"""Train-time data mixtures: a stage's ``data`` as ``[{path, weight}, ...]``.

The order (longtrain/data.py, MixtureOrder) is tested as a pure function over realistic stage
lengths: per-source shares within one row of the weights at every step, each source on its own
epochs, a single dataset bitwise its old order. Then for real: a two-source run whose rows, metrics
and checkpointed stage record carry the shares and tokens per source, interrupted and resumed
inside the mixed stage with losses equal bitwise.
"""
from __future__ import annotations

import json
import shutil
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from longtrain import checkpoint
from longtrain.config import ConfigError, config_from_dict
from longtrain.data import (MixtureOrder, StageOrder, StepLayout, mixture_quotas, open_stage_datasets,
                            verify_stage_datasets)
from data_prep.integrity import DamagedDatasetError
from tests.support import models, runs, wandb_files

# (weights, as a config would write them): ProLong's 64k mix, Qwen2.5-1M-like synthetic share, uneven ones
WEIGHTS = [(30, 30, 40), (30, 30, 3, 37), (97, 3), (1, 1), (0.123, 0.877), (1 / 3, 1 / 3, 1 / 3), (0.7, 0.2, 0.06, 0.04),
           (0.1234567, 0.8765433)]


def _shares(order: MixtureOrder, n: int) -> np.ndarray:
    return order.rows_before(n) / n


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: "/".join(f"{x:g}" for x in w))
def test_shares_stay_within_one_row_of_the_weights_at_every_step(weights):
    """Stages of 100 steps x 8 rows up to 2000 steps x 512 rows (ProLong's 64k stage: ~4800 steps of
    64 rows): after every step each source's share is within 1 row / rows so far of its weight, so
    within 1% from 100 rows on (weights that are no multiple of 1/10000 add their rounding, < 1e-4);
    i.i.d. draws miss 1% on such stages (benchmarks/mixture_shares.py)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    order = MixtureOrder([1000] * len(w), list(weights), seed=5, stage_index=1)
    for rows_per_step, steps in ((8, 100), (64, 1000), (512, 2000)):
        n = np.arange(1, steps + 1) * rows_per_step  # rows after each step
        counts = np.stack([order.rows_before(int(x)) for x in n])  # (steps, K)
        assert (counts.sum(axis=1) == n).all()
        deviation = np.abs(counts - n[:, None] * w[None, :])  # rows off the exact share
        rounding = np.abs(order.quotas / order.period - w).max()  # 0 unless rounded to 1/10000
        assert deviation.max() < 1 + n.max() * rounding, (rows_per_step, deviation.max())
        assert (np.abs(counts[-1] / n[-1] - w) < 0.01).all()
        assert (np.abs(counts / n[:, None] - w[None, :])[n >= 100] < 0.01).all()


def test_quotas_realise_simple_weights_exactly():
    assert mixture_quotas([30, 30, 40]) == (10, pytest.approx([3, 3, 4]))
    assert mixture_quotas([30, 30, 3, 37])[0] == 100
    assert mixture_quotas([1 / 3] * 3)[0] == 3
    period, quotas = mixture_quotas([0.1234567, 0.8765433])  # not a multiple of 1/10000: rounded
    assert period == 10_000 and quotas.tolist() == [1235, 8765]


def test_one_source_is_the_stage_order_bitwise():
    """A stage with a single dataset (or a one-source list) reads exactly the rows it always read."""
    positions = list(range(0, 50)) + [123, 7, 999]
    want = StageOrder(17, seed=3, stage_index=2).row_ids(positions)
    assert MixtureOrder([17], [1.0], seed=3, stage_index=2).locate(positions) == [(0, r) for r in want]
    assert MixtureOrder([17], [0.25], seed=3, stage_index=2).locate(positions) == [(0, r) for r in want]


def test_each_source_walks_its_own_epochs():
    """A 7-row source drawn 30% repeats on epochs of its own (each one a fresh permutation of all its
    rows); a 10000-row source is never repeated over the stage."""
    order = MixtureOrder([7, 10_000], [3, 7], seed=1, stage_index=0)
    located = order.locate(list(range(400)))
    small = [r for k, r in located if k == 0]
    large = [r for k, r in located if k == 1]
    assert len(small) == 120 and len(large) == 280 and len(set(large)) == 280
    for epoch in range(len(small) // 7):
        assert sorted(small[epoch * 7:(epoch + 1) * 7]) == list(range(7)), epoch
    assert small[:7] != small[7:14], "a fresh permutation per epoch"
    assert order.epochs_after(400) == [119 // 7, 0]


def test_the_order_is_a_pure_function_of_seed_stage_and_position():
    """Read in any order, by any number of ranks, by a fresh object (a resumed run): the same rows;
    another seed or stage reads other rows from the same sources."""
    sizes, weights = [50, 300, 20], [30, 30, 40]
    sequential = MixtureOrder(sizes, weights, 9, 1).locate(list(range(2000)))
    shuffled = np.random.default_rng(0).permutation(2000).tolist()
    fresh = MixtureOrder(sizes, weights, 9, 1).locate(shuffled)
    assert [sequential[p] for p in shuffled] == fresh
    for dp in (1, 2, 4, 8):  # 16 rows a step on any number of ranks: the same rows per step
        layout = StepLayout(dp, micro_batch_size=8 // dp, grad_accum=2)
        order = MixtureOrder(sizes, weights, 9, 1)
        step_rows = sorted(order.locate([p for r in range(dp) for micro in layout.positions(3, r) for p in micro]))
        assert step_rows == sorted(sequential[3 * 16:4 * 16]), dp
    other_seed = MixtureOrder(sizes, weights, 10, 1).locate(list(range(2000)))
    other_stage = MixtureOrder(sizes, weights, 9, 2).locate(list(range(2000)))
    assert [k for k, _ in other_seed] == [k for k, _ in sequential]  # the source pattern is fixed
    assert other_seed != sequential and other_stage != sequential


def _raw(data) -> dict:
    return {"model": {"config": {"model_type": "llama"}},
            "stages": [{"seq_len": 64, "rope": {"type": "default", "theta": 1e4}, "data": data, "lr": 1e-3,
                        "steps": 1}]}


@pytest.mark.parametrize("data, message", [
    ([], r"stages\.0\.data: a mixture needs at least one \{path, weight\} source"),
    (3, r"stages\.0\.data: expected a string or a list, got 3"),
    ([{"path": "a"}], r"missing required key stages\.0\.data\.0\.weight"),
    ([{"path": "a", "weight": 1}, {"path": "b", "weight": -1}], r"stages\.0\.data\.1\.weight must be a positive"),
    ([{"path": "x/a", "weight": 1}, {"path": "y/a", "weight": 1}], r"stages\.0\.data\.1\.name: 'a' is also"),
    ([{"path": "a", "weight": 1}, {"path": "./a", "weight": 1, "name": "b"}], r"stages\.0\.data\.1\.path: \./a is also"),
    ([{"path": "a", "weight": 1e-5}, {"path": "b", "weight": 1}], r"stages\.0\.data\.0\.weight: a share of"),
    ([{"path": "a", "weight": 1, "share": 2}], r"unknown key stages\.0\.data\.0\.share"),
])
def test_mixture_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_raw(data))


def test_every_source_is_checked_like_a_dataset(tmp_path, stdlib_datasets):
    """seq_len, a missing folder, the vocabulary, another tokenizer (than the model's, or without one than
    the first source's) and a damaged file: each error is one line naming stages.N.data.K.path."""
    good = str(stdlib_datasets[64])
    copy = Path(shutil.copytree(good, tmp_path / "copy"))

    def stage_with(second):
        return config_from_dict(_raw([{"path": good, "weight": 1}, {"path": str(second), "weight": 1}])).stages

    with pytest.raises(ConfigError, match=rf"^stages\.0\.seq_len is 64 but stages\.0\.data\.1\.path "
                                          rf"{stdlib_datasets[128]} was prepared with seq_len 128"):
        open_stage_datasets(stage_with(stdlib_datasets[128]), None, 512)
    with pytest.raises(ConfigError, match=rf"^stages\.0\.data\.1\.path: {tmp_path}: not a prepared dataset"):
        open_stage_datasets(stage_with(tmp_path), None, 512)
    with pytest.raises(ConfigError, match=r"^stages\.0\.data\.0\.path .* exceeds the model's embedding size 100"):
        open_stage_datasets(stage_with(copy), None, 100)
    damaged = Path(shutil.copytree(good, tmp_path / "damaged"))
    shard = damaged / "train" / "data-00000-of-00001.arrow"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.raises(DamagedDatasetError, match=rf"^stages\.0\.data\.1\.path: {damaged}: train/"):
        verify_stage_datasets(stage_with(damaged), "fast")
    (opened,) = open_stage_datasets(stage_with(copy), None, 512)
    assert len(opened) == 2 and len(opened[0]) == len(opened[1])
    other_tok = Path(shutil.copytree(good, tmp_path / "other_tok"))  # as if prepared with another tokenizer
    meta = json.loads((other_tok / "meta.json").read_text())
    identity = dict(meta["tokenizer"])
    meta["tokenizer"].update(sha256="0" * 64, vocab_size=identity["vocab_size"] - 1)
    (other_tok / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"^stages\.0\.data\.1\.path .*other_tok was tokenized with .* but "
                                          r"stages\.0\.data\.0\.path .* prepare every source of a stage with the same") as first:
        open_stage_datasets(stage_with(other_tok), None, 512)
    with pytest.raises(ConfigError, match=r"^stages\.0\.data\.1\.path .*other_tok was tokenized with .* but the "
                                          r"model's tokenizer is") as model:
        open_stage_datasets(stage_with(other_tok), identity, 512)
    assert "\n" not in str(first.value) + str(model.value)  # one line each


# ------------------------------------------------------------------------------------------ real runs

STEPS, ROWS_PER_STEP = 6, 8  # micro_batch_size 4 x grad_accum 2
WEIGHTS_RUN = {"stdlib": 25, "small": 75}  # quotas 1/3 in a pattern of 4 rows: every step holds 2/6 exactly


@pytest.fixture(scope="module")
def small_source(tmp_path_factory, stdlib_tokenizer) -> Path:
    """A second 64-token source: two small standard-library modules (24 rows), which the mix repeats."""
    from data_prep.cli import prepare_main

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dest = tmp_path_factory.mktemp("mix") / "small"
    args = ["--tokenizer", str(stdlib_tokenizer), "--seq-len", "64", "--strategy", "best-fit", "--out", str(dest),
            "--no-plot", "--no-progress", "--seed", "1", "--input", str(stdlib / "keyword.py"),
            "--input", str(stdlib / "this.py")]
    assert prepare_main(args) == 0
    return dest


def _mixed_config(path: Path, datasets: dict, small: Path, tokenizer: Path, **train) -> Path:
    stage = {"name": "mix64", "seq_len": 64, "rope": {"type": "default", "theta": 10000}, "steps": STEPS, "lr": 2e-3,
             "warmup_steps": 1, "micro_batch_size": 4, "grad_accum": 2,
             "data": [{"path": str(datasets[64]), "weight": WEIGHTS_RUN["stdlib"], "name": "stdlib"},
                      {"path": str(small), "weight": WEIGHTS_RUN["small"]}]}
    return runs.write_config(path, [stage], {"config": models.tiny_model_config(), "tokenizer": str(tokenizer)},
                             train)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, stdlib_tokenizer, stdlib_datasets, small_source) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    config = _mixed_config(root / "run.yaml", stdlib_datasets, small_source, stdlib_tokenizer)
    runs.check(runs.run(runs.single_cmd() + runs.train_args(config, root / "run"), log=root / "log.txt"))
    return root / "run"


@pytest.mark.multiproc
def test_two_source_run_draws_by_weight_and_logs_tokens_per_source(mixed_run, small_source):
    """The rows read (samples log) hold each source's share exactly, the small source on its own second
    epoch; metrics.jsonl and the checkpoint's stage record carry tokens (and targets) per source."""
    rows = [tuple(pair) for step in runs.samples(mixed_run).values() for micro in step for pair in micro]
    counts = Counter(k for k, _ in rows)
    assert len(rows) == STEPS * ROWS_PER_STEP
    assert counts[0] / len(rows) == 0.25 and counts[1] / len(rows) == 0.75  # within 1%: exactly here
    small_rows = [r for k, r in rows if k == 1]
    assert len(set(small_rows)) == 24 < len(small_rows), "the 24-row source is read again (epoch 1)"
    records = runs.metrics(mixed_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert r["tokens_by_source"] == {"stdlib": 2 * 64, "small": 6 * 64} and r["tokens"] == 8 * 64
        assert sum(r["targets_by_source"].values()) == r["targets"] and min(r["targets_by_source"].values()) > 0
    assert records[-1]["epoch_by_source"] == {"stdlib": 0, "small": 1} and records[-1]["epoch"] == 1
    state = checkpoint.read_state(checkpoint.latest_complete(mixed_run / "checkpoints"))
    (record,) = state["stages"]
    assert record["tokens_by_source"] == {"stdlib": STEPS * 2 * 64, "small": STEPS * 6 * 64}
    assert record["tokens"] == sum(record["tokens_by_source"].values())
    assert record["data"] == record["sources"][0]["path"] and record["sources"][1] == {
        "name": "small", "path": str(small_source), "weight": 75.0}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, stdlib_tokenizer, stdlib_datasets, small_source) -> Path:
    """The same run stopped after 3 of its 6 steps (train.stop_after_steps) and resumed with --resume auto,
    logging to W&B offline (train.wandb; a warning line and no W&B files where wandb is not installed)."""
    root = tmp_path_factory.mktemp("resumed")
    config = _mixed_config(root / "run.yaml", stdlib_datasets, small_source, stdlib_tokenizer, stop_after_steps=3,
                           wandb={"project": "longtrain-tests", "mode": "offline"})
    run_dir, env = root / "run", wandb_files.offline_env(root / "wandb_dir")
    runs.check(runs.run(runs.single_cmd() + runs.train_args(config, run_dir), log=root / "first.log", **env))
    assert [r["step"] for r in runs.metrics(run_dir)] == [1, 2, 3]
    resumed = runs.check(runs.run(runs.single_cmd() + runs.train_args(config, run_dir, "--resume", "auto"),
                                  log=root / "resumed.log", **env))
    assert "resumed from" in resumed.stdout and "stage mix64, step 3" in resumed.stdout
    assert "stage 0 data: a mixture of 2 sources, stdlib 25.00% (" in resumed.stdout and "small 75.00% (24 rows)" in resumed.stdout
    return run_dir


@pytest.mark.multiproc
def test_resume_inside_a_mixed_stage_is_bitwise(resumed_run, mixed_run):
    """Stopped mid-stage and resumed: the losses equal the uninterrupted run's bitwise, the same (source,
    row) pairs are read, and the stage record's tokens per source cumulate over both invocations."""
    assert [r["step"] for r in runs.metrics(resumed_run)] == list(range(1, STEPS + 1))
    assert runs.losses(resumed_run) == runs.losses(mixed_run)  # bitwise, fp32 on CPU
    assert runs.samples(resumed_run) == runs.samples(mixed_run)
    want = checkpoint.read_state(checkpoint.latest_complete(mixed_run / "checkpoints"))["stages"]
    got = checkpoint.read_state(checkpoint.latest_complete(resumed_run / "checkpoints"))["stages"]
    assert got[0]["tokens_by_source"] == want[0]["tokens_by_source"] and got[0]["steps_done"] == STEPS


@pytest.mark.multiproc
def test_wandb_offline_files_hold_every_step_of_the_resumed_run(resumed_run):
    """train.wandb (here beside the resume test, whose two invocations it reuses): each invocation is an
    offline run with the run folder's W&B id; together they hold steps 1-6 with every metric (tokens per
    source as ``tokens_by_source/NAME``) and a ``stages`` table row where a stage begins or resumes."""
    wandb_files.require_wandb()
    run_id = (resumed_run / "wandb_run_id").read_text().strip()
    folders = wandb_files.run_folders(resumed_run.parent / "wandb_dir")
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders), folders
    histories = [wandb_files.history(f) for f in folders]
    assert [[row["step"] for row in h] for h in histories] == [[1, 2, 3], [4, 5, 6]]
    metrics = runs.metrics(resumed_run)
    for row, record in zip(histories[0] + histories[1], metrics):
        assert row["loss"] == record["loss"] and row["stage"] == "mix64" and row["lr"] == record["lr"]
        assert row["tokens_by_source/small"] == record["tokens_by_source"]["small"] == 6 * 64
        assert row["targets_by_source/stdlib"] == record["targets_by_source"]["stdlib"]
    for folder, history, event, step in ((folders[0], histories[0], "begin", 1), (folders[1], histories[1], "resume", 4)):
        stages = wandb_files.table(folder, history[0], "stages")
        assert stages["columns"][:4] == ["step", "event", "stage_index", "stage"]
        assert [row[:4] for row in stages["data"]] == [[step, event, 0, "mix64"]]


def test_a_started_mixed_stage_keeps_its_sources_and_weights_on_resume():
    """A changed weight or source of a started mixture changes its row order: refused, naming
    stages.0.sources (longtrain/resume_rules.py); a single dataset turned into a mixture is refused too."""
    from longtrain.progress import Progress
    from longtrain.resume_rules import check_resume
    from longtrain.stages import ModelFacts, resolve_stages

    def raw(data):
        return {**_raw(data), "model": {"config": models.tiny_model_config()}}

    def state_of(data):
        cfg = config_from_dict(raw(data))
        progress = Progress()
        progress.begin_stage(resolve_stages(cfg, 1, ModelFacts.from_config(models.tiny_config())), 0)
        return {**progress.to_state(), "config": cfg.to_dict()}

    def resume(old, new):
        cfg = config_from_dict(raw(new))
        return check_resume(state_of(old), resolve_stages(cfg, 1, ModelFacts.from_config(models.tiny_config())),
                            cfg, "CKPT")

    mix = [{"path": "/d/a", "weight": 30}, {"path": "/d/b", "weight": 70}]
    assert resume(mix, mix) == []
    for new in ([{"path": "/d/a", "weight": 40}, {"path": "/d/b", "weight": 60}],
                [{"path": "/d/a", "weight": 30}, {"path": "/d/c", "weight": 70}], "/d/a"):
        with pytest.raises(ConfigError, match=r"stages\.0\.sources: "):
            resume(mix, new)


def test_the_prolong_recipe_loads_with_its_weights_realised_exactly():
    """configs/prolong_llama3_8b_64k_to_512k.yaml: two mixed stages of four sources, 30/30/3/37 realised
    in every block of 100 rows."""
    from longtrain.config import load_config
    from tests.support import env

    cfg = load_config(env.REPO_ROOT / "configs" / "prolong_llama3_8b_64k_to_512k.yaml")
    assert [s.seq_len for s in cfg.stages] == [65536, 524288]
    for stage in cfg.stages:
        assert [(s.name, s.weight) for s in stage.sources()] == [
            ("code_repos", 30), ("books", 30), ("textbooks", 3), ("shortmix", 37)]
        period, quotas = mixture_quotas([s.weight for s in stage.sources()])
        assert period == 100 and quotas.tolist() == [30, 30, 3, 37]
