"""Held-out documents for evaluation: any input ``longtrain prepare`` reads, or a prepared dataset folder.

Text inputs (JSONL(.gz), Parquet, plain text files, folders, quoted globs, ``datasets`` folders) are
read by data prep's own readers (``data_prep.sources``): the same UTF-8, byte-order-mark and line-ending
rules (a CRLF file gives the tokens of its LF twin), the same ``--text-field``, and the same rule for
bad documents: the first one stops with its file, line and reason, or ``--skip-bad`` skips and counts
them. They are kept as raw documents and tokenized with each model's own tokenizer (BOS added
explicitly where the tokenizer has one). A prepared dataset (DESIGN.md section 2) is already
tokenized: its tokenizer must be the model's. Its rows are cut back into **segments** (``doc_lens``)
and each segment is used as an independent document piece; segments are never re-joined, because
the dataset does not record which segments of neighbouring rows belong to the same document (rows
may be shuffled), and joining two documents would fake long-range context. Segments whose
``loss_mask`` is all zero (padding) are dropped. So a row whose single segment fills it gives one
piece of ``seq_len`` tokens, which is what long-context evaluation at ``seq_len`` needs. Every
position of a piece is scored (``loss_mask`` is a training notion): with the slide-window strategy,
overlapping windows therefore score the repeated text again.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.sources import ReadOptions, good_documents, parse_input_spec, resolve_source
from data_prep.tokenizer import Tokenizer, identity_mismatches
from longtrain.data import PreparedDataset  # its errors are ConfigError, a ValueError
from longtrain.eval.errors import EvalError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalData:
    sources: list[str]  # files / dataset folder read (recorded in results.json)
    texts: list[str] | None = None  # raw documents (text inputs)
    pieces: list[np.ndarray] | None = None  # token pieces (prepared dataset input)
    meta_path: Path | None = None
    meta: dict | None = None
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # bad documents by reason (--skip-bad)

    def describe(self) -> dict:
        if self.texts is None:
            return {"kind": "prepared_dataset", "sources": self.sources, "documents": len(self.pieces)}
        return {"kind": "text", "sources": self.sources, "documents": len(self.texts), "skipped": self.skipped}


def _read_prepared(folder: Path) -> EvalData:
    split = "validation" if (folder / "validation").is_dir() else "train"
    if split == "train":
        log.warning("%s has no validation/ split: evaluating on train/ rows (not held out)", folder)
    ds = PreparedDataset(folder, split)
    pieces = []
    for row in ds.table:
        ends = np.cumsum(row["doc_lens"])
        for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
            if row["loss_mask"][start:end].any():
                pieces.append(np.asarray(row["input_ids"][start:end], dtype=np.int64))
    return EvalData([str(folder / split)], pieces=pieces, meta_path=folder / "meta.json", meta=ds.meta)


def _read_texts(paths: list[str], opts: ReadOptions, skip_bad: bool) -> EvalData:
    files, texts, skipped = [], [], {}
    for index, arg in enumerate(paths):
        spec = parse_input_spec(arg, option="--data")
        if spec.weight != 1.0:
            raise DataPrepError(f"--data {arg}: weights (PATH:WEIGHT) are for prepare's mixtures; eval reads "
                                f"every document once: pass {spec.path}")
        source = resolve_source(spec, index, option="--data")
        files += [str(f) for f in source.files]
        texts += [raw.text for raw in good_documents(source, opts, skip_bad, skipped)]
    if skipped:
        log.warning("--skip-bad: left out %d bad documents %s", sum(skipped.values()), skipped)
    if not texts:
        raise DataPrepError(f"--data {' '.join(paths)}: no document found"
                            + (f" (skipped as bad: {skipped})" if skipped else ""))
    return EvalData(files, texts=texts, skipped=skipped)


def read_data(paths: list[str], text_field: str = "text", skip_bad: bool = False) -> EvalData:
    """Read ``--data``: one prepared dataset folder, or any mix of the inputs ``longtrain prepare`` reads."""
    if not paths:
        raise EvalError("--data: give at least one file or folder")
    prepared = [p for p in paths if (Path(p) / "meta.json").is_file()]
    if prepared:
        if len(paths) != 1:
            raise EvalError("--data: a prepared dataset folder (with meta.json) must be the only --data input")
        return _read_prepared(Path(prepared[0]))
    try:
        return _read_texts(paths, ReadOptions(text_field=text_field), skip_bad)
    except DataPrepError as exc:  # eval's own error (a ValueError too, as eval's errors always were)
        raise EvalError(str(exc)) from None


def _check_dataset_tokenizer(data: EvalData, tokenizer: Tokenizer) -> None:
    """A prepared dataset must have been tokenized with the model's tokenizer (meta.json identity)."""
    ident = (data.meta or {}).get("tokenizer")
    ident = ident if isinstance(ident, dict) else {}
    diffs = identity_mismatches(ident, tokenizer.identity())
    if diffs:
        key, theirs, ours = diffs[0]
        raise EvalError(
            f"{data.meta_path}: tokenizer.{key} = {theirs!r} but the model's tokenizer "
            f"({tokenizer.file}) has {ours!r}; evaluate with a dataset prepared with the model's "
            f"tokenizer, or pass the raw text files instead")


def tokenize_documents(data: EvalData, tokenizer: Tokenizer) -> list[np.ndarray]:
    """Token ids of every document (int64), with BOS first for text inputs when the tokenizer has one."""
    if data.pieces is not None:
        _check_dataset_tokenizer(data, tokenizer)
        return data.pieces
    # Exactly prepare's encoding (long SentencePiece documents in chunks, same ids), BOS explicit.
    ids = tokenizer.encode_batch(data.texts, add_bos=tokenizer.bos_id is not None, add_eos=False)
    return [d.astype(np.int64) for d in ids]


def filler_tokens(docs: list[np.ndarray], tokenizer: Tokenizer) -> np.ndarray:
    """One stream of real text tokens for passkey filler: the documents concatenated, BOS removed."""
    bos = tokenizer.bos_id
    parts = [d[1:] if bos is not None and len(d) and d[0] == bos else d for d in docs]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(stream) == 0:
        raise EvalError("passkey filler: the documents hold no tokens")
    return stream
