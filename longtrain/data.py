"""Reading prepared datasets (DESIGN.md section 2) in a deterministic, resumable order.

The order of a stage is a function of (seed, stage index, epoch) only, and the rows of optimizer
step ``s`` are the global positions ``[s * R, (s + 1) * R)`` with ``R = dp * micro * accum`` rows
per step. A resumed run therefore needs no data-loader state beyond the step counter: it reads
exactly the rows the uninterrupted run would have read, none repeated, none skipped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_prep.integrity import DamagedDatasetError, check_dataset_files, dataset_bytes, read_meta
from data_prep.tokenizer import identity_mismatches
from data_prep.writer import COLUMNS  # the dataset contract's columns (DESIGN.md section 2)
from longtrain.config import ConfigError, StageConfig


class PreparedDataset:
    """A ``longtrain prepare`` output folder: ``meta.json`` + ``train/`` (+ ``validation/``).

    Opening it checks the split's files against the sizes ``meta.json`` recorded (``verify="fast"``),
    or their sha256 too (``"full"``), so a damaged file is named here instead of failing inside
    ``datasets`` / pyarrow. ``integrity_note`` says when the dataset records nothing to check."""

    def __init__(self, path: str | Path, split: str = "train", verify: str = "fast"):
        import datasets

        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise ConfigError(f"{self.path}: not a prepared dataset (no meta.json); "
                              "create one with `longtrain prepare`")
        self.meta: dict[str, Any] = read_meta(self.path)
        split_path = self.path / split
        if not split_path.is_dir():
            raise ConfigError(f"{self.path}: has no {split!r} split")
        self.integrity_note = None
        if verify != "off":
            self.integrity_note = check_dataset_files(self.path, verify == "full", [split], self.meta)
        try:
            table = datasets.load_from_disk(str(split_path))
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:  # what a damaged split raises
            raise ConfigError(f"{split_path}: cannot be read, the dataset is damaged ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); prepare it again") from None
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
                        vocab_size: int, verify: str = "fast") -> list[PreparedDataset]:
    """Every stage's dataset, each checked against its stage and the model (ConfigError naming the stage).
    ``verify`` "full" hashes nothing again here: verify_stage_datasets did it before the model loaded."""
    datasets = []
    for i, stage in enumerate(stages):
        dataset = PreparedDataset(stage.data, verify="off" if verify == "off" else "fast")
        check_stage_dataset(dataset, stage, f"stages.{i}", tokenizer_identity, vocab_size)
        datasets.append(dataset)
    return datasets


def verify_stage_datasets(stages: list[StageConfig], mode: str = "fast", log=print) -> None:
    """Check every stage dataset's training files against its meta.json (``mode``: train.verify_data)
    before any model is built, so a damaged file costs seconds, not a model load. Raises
    DamagedDatasetError (a UserError) naming ``stages.N.data``, the folder and the file."""
    if mode == "off":
        return
    checked: set[Path] = set()
    for i, stage in enumerate(stages):
        path = Path(stage.data)
        if path in checked or not (path / "meta.json").is_file():  # a missing one: PreparedDataset says so
            continue
        checked.add(path)
        start = time.monotonic()
        try:
            meta = read_meta(path)
            note = check_dataset_files(path, mode == "full", ["train"], meta)
        except DamagedDatasetError as exc:
            raise DamagedDatasetError(f"stages.{i}.data: {exc}") from None
        if note:
            log(f"stages.{i}.data {path}: {note}")
        elif mode == "full":
            files, size = dataset_bytes(meta, ["train"])
            log(f"stages.{i}.data {path}: {files} files ({size / 2**20:,.1f} MiB) match their sha256 in meta.json "
                f"({time.monotonic() - start:.1f} s)")


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
