"""Packed rows of real text for the sequence-parallel tests (dataset contract, DESIGN.md section 2).

WikiText-2 articles are tokenised with SentencePiece's own small test model (vocab 1000),
given BOS/EOS, concatenated and cut into rows of ``seq_len``: documents cross row boundaries
(a piece per row) and, once sharded, slice boundaries. ``short_docs`` splits articles into
paragraph-sized documents so a row holds several of them.
"""
from __future__ import annotations

import json

from tests.conftest import shared_file

VOCAB = 1000
LIMITS = (60, 200, 25, 120, 45)  # characters per short document, cycled


def real_rows(seq_len: int, n_rows: int, short_docs: bool = True) -> list[dict]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(shared_file("tokenizers", "spm_botchan_test_model.model")))
    lines = shared_file("corpora", "wikitext2_valid.jsonl").read_text(encoding="utf-8").splitlines()
    docs = []
    for line in lines:
        text = json.loads(line)["text"]
        parts = [p for p in text.split("\n") if len(p.strip()) > 40] if short_docs else [text]
        for part in parts:
            limit = LIMITS[len(docs) % len(LIMITS)] if short_docs else None  # mixed document lengths
            docs.append([sp.bos_id()] + sp.encode(part[:limit]) + [sp.eos_id()])
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
