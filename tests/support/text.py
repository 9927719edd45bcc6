"""Real text for tests, present on every machine or in ../shared/data, and tokenizers trained in-test.

- the Python standard library's own sources (code and docstrings, with long-range repetition);
- ``real_rows``: packed rows of standard-library text for the sequence-parallel tests (dataset
  contract, DESIGN.md section 2), so they run on every machine. Paragraphs are tokenised with a
  SentencePiece model trained here on the same text (vocab 1000, under a second), given BOS/EOS,
  concatenated and cut into rows of ``seq_len``: documents cross row boundaries (a piece per row)
  and, once sharded, slice boundaries. ``short_docs`` cuts paragraphs to mixed short lengths so a
  row holds several documents.
"""
from __future__ import annotations

import functools
import io
import sysconfig
from pathlib import Path


# A fixed, version-robust subset of the standard library (~1 MB of code and docstrings).
STDLIB_PACKAGES = ("json", "email", "http", "logging", "unittest")
# ../shared/data's Pride and Prejudice: the eval tests' tiny model trains on this prefix, the CLI test
# evaluates on the held-out slice.
BOOK_TRAIN_CHARS = 12000
BOOK_HELDOUT = slice(300000, 330000)


def stdlib_corpus() -> list[str]:
    """``longtrain prepare --input`` globs of the STDLIB_PACKAGES sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / pkg / "**" / "*.py") for pkg in STDLIB_PACKAGES if (stdlib / pkg).is_dir()]


def stdlib_text(max_chars: int = 200_000) -> str:
    """A few top-level standard-library modules as one text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in ("argparse.py", "dataclasses.py", "inspect.py", "random.py", "textwrap.py"):
        text = (root / name).read_text(encoding="utf-8")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def train_spm(lines: list[str], vocab_size: int = 1024) -> bytes:
    """A small BPE SentencePiece model; byte fallback so that every digit is representable."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        minloglevel=2, num_threads=1)
    return buf.getvalue()

VOCAB = 1000
LIMITS = (60, 200, 25, 120, 45)  # characters per short document, cycled


@functools.lru_cache(maxsize=1)
def _stdlib_sp():
    import sentencepiece as spm

    text = stdlib_text()
    return spm.SentencePieceProcessor(model_proto=train_spm([l for l in text.splitlines() if l.strip()], VOCAB))


def real_rows(seq_len: int, n_rows: int, short_docs: bool = True) -> list[dict]:
    sp = _stdlib_sp()
    paragraphs = [p for p in stdlib_text().split("\n\n") if len(p.strip()) > 40]
    docs = []
    for text in paragraphs:
        limit = LIMITS[len(docs) % len(LIMITS)] if short_docs else None  # mixed document lengths
        docs.append([sp.bos_id()] + sp.encode(text[:limit]) + [sp.eos_id()])
        if sum(map(len, docs)) > seq_len * n_rows:
            break
    rows, ids, lens = [], [], []
    for doc in docs:
        while doc:
            take = min(len(doc), seq_len - len(ids))
            ids += doc[:take]
            lens.append(take)
            doc = doc[take:]
            if len(ids) == seq_len:
                rows.append({"input_ids": ids, "doc_lens": lens, "loss_mask": [1] * seq_len})
                ids, lens = [], []
                if len(rows) == n_rows:
                    return rows
    raise AssertionError("not enough text for the requested rows")
