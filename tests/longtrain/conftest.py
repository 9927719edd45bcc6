"""Session fixtures shared by the trainer, sequence-parallel, export and eval tests: one real
tokenizer, two prepared datasets and one single-process reference run, built once."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import models, runs, text


@pytest.fixture(scope="session")
def stdlib_tokenizer(tmp_path_factory) -> Path:
    """A 512-piece SentencePiece BPE trained by `longtrain tokenizer` on standard-library sources."""
    from data_prep.cli import tokenizer_main

    out = tmp_path_factory.mktemp("tokenizer")
    args = ["--vocab-size", "512", "--out", str(out), "--max-chars", "2000000", "--skip-bad"]
    for src in text.stdlib_corpus():
        args += ["--input", src]
    assert tokenizer_main(args) == 0
    return out / "tokenizer.model"


@pytest.fixture(scope="session")
def stdlib_datasets(tmp_path_factory, stdlib_tokenizer) -> dict[int, Path]:
    """{64: best-fit packed rows, 128: slide-window rows} of standard-library sources."""
    from data_prep.cli import prepare_main

    root = tmp_path_factory.mktemp("data")
    out = {}
    for seq_len, strategy in ((64, "best-fit"), (128, "slide-window")):
        dest = root / f"d{seq_len}"
        args = ["--tokenizer", str(stdlib_tokenizer), "--seq-len", str(seq_len), "--strategy", strategy,
                "--out", str(dest), "--no-plot", "--no-progress", "--val-fraction", "0.05", "--seed", "1",
                "--skip-bad"]
        for src in text.stdlib_corpus():
            args += ["--input", src]
        assert prepare_main(args) == 0
        out[seq_len] = dest
    return out


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, stdlib_tokenizer, stdlib_datasets) -> Path:
    """One process, two stages, fp32 ZeRO-2: the reference the multi-rank and resumed runs must match."""
    root = tmp_path_factory.mktemp("baseline")
    # checkpoint_every 3, keep all: step 3 (mid stage 1) lets a test resume across the stage boundary.
    config = runs.write_config(root / "run.yaml", runs.two_stage_recipe(stdlib_datasets),
                               {"config": models.tiny_model_config(), "tokenizer": str(stdlib_tokenizer)},
                               {"checkpoint_every": 3, "keep_checkpoints": 0})
    run_dir = root / "run"
    runs.check(runs.run(runs.single_cmd() + runs.train_args(config, run_dir), log=root / "log.txt"))
    return run_dir
