"""Reading prepared datasets (DESIGN.md section 2) in a deterministic, resumable order.

The order of a stage is a function of (seed, stage index, epoch) only, and the rows of optimizer
step ``s`` are the global positions ``[s * R, (s + 1) * R)`` with ``R = dp * micro * accum`` rows
per step. A resumed run therefore needs no data-loader state beyond the step counter: it reads
exactly the rows the uninterrupted run would have read, none repeated, none skipped.

A stage whose ``data`` is a mixture maps each global position to a (source, row) pair by
``MixtureOrder``: a fixed interleaving pattern gives the source (every prefix of the stage holds each
source's share to within one row), and each source walks through its own seeded permutation per
epoch of its own (a small source repeats, a large one does not). A single dataset is the one-source
case, bitwise the order it always had.
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
from longtrain.config import MIX_PERIOD_MAX, ConfigError, StageConfig


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


def stage_sources(stage: StageConfig, where: str) -> list[tuple[str, str]]:
    """``(config key, folder)`` of each dataset of a stage: ``(stages.N.data, path)``, or for a mixture
    ``(stages.N.data.K.path, path)`` per source."""
    if isinstance(stage.data, list):
        return [(f"{where}.data.{k}.path", source.path) for k, source in enumerate(stage.data)]
    return [(f"{where}.data", stage.data)]


def _tokenizer_mismatch(theirs: dict[str, Any], ours: dict[str, Any]) -> str | None:
    """What differs between two tokenizer identities (data_prep.tokenizer), or None when they agree."""
    diffs = identity_mismatches(theirs, ours)
    if not diffs:
        return None

    def show(key: str, value) -> str:
        return f"{str(value)[:12]}..." if key == "sha256" else str(value)

    return ", ".join(f"{k} {show(k, a)} vs {show(k, b)}" for k, a, b in diffs)


def check_stage_dataset(dataset: PreparedDataset, stage: StageConfig, where: str,
                        tokenizer_identity: dict[str, Any] | None, vocab_size: int, key: str | None = None) -> None:
    """Refuse a dataset that does not fit the stage or the model, naming both sides (``key``: the config
    key of the dataset, default ``{where}.data``)."""
    key = key or f"{where}.data"
    if dataset.seq_len != stage.seq_len:
        raise ConfigError(f"{where}.seq_len is {stage.seq_len} but {key} {dataset.path} was prepared "
                          f"with seq_len {dataset.seq_len}; prepare it again with --seq-len {stage.seq_len} "
                          f"or change {where}.seq_len")
    data_tok = dataset.tokenizer
    data_vocab = data_tok.get("vocab_size")
    if data_vocab is not None and int(data_vocab) > vocab_size:
        raise ConfigError(f"{key} {dataset.path}: tokenizer vocab {data_vocab} exceeds the model's "
                          f"embedding size {vocab_size}")
    if tokenizer_identity is None:
        return
    mismatch = _tokenizer_mismatch(data_tok, tokenizer_identity)
    if mismatch:
        raise ConfigError(
            f"{key} {dataset.path} was tokenized with {data_tok.get('path')}, but the model's tokenizer "
            f"is {tokenizer_identity.get('path')} ({mismatch}); prepare the data with the model's tokenizer "
            "or set model.tokenizer")


def _open_source(path: str, key: str, verify: str) -> PreparedDataset:
    try:
        return PreparedDataset(path, verify=verify)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def open_stage_datasets(stages: list[StageConfig], tokenizer_identity: dict[str, Any] | None,
                        vocab_size: int, verify: str = "fast") -> list[list[PreparedDataset]]:
    """Every stage's datasets (one per source), each checked against its stage and the model (ConfigError
    naming ``stages.N.data`` or ``stages.N.data.K.path``); without a model tokenizer the sources of a
    stage must agree with its first. ``verify`` "full" hashes nothing again here: verify_stage_datasets
    did it before the model loaded."""
    out = []
    for i, stage in enumerate(stages):
        where, opened = f"stages.{i}", []
        keys = stage_sources(stage, where)
        for key, path in keys:
            dataset = _open_source(path, key, "off" if verify == "off" else "fast")
            check_stage_dataset(dataset, stage, where, tokenizer_identity, vocab_size, key)
            if tokenizer_identity is None and opened:
                mismatch = _tokenizer_mismatch(dataset.tokenizer, opened[0].tokenizer)
                if mismatch:
                    raise ConfigError(f"{key} {dataset.path} was tokenized with {dataset.tokenizer.get('path')}, but "
                                      f"{keys[0][0]} {opened[0].path} with "
                                      f"{opened[0].tokenizer.get('path')} ({mismatch}); prepare every source of a "
                                      "stage with the same tokenizer")
            opened.append(dataset)
        out.append(opened)
    return out


def verify_stage_datasets(stages: list[StageConfig], mode: str = "fast", log=print) -> None:
    """Check every stage dataset's training files against its meta.json (``mode``: train.verify_data)
    before any model is built, so a damaged file costs seconds, not a model load. Raises
    DamagedDatasetError (a UserError) naming ``stages.N.data`` (``stages.N.data.K.path`` for a mixture
    source), the folder and the file."""
    if mode == "off":
        return
    checked: set[Path] = set()
    for i, stage in enumerate(stages):
        for key, folder in stage_sources(stage, f"stages.{i}"):
            path = Path(folder)
            if path in checked or not (path / "meta.json").is_file():  # a missing one: PreparedDataset says so
                continue
            checked.add(path)
            start = time.monotonic()
            try:
                meta = read_meta(path)
                note = check_dataset_files(path, mode == "full", ["train"], meta)
            except DamagedDatasetError as exc:
                raise DamagedDatasetError(f"{key}: {exc}") from None
            if note:
                log(f"{key} {path}: {note}")
            elif mode == "full":
                files, size = dataset_bytes(meta, ["train"])
                log(f"{key} {path}: {files} files ({size / 2**20:,.1f} MiB) match their sha256 in meta.json "
                    f"({time.monotonic() - start:.1f} s)")


def datasets_tokenizer(datasets: list[list[PreparedDataset]]) -> Path | None:
    """The tokenizer a run without ``model.tokenizer`` adopts: the one every dataset was prepared with."""
    flat = [d for stage in datasets for d in stage]
    hashes = {d.tokenizer.get("sha256") for d in flat}
    if len(hashes) > 1:
        raise ConfigError("stages use datasets prepared with different tokenizers; set model.tokenizer")
    path = flat[0].tokenizer.get("path")
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
    """Dataset row order of one stage: a fresh permutation per epoch, seeded by (seed, stage, epoch), and
    for source ``stream`` of a mixture by (seed, stage, epoch, stream)."""

    def __init__(self, num_rows: int, seed: int, stage_index: int, stream: int | None = None):
        self.num_rows = num_rows
        self.seed = seed
        self.stage_index = stage_index
        self._stream = stream
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            key = [self.seed, self.stage_index, epoch] + ([] if self._stream is None else [self._stream])
            rng = np.random.default_rng(key)
            self._perm = rng.permutation(self.num_rows)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def row_ids(self, positions: list[int]) -> list[int]:
        """Dataset indices for global stage positions (a position past the end wraps to a new epoch)."""
        return [int(self._permutation(p // self.num_rows)[p % self.num_rows]) for p in positions]

    def epoch_of(self, position: int) -> int:
        return position // self.num_rows


def mixture_quotas(weights: list[float], max_period: int = MIX_PERIOD_MAX) -> tuple[int, np.ndarray]:
    """``(P, q)``: each repeating block of ``P`` positions holds exactly ``q[k]`` rows of source ``k``.

    ``P`` is the smallest period that realises the normalised weights exactly (30/30/40 -> 10 with
    3/3/4), else ``max_period`` with largest-remainder rounding (shares off by < 1/max_period)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    candidates = np.arange(1, max_period + 1, dtype=np.float64)[:, None] * w[None, :]  # (max_period, K)
    exact = (np.abs(candidates - np.rint(candidates)) <= 1e-6).all(axis=1) & (np.rint(candidates) >= 1).all(axis=1)
    if exact.any():
        period = int(np.argmax(exact)) + 1
        return period, np.rint(w * period).astype(np.int64)
    ideal = w * max_period
    quotas = np.floor(ideal).astype(np.int64)
    quotas[np.argsort(-(ideal - quotas), kind="stable")[:max_period - int(quotas.sum())]] += 1
    if (quotas < 1).any():  # config.py refuses shares under 1 / MIX_PERIOD_MAX before this
        raise ValueError(f"a weight share under 1/{max_period} cannot be drawn: {w.tolist()}")
    return max_period, quotas


def mixture_pattern(quotas: np.ndarray) -> np.ndarray:
    """``(P,)`` source of each position of a block: the ``j``-th row of source ``k`` sits at its ideal
    time ``(j + 0.5) / q[k]`` of the block, ties to the lower ``k``. Every prefix of ``n`` positions then
    holds ``n * q[k] / P`` rows of each source to within one row (measured: <= 0.99 for up to 100
    sources; tests/longtrain/test_mixture.py), where i.i.d. draws stray by ``sqrt(n w (1 - w))``."""
    source = np.concatenate([np.full(q, k) for k, q in enumerate(quotas)])
    when = np.concatenate([(np.arange(q) + 0.5) / q for q in quotas])
    return source[np.lexsort((source, when))]


class MixtureOrder:
    """Global stage position -> (source, row): a pure function of (seed, stage, position).

    Position ``p`` lies in block ``p // P`` at offset ``o = p % P``; its source ``k`` is ``pattern[o]``
    and it is row ``j = (p // P) * q[k] + (rows of k before o in the block)`` of source ``k``'s own
    stream, which reads ``StageOrder`` epochs of that source (a one-source stage: exactly the stage's
    ``StageOrder``, so a single dataset reads what it always read)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, stage_index: int):
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights")
        self.sizes = list(sizes)
        self.period, self.quotas = mixture_quotas(weights)
        self.pattern = mixture_pattern(self.quotas)  # (P,)
        self._before = np.zeros((len(sizes), self.period + 1), dtype=np.int64)  # (K, P + 1) rows of k in [0, o)
        for k in range(len(sizes)):
            np.cumsum(self.pattern == k, out=self._before[k, 1:])
        single = len(sizes) == 1
        self.sources = [StageOrder(n, seed, stage_index, stream=None if single else k) for k, n in enumerate(sizes)]

    def rows_before(self, position: int) -> np.ndarray:
        """``(K,)`` rows each source contributes to the stage positions ``[0, position)``."""
        block, offset = divmod(position, self.period)
        return block * self.quotas + self._before[:, offset]

    def locate(self, positions: list[int]) -> list[tuple[int, int]]:
        """``(source, dataset row)`` of each global stage position."""
        out = []
        for p in positions:
            block, offset = divmod(p, self.period)
            k = int(self.pattern[offset])
            j = block * int(self.quotas[k]) + int(self._before[k, offset])
            out.append((k, self.sources[k].row_ids([j])[0]))
        return out

    def epochs_after(self, positions_done: int) -> list[int]:
        """Each source's epoch of its last row read once ``positions_done`` positions are read (0 before any)."""
        counts = self.rows_before(positions_done)
        return [int(max(c - 1, 0) // n) for c, n in zip(counts, self.sizes)]
