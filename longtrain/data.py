"""Reading prepared datasets (DESIGN.md section 2) in a deterministic, resumable order.

The order of a stage is a function of (seed, stage index, epoch) only, and the rows of optimizer
step ``s`` are the global positions ``[s * R, (s + 1) * R)`` with ``R = dp * micro * accum`` rows
per step. A resumed run therefore needs no data-loader state beyond the step counter: it reads
exactly the rows the uninterrupted run would have read, none repeated, none skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.tokenizer import identity_mismatches
from data_prep.writer import COLUMNS  # the dataset contract's columns (DESIGN.md section 2)
from longtrain.config import ConfigError, StageConfig


class PreparedDataset:
    """A ``longtrain prepare`` output folder: ``meta.json`` + ``train/`` (+ ``validation/``)."""

    def __init__(self, path: str | Path, split: str = "train"):
        import datasets

        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"{self.path}: not a prepared dataset (no meta.json); "
                              "create one with `longtrain prepare`")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        split_path = self.path / split
        if not split_path.is_dir():
            raise ConfigError(f"{self.path}: has no {split!r} split")
        table = datasets.load_from_disk(str(split_path))
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ConfigError(f"{split_path}: missing column(s) {', '.join(missing)} "
                              "(was it written by `longtrain prepare`?)")
        self.table = table.with_format("numpy", columns=list(COLUMNS))
        if len(self.table) == 0:
            raise ConfigError(f"{split_path}: the dataset has no rows")

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        return dict(self.meta.get("tokenizer", {}))

    def __len__(self) -> int:
        return len(self.table)

    def rows(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
        """Rows by dataset index, in the given order."""
        if not indices:
            return []
        batch = self.table[list(indices)]
        return [{c: np.asarray(batch[c][i]) for c in COLUMNS} for i in range(len(indices))]


def check_stage_dataset(dataset: PreparedDataset, stage: StageConfig, where: str,
                        tokenizer_identity: dict[str, Any] | None, vocab_size: int) -> None:
    """Refuse a dataset that does not fit the stage or the model, naming both sides."""
    if dataset.seq_len != stage.seq_len:
        raise ConfigError(f"{where}.seq_len is {stage.seq_len} but its dataset {dataset.path} was prepared "
                          f"with seq_len {dataset.seq_len}; prepare it again with --seq-len {stage.seq_len} "
                          f"or change {where}.seq_len")
    data_tok = dataset.tokenizer
    data_vocab = data_tok.get("vocab_size")
    if data_vocab is not None and int(data_vocab) > vocab_size:
        raise ConfigError(f"{where}.data {dataset.path}: tokenizer vocab {data_vocab} exceeds the model's "
                          f"embedding size {vocab_size}")
    if tokenizer_identity is None:
        return
    diffs = identity_mismatches(data_tok, tokenizer_identity)
    if diffs:
        def show(key: str, value) -> str:
            return f"{str(value)[:12]}..." if key == "sha256" else str(value)

        mismatch = ", ".join(f"{k} {show(k, theirs)} vs {show(k, ours)}" for k, theirs, ours in diffs)
        raise ConfigError(
            f"{where}.data {dataset.path} was tokenized with {data_tok.get('path')}, but the model's tokenizer "
            f"is {tokenizer_identity.get('path')} ({mismatch}); prepare the data with the model's tokenizer "
            "or set model.tokenizer")


def open_stage_datasets(stages: list[StageConfig], tokenizer_identity: dict[str, Any] | None,
                        vocab_size: int) -> list[PreparedDataset]:
    """Every stage's dataset, each checked against its stage and the model (ConfigError naming the stage)."""
    datasets = []
    for i, stage in enumerate(stages):
        dataset = PreparedDataset(stage.data)
        check_stage_dataset(dataset, stage, f"stages.{i}", tokenizer_identity, vocab_size)
        datasets.append(dataset)
    return datasets


def datasets_tokenizer(datasets: list[PreparedDataset]) -> Path | None:
    """The tokenizer a run without ``model.tokenizer`` adopts: the one every dataset was prepared with."""
    hashes = {d.tokenizer.get("sha256") for d in datasets}
    if len(hashes) > 1:
        raise ConfigError("stages use datasets prepared with different tokenizers; set model.tokenizer")
    path = datasets[0].tokenizer.get("path")
    return Path(path) if path and Path(path).exists() else None


@dataclass(frozen=True)
class StepLayout:
    """How the rows of one optimizer step are split over data-parallel ranks and micro-batches."""

    dp_size: int
    micro_batch_size: int
    grad_accum: int

    @property
    def rows_per_step(self) -> int:
        return self.dp_size * self.micro_batch_size * self.grad_accum

    def positions(self, step_in_stage: int, dp_rank: int) -> list[list[int]]:
        """Global stage positions of this rank's rows, one list per micro-batch."""
        base = step_in_stage * self.rows_per_step
        out = []
        for micro in range(self.grad_accum):
            start = base + (micro * self.dp_size + dp_rank) * self.micro_batch_size
            out.append(list(range(start, start + self.micro_batch_size)))
        return out


class StageOrder:
    """Dataset row order of one stage: a fresh permutation per epoch, seeded by (seed, stage, epoch)."""

    def __init__(self, num_rows: int, seed: int, stage_index: int):
        self.num_rows = num_rows
        self.seed = seed
        self.stage_index = stage_index
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self.stage_index, epoch])
            self._perm = rng.permutation(self.num_rows)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def row_ids(self, positions: list[int]) -> list[int]:
        """Dataset indices for global stage positions (a position past the end wraps to a new epoch)."""
        return [int(self._permutation(p // self.num_rows)[p % self.num_rows]) for p in positions]

    def epoch_of(self, position: int) -> int:
        return position // self.num_rows
