"""Weights & Biases, offline only (WANDB_MODE=offline, every file under tmp): `longtrain eval --wandb`
logs its summary table and plots; without wandb, training warns and goes on while eval stops before
any model; ranks other than 0 never start W&B. (A training run's W&B files: test_mixture.py, which
reuses its resumed run.)"""
from __future__ import annotations

import sys

import pytest

from longtrain.cli import main as longtrain_main
from longtrain.config import WandbConfig
from longtrain.metrics import MetricsLogger
from tests.support import models, wandb_files
from tests.support.text import stdlib_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for key, value in wandb_files.offline_env(tmp_path / "wandb_dir").items():
        monkeypatch.setenv(key, value)
    return tmp_path / "wandb_dir"


def _eval_args(tmp_path, stdlib_tokenizer, *extra: str) -> list[str]:
    model = models.save_hf(models.tiny_llama(512), stdlib_tokenizer, tmp_path / "tiny")
    text = tmp_path / "heldout.txt"
    text.write_text(stdlib_text(20_000))
    return ["eval", str(model), "--data", str(text), "--lengths", "64", "--passkey-lengths", "256",
            "--passkey-depths", "0", "--passkey-trials", "1", "--max-tokens", "500", "--out", str(tmp_path / "out"),
            "--no-progress", *extra]


def test_eval_logs_its_table_and_plots(tmp_path, capsys, offline, stdlib_tokenizer):
    wandb_files.require_wandb()
    assert longtrain_main(_eval_args(tmp_path, stdlib_tokenizer, "--wandb", "longtrain-tests/tiny-eval")) == 0
    assert "wandb: " in capsys.readouterr().out
    (folder,) = wandb_files.run_folders(offline)
    (row,) = wandb_files.history(folder)
    summary = wandb_files.table(folder, row, "eval/summary")
    lines = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert summary["columns"] == [c.strip() for c in lines[0].strip("|").split("|")]
    assert len(summary["data"]) == len(lines) - 2 == 2  # lengths 64 (perplexity) and 256 (passkey)
    assert summary["data"][0][:2] == ["tiny", 64.0] and isinstance(summary["data"][0][2], float)
    for plot in ("eval/ppl_by_position", "eval/passkey"):
        assert row[f"{plot}/_type"] == "image-file"
        assert wandb_files.logged_file(folder, row, plot).read_bytes()[:8] == PNG_MAGIC
    assert (folder / "files" / "results.json").is_file()


def test_without_wandb_training_warns_and_eval_stops_first(tmp_path, capsys, monkeypatch, stdlib_tokenizer):
    """sys.modules["wandb"] = None makes ``import wandb`` raise ImportError and find_spec return None, as
    on a machine without wandb."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    logger = MetricsLogger(tmp_path, True, 1, 1, False, wandb=WandbConfig(project="p"))
    logger.close()
    assert "train.wandb is set but the wandb package is not installed" in capsys.readouterr().out
    assert longtrain_main(_eval_args(tmp_path, stdlib_tokenizer, "--wandb", "p")) == 2
    err = capsys.readouterr().err
    assert "--wandb: the wandb package is not installed" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "stopped before any model was evaluated"


def test_only_rank_0_starts_wandb(tmp_path, offline):
    wandb_files.require_wandb()
    logger = MetricsLogger(tmp_path, False, 1, 1, False, wandb=WandbConfig(project="p", mode="offline"))
    logger.log_step({"step": 1, "loss": 1.0})
    logger.close()
    assert not offline.exists() or not wandb_files.run_folders(offline)
    assert not (tmp_path / "wandb_run_id").exists()


def test_stage_transitions_are_rows_of_the_stages_table(tmp_path, offline):
    """Two stages in one invocation: the table gains a ``begin`` row at each stage's first step, logged
    with that step; the steps in between carry no table (no console line: log_every 100 of 10 steps)."""
    wandb_files.require_wandb()
    logger = MetricsLogger(tmp_path, True, 10, 100, False, wandb=WandbConfig(project="p", mode="offline"))
    for step, stage, in_stage in ((1, 0, 1), (2, 0, 2), (3, 1, 1)):
        logger.log_step({"step": step, "stage": f"s{stage}", "stage_index": stage, "step_in_stage": in_stage,
                         "seq_len": 64 * (stage + 1), "loss": 1.0 / step, "tokens_by_source": {"a": step}})
    logger.close()
    (folder,) = wandb_files.run_folders(offline)
    rows = wandb_files.history(folder)
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["tokens_by_source/a"] for r in rows] == [1, 2, 3]
    assert "stages/_type" not in rows[1]
    table = wandb_files.table(folder, rows[2], "stages")
    assert [row[:5] for row in table["data"]] == [[1, "begin", 0, "s0", 64], [3, "begin", 1, "s1", 128]]
