"""``longtrain inspect``: a prepared dataset's summary, and one row decoded segment by segment.

In a decoded row, tokens that are not training targets (``loss_mask`` 0) are shown between
``⟦`` and ``⟧``; each segment starts on its own line with its span, length and target count.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.integrity import DamagedDatasetError, check_dataset_files, dataset_bytes, read_meta
from data_prep.stats import summary_lines
from data_prep.tokenizer import Tokenizer

MASK_OPEN, MASK_CLOSE = "⟦", "⟧"


def load_meta(folder: Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise DataPrepError(f"{folder}: no meta.json, so not a prepared dataset (make one with longtrain prepare)")
    return read_meta(Path(folder))


def load_split(folder: Path, split: str):
    import datasets  # seconds to import: not for `inspect --help` or a missing folder

    path = Path(folder) / split
    if not path.is_dir():
        have = [p.name for p in Path(folder).iterdir() if (p / "state.json").is_file()]
        raise DataPrepError(f"{folder}: no split '{split}' (splits: {', '.join(sorted(have))}); choose one with --split")
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as exc:  # pyarrow's errors are OSError / ValueError subclasses
        raise DamagedDatasetError(f"{path}: cannot be read, the dataset is damaged ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); prepare it again") from None


def verify_dataset(folder: Path, full: bool, meta: dict, log=print, splits: list[str] | None = None) -> None:
    """Check the files against meta.json (sizes; with ``full`` sha256 too) and say what was checked."""
    start = time.monotonic()
    note = check_dataset_files(folder, full, splits, meta)
    if note:
        log(f"note: {note}")
    elif full:
        files, size = dataset_bytes(meta, splits)
        log(f"verified {files} files ({size / 2**20:,.1f} MiB): sizes and sha256 match meta.json "
            f"({time.monotonic() - start:.2f} s)")


def _segment_text(tok: Tokenizer, ids: np.ndarray, mask: np.ndarray) -> str:
    """Text of a segment with its non-target spans bracketed.

    Spans are decoded as differences of decoded prefixes, because SentencePiece drops the
    leading space of a piece sequence decoded on its own."""
    cuts = [0] + [i for i in range(1, len(ids)) if mask[i] != mask[i - 1]] + [len(ids)]
    out, prev = [], ""
    for a, b in zip(cuts, cuts[1:]):
        upto = tok.decode(ids[:b])
        text = upto[len(prev):] if upto.startswith(prev) else tok.decode(ids[a:b])
        prev = upto
        out.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if mask[a] == 0 else text)
    return "".join(out)


def _shorten(text: str, chars: int) -> str:
    if chars <= 0 or len(text) <= 2 * chars:
        return text
    return f"{text[:chars]} [... {len(text) - 2 * chars:,} characters ...] {text[-chars:]}"


def render_row(row: dict, tok: Tokenizer | None, pad_id: int, chars: int = 300, tokens: int = 0) -> list[str]:
    """Lines describing one row: a header, then per segment a header and its text."""
    ids = np.asarray(row["input_ids"], dtype=np.int64)
    mask = np.asarray(row["loss_mask"], dtype=np.int64)
    lens = [int(x) for x in row["doc_lens"]]
    plural = "s" if len(lens) > 1 else ""
    lines = [f"{len(ids)} tokens, {len(lens)} segment{plural}, {int(mask.sum())} targets (doc_lens {lens})"]
    offset = 0
    for k, n in enumerate(lens):
        seg_ids, seg_mask = ids[offset:offset + n], mask[offset:offset + n]
        padding = k == len(lens) - 1 and not seg_mask.any() and bool((seg_ids == pad_id).all()) and len(lens) > 1
        kind = "padding" if padding else "document piece"
        lines.append(f"── segment {k + 1}/{len(lens)} ({kind}): tokens {offset}..{offset + n - 1}, {n} tokens, "
                     f"positions 0..{n - 1}, {int(seg_mask.sum())} targets")
        if tokens:
            shown = [f"{int(i)}:{tok.piece(int(i)) if tok else '?'}:{int(m)}"
                     for i, m in zip(seg_ids[:tokens], seg_mask[:tokens])]
            lines.append("   id:piece:target  " + "  ".join(shown))
        if not padding:
            text = _segment_text(tok, seg_ids, seg_mask) if tok else " ".join(map(str, seg_ids.tolist()))
            lines.append(_shorten(text, chars))
        offset += n
    return lines


def inspect_dataset(folder: str, row: int = 0, split: str = "train", chars: int = 300, tokens: int = 0,
                    tokenizer: str | None = None, log=print, verify: bool = False) -> None:
    """Summary and one decoded row; the split's file sizes are checked first, ``verify`` checks every
    file's sha256 (DamagedDatasetError naming the file)."""
    folder = Path(folder)
    meta = load_meta(folder)
    for line in summary_lines(meta):
        log(line)
    if (folder / split).is_dir():
        verify_dataset(folder, verify, meta, log, None if verify else [split])
    ds = load_split(folder, split)
    if not 0 <= row < len(ds):
        raise DataPrepError(f"--row {row}: the '{split}' split has rows 0..{len(ds) - 1}")
    tok = None
    tok_path = tokenizer or meta["tokenizer"]["path"]
    try:
        tok = Tokenizer(tok_path)
        if tok.sha256 != meta["tokenizer"]["sha256"]:
            log(f"warning: {tok.file} differs from the tokenizer this dataset was made with (sha256)")
    except DataPrepError as exc:
        log(f"cannot decode ({exc}); showing token ids. Pass --tokenizer PATH.")
    log(f"\nrow {row} of '{split}' ({len(ds):,} rows); {MASK_OPEN}...{MASK_CLOSE} = not a training target")
    for line in render_row(ds[row], tok, meta["padding"]["id"], chars, tokens):
        log(line)
