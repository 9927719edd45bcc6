"""Held-out documents for evaluation: text files, folders, globs, JSONL, or a prepared dataset folder.

Text inputs are kept as raw documents and tokenized with each model's own tokenizer (BOS added
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
import glob
import json
import logging
from pathlib import Path

import numpy as np

from data_prep.tokenizer import identity_mismatches
from longtrain.eval.tokenizer import EvalTokenizer

log = logging.getLogger(__name__)



@dataclasses.dataclass
class EvalData:
    sources: list[str]  # files / dataset folder read (recorded in results.json)
    texts: list[str] | None = None  # raw documents (text inputs)
    pieces: list[np.ndarray] | None = None  # token pieces (prepared dataset input)
    meta_path: Path | None = None
    meta: dict | None = None

    def describe(self) -> dict:
        n = len(self.texts) if self.texts is not None else len(self.pieces)
        kind = "text" if self.texts is not None else "prepared_dataset"
        return {"kind": kind, "sources": self.sources, "documents": n}


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
            if obj["text"].strip():
                texts.append(obj["text"])
    return texts


def _read_text_file(path: Path, strict: bool = True) -> list[str]:
    """One document per file (``.jsonl``: one per line). With ``strict=False`` (files found in a
    folder or by a glob) a binary or non-UTF-8 file is skipped instead of being an error."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raw = path.read_bytes()
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw[:1], 0, 1, "NUL byte: binary file")
        text = raw.decode("utf-8-sig")  # -sig: some Gutenberg files start with a BOM
    except UnicodeDecodeError as exc:
        if strict:
            raise ValueError(f"--data {path}: not UTF-8 text ({exc.reason})") from exc
        log.info("skipping %s: not UTF-8 text", path)
        return []
    return [text] if text.strip() else []


def _expand(arg: str) -> tuple[list[Path], bool]:
    """Files of one --data argument: a file, a folder (every non-hidden file below it) or a quoted
    glob such as 'src/**/*.py'. The flag says whether they were named explicitly."""
    if any(c in arg for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(arg, recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"--data {arg}: the pattern matches no file")
        return files, False
    path = Path(arg)
    if not path.exists():
        raise ValueError(f"--data: not found: {arg}")
    if path.is_file():
        return [path], True
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"--data {path}: no file in this folder")
    return files, False


def _read_prepared(folder: Path) -> EvalData:
    from longtrain.data import PreparedDataset  # errors are ConfigError, a ValueError

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


def read_data(paths: list[str]) -> EvalData:
    """Read ``--data``: one prepared dataset folder, or any mix of text files, JSONL, folders and globs."""
    if not paths:
        raise ValueError("--data: give at least one file or folder")
    prepared = [p for p in paths if (Path(p) / "meta.json").is_file()]
    if prepared:
        if len(paths) != 1:
            raise ValueError("--data: a prepared dataset folder (with meta.json) must be the only --data input")
        return _read_prepared(Path(prepared[0]))
    files, texts = [], []
    for arg in paths:
        found, explicit = _expand(arg)
        for f in found:
            docs = _read_text_file(f, strict=explicit)
            files += [f] if docs else []
            texts += docs
    if not texts:
        raise ValueError(f"--data {' '.join(paths)}: no non-empty document found")
    return EvalData([str(f) for f in files], texts=texts)


def _check_dataset_tokenizer(data: EvalData, tokenizer: EvalTokenizer) -> None:
    """A prepared dataset must have been tokenized with the model's tokenizer (meta.json identity)."""
    ident = (data.meta or {}).get("tokenizer")
    ident = ident if isinstance(ident, dict) else {}
    diffs = identity_mismatches(ident, tokenizer.identity())
    if diffs:
        key, theirs, ours = diffs[0]
        raise ValueError(
            f"{data.meta_path}: tokenizer.{key} = {theirs!r} but the model's tokenizer "
            f"({tokenizer.path}) has {ours!r}; evaluate with a dataset prepared with the model's "
            f"tokenizer, or pass the raw text files instead")


def tokenize_documents(data: EvalData, tokenizer: EvalTokenizer) -> list[np.ndarray]:
    """Token ids of every document (int64), with BOS first for text inputs when the tokenizer has one."""
    if data.pieces is not None:
        _check_dataset_tokenizer(data, tokenizer)
        return data.pieces
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return [np.asarray(bos + tokenizer.encode(t), dtype=np.int64) for t in data.texts]


def filler_tokens(docs: list[np.ndarray], tokenizer: EvalTokenizer) -> np.ndarray:
    """One stream of real text tokens for passkey filler: the documents concatenated, BOS removed."""
    bos = tokenizer.bos_id
    parts = [d[1:] if bos is not None and len(d) and d[0] == bos else d for d in docs]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(stream) == 0:
        raise ValueError("passkey filler: the documents hold no tokens")
    return stream
