"""End-to-end ``prepare`` on generated corpora (always run): strategies, determinism, mixture,
validation split, output folder rules, meta.json."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.prepare import PrepareConfig, prepare
from data_prep.sources import parse_input_spec
from data_prep.tokenizer import Tokenizer, tokenizer_identity

from tests.support.dataset_checks import check_row_structure, document_pairs, minus, read_rows, segments, target_pairs

SEQ_LEN = 64


def run_prepare(out: Path, inputs, tokenizer, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("plot", False)
    kw.setdefault("seq_len", SEQ_LEN)
    cfg = PrepareConfig(inputs=[parse_input_spec(str(i)) for i in inputs], tokenizer=str(tokenizer), out=str(out), **kw)
    return prepare(cfg, log=lambda *_: None)


def reference_docs(paths, tokenizer, add_bos=True, add_eos=True) -> list[np.ndarray]:
    """Tokenize the documents independently of the pipeline's readers."""
    texts = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".jsonl":
            texts += [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            texts.append(p.read_text(encoding="utf-8-sig"))  # no byte order mark, \r\n read as \n
    return Tokenizer(tokenizer).encode_batch(texts, add_bos, add_eos)


def arrow_bytes(folder: Path, split: str = "train") -> bytes:
    return b"".join(p.read_bytes() for p in sorted((folder / split).glob("*.arrow")))


@pytest.mark.parametrize("strategy,stride", [("concat", None), ("best-fit", None), ("slide-window", 16),
                                             ("slide-window", 63), ("slide-window", 64)])
def test_strategy_end_to_end(tmp_path, corpus, tiny_tokenizer, strategy, stride):
    inputs = [corpus["jsonl"], corpus["book"]]
    meta = run_prepare(tmp_path / "out", inputs, tiny_tokenizer, strategy=strategy, stride=stride)
    train = meta["splits"]["train"]
    rows = read_rows(tmp_path / "out")
    check_row_structure(rows, SEQ_LEN, meta["padding"]["id"], train)
    docs = reference_docs(inputs, tiny_tokenizer)
    assert meta["counts"]["documents_train"] == len(docs) and train["document_first_tokens"] == len(docs)
    # Guards: long documents exist, rows hold several documents.
    assert train["documents_split"] > 0 and sum(len(d) > SEQ_LEN for d in docs) > 3
    assert max(Counter(r for r, *_ in segments(rows)).values()) >= 3
    want, got = document_pairs(docs), target_pairs(rows)
    missing = minus(want, got)
    assert not minus(got, want), "a target that is not (token, next token) of some document"
    assert sum(missing.values()) == train["lost_target_tokens"]
    if strategy == "concat":
        assert train["lost_target_tokens"] > 0, "guard: some document must continue in the next row"
        starts = Counter()  # pieces continuing at a row start: (last token of previous row, first of this row)
        for prev, row in zip(rows, rows[1:]):
            if row[0][0] != Tokenizer(tiny_tokenizer).bos_id:
                starts[(int(prev[0][-1]), int(row[0][0]))] += 1
        assert missing == starts, "lost targets are exactly the row-start continuations"
    elif stride != SEQ_LEN:
        assert not missing and train["lost_target_tokens"] == 0, "every token but a document's first, once"
        assert train["repeated_context_tokens"] > 0, "guard: no overlap exercised"
    else:
        assert train["lost_target_tokens"] > 0
    if strategy != "concat":  # documents of up to seq_len tokens are rows' whole segments, never split
        pieces = Counter(tuple(t.tolist()) for _, _, t, m, _ in segments(rows))
        for d in docs:
            if len(d) <= SEQ_LEN:
                assert pieces[tuple(d.tolist())] > 0, "a short document was split"
                pieces[tuple(d.tolist())] -= 1
    if strategy == "slide-window":
        assert meta["stride"] == stride and "right-aligned" in meta["tail"]


def test_determinism_same_seed_same_bytes(tmp_path, corpus, tiny_tokenizer):
    inputs = [corpus["jsonl"], f"{corpus['code']}/**/*.py:1.5", f"{corpus['book']}:0.5"]
    kw = dict(strategy="best-fit", val_fraction=0.2, seed=7, pack_buffer_tokens=2000)
    meta_a = run_prepare(tmp_path / "a", inputs, tiny_tokenizer, **kw)
    run_prepare(tmp_path / "b", inputs, tiny_tokenizer, **kw)
    run_prepare(tmp_path / "c", inputs, tiny_tokenizer, num_proc=2, **kw)
    run_prepare(tmp_path / "d", inputs, tiny_tokenizer, **{**kw, "seed": 8})
    a = arrow_bytes(tmp_path / "a")
    assert meta_a["splits"]["train"]["rows"] > 20 and meta_a["counts"]["documents_validation"] > 5
    assert a == arrow_bytes(tmp_path / "b") and a == arrow_bytes(tmp_path / "c"), "same seed: same bytes"
    assert arrow_bytes(tmp_path / "a", "validation") == arrow_bytes(tmp_path / "c", "validation")
    assert (tmp_path / "a" / "meta.json").read_text() == (tmp_path / "b" / "meta.json").read_text()
    assert a != arrow_bytes(tmp_path / "d"), "guard: the seed must matter"


def test_mixture_weights_realized_within_one_percent(tmp_path, corpus, tiny_tokenizer):
    weights = {"jsonl": 0.3, "code": 2.5, "book": 2.0}
    inputs = [f"{corpus['jsonl']}:0.3", f"{corpus['code']}/**/*.py:2.5", f"{corpus['book']}:2.0"]
    meta = run_prepare(tmp_path / "out", inputs, tiny_tokenizer, strategy="concat")
    rows = read_rows(tmp_path / "out")
    for src, (name, w) in zip(meta["sources"], weights.items()):
        assert abs(src["tokens_train_out"] / src["tokens_train_in"] / w - 1) < 0.01, (name, src)
        assert abs(src["weight_realized"] / w - 1) < 0.01
    docs = reference_docs([corpus["jsonl"]], tiny_tokenizer)
    assert meta["sources"][0]["tokens_train_in"] == sum(map(len, docs)), "tokens in = the source's tokenization"
    assert meta["sources"][2]["tokens_train_out"] == 2 * meta["sources"][2]["tokens_train_in"], "2.0 = twice"
    # What the rows hold is what the weights produced (concat adds no overlap).
    placed = sum(SEQ_LEN for _ in rows) - meta["splits"]["train"]["padding_tokens"]
    assert placed == sum(s["tokens_train_out"] for s in meta["sources"])
    # A down-weighted source keeps whole documents (at most one is cut to hit the weight).
    assert meta["sources"][0]["documents_cut_by_weight"] <= 1


def test_validation_split_by_documents(tmp_path, corpus, tiny_tokenizer):
    meta = run_prepare(tmp_path / "out", [corpus["jsonl"]], tiny_tokenizer, strategy="best-fit",
                       val_fraction=0.25, id_field="id", seed=3)
    c = meta["counts"]
    assert c["documents_train"] + c["documents_validation"] == c["documents_read"] == 120
    assert 15 <= c["documents_validation"] <= 45
    train, val = read_rows(tmp_path / "out"), read_rows(tmp_path / "out", "validation")
    check_row_structure(val, SEQ_LEN, meta["padding"]["id"], meta["splits"]["validation"])
    docs = reference_docs([corpus["jsonl"]], tiny_tokenizer)
    both = np.sort(np.concatenate([target_pairs(train), target_pairs(val)]))
    assert np.array_equal(both, document_pairs(docs)), "each document in exactly one split"
    # Keyed by --id-field: a reordered corpus splits the same documents the same way.
    lines = corpus["jsonl"].read_text().splitlines()
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("\n".join(reversed(lines)) + "\n")
    meta2 = run_prepare(tmp_path / "out2", [reordered], tiny_tokenizer, strategy="best-fit", val_fraction=0.25,
                        id_field="id", seed=3)
    assert np.array_equal(target_pairs(read_rows(tmp_path / "out2", "validation")), target_pairs(val))
    assert meta2["counts"]["documents_validation"] == c["documents_validation"]


def test_meta_json_contract(tmp_path, corpus, tiny_tokenizer, capsys):
    meta = run_prepare(tmp_path / "out", [corpus["jsonl"]], tiny_tokenizer, strategy="best-fit", plot=True,
                       progress=True)
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta
    tok = meta["tokenizer"]
    assert tok == tokenizer_identity(tiny_tokenizer)
    assert tok["sha256"] == hashlib.sha256(Path(tiny_tokenizer).read_bytes()).hexdigest()
    assert tok["kind"] == "sentencepiece" and tok["vocab_size"] == 400
    assert (tok["bos_id"], tok["eos_id"], tok["pad_id"]) == (1, 2, 3)
    assert meta["add_bos"] is True and meta["add_eos"] is True
    assert meta["padding"] == {"id": 3, "source": "pad"}
    assert meta["seq_len"] == SEQ_LEN and meta["format_version"] == 1 and meta["strategy"] == "best-fit"
    for key in ("documents_read", "documents_skipped", "documents_filtered", "documents_truncated", "tokens_read",
                "rows", "padding_tokens", "non_target_tokens"):
        assert key in meta["counts"]
    assert sum(meta["doc_length_histogram"]["counts"]) == 120
    assert (tmp_path / "out" / "stats.png").read_bytes()[:4] == b"\x89PNG"
    assert "tok/s" in capsys.readouterr().err, "the progress bar shows tokens/s"
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "out" / "train"))
    assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["loss_mask"].feature.dtype == "uint8"
    assert ds.features["doc_lens"].feature.dtype == "int32"
    rows = read_rows(tmp_path / "out")
    assert len(ds) == len(rows) and ds[5]["input_ids"] == rows[5][0].tolist() and ds[5]["doc_lens"] == rows[5][1]


def test_bos_eos_options(tmp_path, corpus, tiny_tokenizer):
    meta = run_prepare(tmp_path / "out", [corpus["jsonl"]], tiny_tokenizer, add_bos=False, add_eos=False,
                       strategy="concat")
    assert meta["add_bos"] is False and meta["add_eos"] is False
    rows = read_rows(tmp_path / "out")
    assert not any((ids == 1).any() or (ids[:len(ids) - meta["splits"]["train"]["padding_tokens"]] == 2).any()
                   for ids, _, _ in rows[:-1])
    docs = reference_docs([corpus["jsonl"]], tiny_tokenizer, add_bos=False, add_eos=False)
    assert sum(map(len, docs)) == meta["counts"]["tokens_read"]


def test_length_filters_and_truncation(tmp_path, corpus, tiny_tokenizer):
    docs = reference_docs([corpus["jsonl"]], tiny_tokenizer)
    meta = run_prepare(tmp_path / "a", [corpus["jsonl"]], tiny_tokenizer, min_tokens=10, max_tokens=300)
    f = meta["counts"]["documents_filtered"]
    assert f == {"min_tokens": sum(len(d) < 10 for d in docs), "max_tokens": sum(len(d) > 300 for d in docs)}
    assert f["min_tokens"] > 0 and f["max_tokens"] > 0, "guard: both filters must fire"
    meta = run_prepare(tmp_path / "b", [corpus["jsonl"]], tiny_tokenizer, max_tokens=300, truncate_long=True)
    assert meta["counts"]["documents_truncated"] == sum(len(d) > 300 for d in docs)
    assert meta["counts"]["tokens_truncated"] == sum(len(d) - 300 for d in docs if len(d) > 300)


def test_output_folder_rules(tmp_path, corpus, tiny_tokenizer):
    out = tmp_path / "out"
    run_prepare(out, [corpus["jsonl"]], tiny_tokenizer)
    with pytest.raises(DataPrepError, match="already holds a prepared dataset; pass --overwrite"):
        run_prepare(out, [corpus["jsonl"]], tiny_tokenizer)
    meta = run_prepare(out, [corpus["book"]], tiny_tokenizer, overwrite=True)
    assert meta["counts"]["documents_read"] == 1 and json.loads((out / "meta.json").read_text()) == meta
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataPrepError, match="holds no prepared dataset"):
        run_prepare(other, [corpus["jsonl"]], tiny_tokenizer, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    # A run that fails half-way leaves neither the output nor its temporary folder.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus["jsonl"].read_text() + "{not json\n")
    with pytest.raises(DataPrepError, match=r"bad.jsonl:121"):
        run_prepare(tmp_path / "new", [bad], tiny_tokenizer)
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".new*")), "a temporary folder was left behind"


def test_config_errors_name_the_option(tmp_path, corpus, tiny_tokenizer):
    cases = [({"seq_len": 1}, "--seq-len"), ({"strategy": "slide-window", "stride": 0}, "--stride"),
             ({"strategy": "slide-window", "stride": SEQ_LEN + 1}, "--stride"), ({"stride": 4}, "--stride"),
             ({"strategy": "pack"}, "--strategy"), ({"val_fraction": 1.0}, "--val-fraction"),
             ({"num_proc": 0}, "--num-proc"), ({"truncate_long": True}, "--truncate-long")]
    for kw, option in cases:
        with pytest.raises(DataPrepError, match=option):
            run_prepare(tmp_path / "x", [corpus["jsonl"]], tiny_tokenizer, **kw)
    assert not (tmp_path / "x").exists()


def test_empty_validation_split_is_a_warning(tmp_path, corpus, tiny_tokenizer):
    meta = run_prepare(tmp_path / "out", [corpus["book"]], tiny_tokenizer, val_fraction=0.01)
    assert "validation" not in meta["splits"] and not (tmp_path / "out" / "validation").exists()
    assert any("no document went to the validation split" in w for w in meta["warnings"])
    assert meta["counts"]["documents_train"] == 1
