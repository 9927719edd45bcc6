"""``prepare`` on the real corpora and tokenizers of ../shared/data (skipped when absent)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tests.support.paths import shared_file

from tests.support.dataset_checks import check_row_structure, document_pairs, minus, read_rows, segments, target_pairs
from .test_prepare import arrow_bytes, reference_docs, run_prepare

SEQ_LEN = 1024


@pytest.fixture(scope="module")
def real():
    return {"tok": shared_file("tokenizers", "open_llama_tokenizer.model"),
            "wiki": shared_file("corpora", "wikitext2_valid.jsonl"),
            "frankenstein": shared_file("corpora", "frankenstein.txt"),
            "botchan": shared_file("corpora", "botchan.txt")}


@pytest.mark.parametrize("strategy,stride", [("concat", None), ("best-fit", None), ("slide-window", 768)])
def test_real_corpus_invariants(tmp_path, real, strategy, stride):
    inputs = [real["wiki"], real["frankenstein"]]
    meta = run_prepare(tmp_path / "out", inputs, real["tok"], strategy=strategy, stride=stride, seq_len=SEQ_LEN)
    train = meta["splits"]["train"]
    rows = read_rows(tmp_path / "out")
    check_row_structure(rows, SEQ_LEN, meta["padding"]["id"], train)
    docs = reference_docs(inputs, real["tok"])
    assert meta["counts"]["tokens_read"] == sum(map(len, docs)) > 350_000
    assert train["documents_split"] > 40, "guard: most documents are longer than a row"
    want, got = document_pairs(docs), target_pairs(rows)
    missing = minus(want, got)
    assert sum(missing.values()) == train["lost_target_tokens"]
    if strategy == "concat":
        assert train["lost_target_tokens"] == len(rows) - 1 - sum(  # every row start but a document start
            1 for ids, _, _ in rows[1:] if ids[0] == 1)
    else:
        assert not missing and np.array_equal(want, got), "every token but a document's first, once"
        assert train["repeated_context_tokens"] > 0
        short = [tuple(d.tolist()) for d in docs if len(d) <= SEQ_LEN]
        whole = {tuple(t.tolist()) for _, _, t, _, _ in segments(rows)}
        assert short and all(d in whole for d in short), "a document shorter than seq_len was split"
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(real["tok"].read_bytes()).hexdigest()
    if strategy == "best-fit":  # best-fit needs no more rows than concat (Ding et al.'s point)
        concat_rows = -(-(sum(map(len, docs))) // SEQ_LEN)
        assert train["rows"] <= concat_rows * 1.001 + 1, (train["rows"], concat_rows)


def test_real_mixture_and_determinism(tmp_path, real):
    inputs = [f"{real['wiki']}:0.5", f"{real['botchan']}:1.5", f"{real['frankenstein']}:0.25"]
    meta = run_prepare(tmp_path / "a", inputs, real["tok"], seq_len=SEQ_LEN, val_fraction=0.1, seed=1)
    for src, w in zip(meta["sources"], (0.5, 1.5, 0.25)):
        assert abs(src["weight_realized"] / w - 1) < 0.01, src
        assert src["tokens_train_in"] > 50_000
    run_prepare(tmp_path / "b", inputs, real["tok"], seq_len=SEQ_LEN, val_fraction=0.1, seed=1, num_proc=2)
    assert arrow_bytes(tmp_path / "a") == arrow_bytes(tmp_path / "b")
    assert arrow_bytes(tmp_path / "a", "validation") == arrow_bytes(tmp_path / "b", "validation")
    assert meta["counts"]["documents_validation"] > 0
