"""--data inputs: text files, folders, JSONL, and prepared dataset folders (DESIGN.md section 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from longtrain.eval.data import read_data, tokenize_documents
from longtrain.eval.loading import load_tokenizer


def test_text_folder_and_jsonl(tmp_path, stdlib_spm):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("\ufeffFirst document.", encoding="utf-8")  # BOM dropped
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "Second."}\n\n{"text": "Third."}\n')
    (tmp_path / "sub" / "c.py").write_text("x = 1\n")
    (tmp_path / ".hidden.txt").write_text("ignored")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\xff")  # binary: skipped inside a folder
    # As `longtrain prepare`: a binary file stops the read, naming it, unless --skip-bad (counted)
    with pytest.raises(ValueError, match=r"blob.bin: binary file .*\[binary_file\].* --skip-bad"):
        read_data([str(tmp_path)])
    data = read_data([str(tmp_path)], skip_bad=True)
    assert data.texts == ["First document.", "Second.", "Third.", "x = 1\n"]
    assert data.describe()["skipped"] == {"binary_file": 1}
    assert read_data([str(tmp_path / "**" / "*.py")]).texts == ["x = 1\n"]
    with pytest.raises(ValueError, match="blob.bin: binary file"):  # named explicitly: an error
        read_data([str(tmp_path / "blob.bin")])
    tok = load_tokenizer(stdlib_spm)
    docs = tokenize_documents(data, tok)
    assert [d[0] for d in docs] == [tok.bos_id] * 4  # BOS added explicitly
    assert tok.decode(docs[0][1:]) == "First document."


def test_bad_jsonl_line_is_named(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: no field 'text' \(fields: body\) \[missing_text_field\]"):
        read_data([str(bad)])


def _prepared(folder, rows, seq_len, tokenizer_meta):
    from datasets import Dataset

    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"format": 1, "seq_len": seq_len, "tokenizer": tokenizer_meta}))
    Dataset.from_dict({
        "input_ids": [np.asarray(r[0], np.int32) for r in rows],
        "doc_lens": [np.asarray(r[1], np.int32) for r in rows],
        "loss_mask": [np.asarray(r[2], np.uint8) for r in rows],
    }).save_to_disk(str(folder / "validation"))
    return folder


def test_prepared_dataset_segments_become_pieces(tmp_path, stdlib_spm):
    tok = load_tokenizer(stdlib_spm)
    rows = [
        (list(range(10, 18)), [8], [1] * 8),  # one segment filling the row
        ([5, 6, 7, 20, 21, 0, 0, 0], [3, 2, 3], [1, 1, 1, 1, 1, 0, 0, 0]),  # two documents + padding
    ]
    ident = {"kind": "sentencepiece", "vocab_size": tok.vocab_size, "sha256": tok.sha256, "bos_id": 1}
    folder = _prepared(tmp_path / "ds", rows, 8, ident)
    data = read_data([str(folder)])
    docs = tokenize_documents(data, tok)
    assert [d.tolist() for d in docs] == [list(range(10, 18)), [5, 6, 7], [20, 21]]

    other = _prepared(tmp_path / "ds2", rows, 8, {"vocab_size": 32000})
    with pytest.raises(ValueError, match=r"meta.json: tokenizer.vocab_size = 32000"):
        tokenize_documents(read_data([str(other)]), tok)


def test_dataset_from_longtrain_prepare(tmp_path, trained_folder, stdlib_spm, book_text):
    """The real data-prep output: slide-window rows of seq_len evaluate at seq_len."""
    from longtrain.cli import main as longtrain_main
    from longtrain.eval.loading import load_eval_model
    from longtrain.eval.perplexity import perplexity_at_length

    docs = tmp_path / "docs.jsonl"
    text = book_text[300_000:460_000]
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": text[i * 20000:(i + 1) * 20000]}) + "\n"
                            for i in range(8)))
    ds = tmp_path / "ds"
    assert longtrain_main(["prepare", "--input", str(docs), "--tokenizer", str(trained_folder / "tokenizer.model"),
                           "--seq-len", "128", "--strategy", "slide-window", "--val-fraction", "0.5",
                           "--out", str(ds), "--no-plot", "--no-progress"]) == 0
    model = load_eval_model(str(trained_folder))
    pieces = tokenize_documents(read_data([str(ds)]), model.tokenizer)
    assert len(pieces) > 100 and {len(p) for p in pieces} == {128}
    res = perplexity_at_length(model.model, pieces, 128, progress=False)
    assert res["windows"] == len(pieces) and res["tokens"] == 127 * len(pieces)
    raw = tokenize_documents(read_data([str(docs)]), model.tokenizer)
    ref = perplexity_at_length(model.model, raw, 128, progress=False)
    assert abs(res["ppl"] / ref["ppl"] - 1) < 0.2, (res["ppl"], ref["ppl"])  # same text, same model

    other = load_tokenizer(stdlib_spm)
    with pytest.raises(ValueError, match=r"meta.json: tokenizer.sha256 = "):
        tokenize_documents(read_data([str(ds)]), other)
