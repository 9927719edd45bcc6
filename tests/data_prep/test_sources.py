"""Input kinds and how they are found: JSONL (+gz), Parquet, text files, folders and globs,
datasets folders; ``PATH[:WEIGHT]`` parsing."""
from __future__ import annotations

import gzip
import json

import pytest

from data_prep.errors import DataPrepError
from data_prep.sources import InputSpec, ReadOptions, iter_documents, parse_input_spec, resolve_source


def docs_of(path, **opts):
    source = resolve_source(parse_input_spec(str(path)), 0)
    return source, list(iter_documents(source, ReadOptions(**opts)))


def test_parse_input_spec(tmp_path):
    assert parse_input_spec("a/b.jsonl") == InputSpec("a/b.jsonl", 1.0)
    assert parse_input_spec("a/b.jsonl:0.5") == InputSpec("a/b.jsonl", 0.5)
    assert parse_input_spec("src/**/*.py:2") == InputSpec("src/**/*.py", 2.0)
    assert parse_input_spec("C:notanumber") == InputSpec("C:notanumber", 1.0)
    odd = tmp_path / "name:2"
    odd.write_text("x")
    assert parse_input_spec(str(odd)) == InputSpec(str(odd), 1.0), "an existing path wins over a weight"
    for bad in ("x.jsonl:0", "x.jsonl:-1", "x.jsonl:nan", "x.jsonl:inf"):
        with pytest.raises(DataPrepError, match="positive number"):
            parse_input_spec(bad)


def test_jsonl_fields_bom_and_gzip(tmp_path):
    rows = [{"id": 7, "content": "first"}, {"id": 8, "content": "second"}]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode() + b"\n\n")
    source, docs = docs_of(plain, text_field="content", id_field="id")
    assert [(d.text, d.doc_id, d.where) for d in docs[:2]] == [("first", "7", f"{plain}:1"), ("second", "8", f"{plain}:2")]
    assert docs[2].text is None and docs[2].bad is None, "a blank line is not a document"
    assert source.total_bytes == plain.stat().st_size
    packed = tmp_path / "b.jsonl.gz"
    with gzip.open(packed, "wb") as f:
        f.write("\n".join(json.dumps(r) for r in rows).encode())
    _, docs = docs_of(packed, text_field="content")
    assert [d.text for d in docs] == ["first", "second"]


def test_plain_text_file_is_one_document_without_bom(tmp_path):
    f = tmp_path / "book.txt"
    f.write_bytes(b"\xef\xbb\xbfChapter 1\r\n\r\nIt was a dark night.\rThe end.\n")
    _, docs = docs_of(f)
    assert len(docs) == 1 and docs[0].text == "Chapter 1\n\nIt was a dark night.\nThe end.\n" and docs[0].where == str(f)


def test_folder_and_glob(tmp_path):
    root = tmp_path / "repo"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "pkg" / "b.py").write_text("b = 2\n")
    (root / "pkg" / "sub" / "c.py").write_text("c = 3\n")
    (root / "a.py").write_text("a = 1\n")
    (root / "README.md").write_text("# readme\n")
    (root / ".git" / "config").write_text("[core]\n")
    (root / ".hidden.py").write_text("h = 0\n")
    (root / "data.jsonl").write_text('{"text": "from jsonl"}\n')
    source, docs = docs_of(root)
    assert source.kind == "glob" and source.hidden_ignored == 2
    assert [d.text for d in docs] == ["# readme\n", "a = 1\n", "from jsonl", "b = 2\n", "c = 3\n"], "sorted paths"
    source, docs = docs_of(f"{root}/**/*.py")
    assert [d.text for d in docs] == ["a = 1\n", "b = 2\n", "c = 3\n"] and source.hidden_ignored == 1
    _, docs = docs_of(f"{root}/*.py")
    assert [d.text for d in docs] == ["a = 1\n"]
    with pytest.raises(DataPrepError, match=r"matches no file"):
        resolve_source(InputSpec(f"{root}/**/*.rs"), 0)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", None, "three"], "n": [1, 2, 3]}), path)
    _, docs = docs_of(path)
    assert docs[0].text == "one" and docs[1].bad.reason == "missing_text_field" and docs[2].text == "three"
    assert docs[1].where == f"{path} row 1"
    with pytest.raises(DataPrepError, match=r"no column 'body' \(columns: text, n\)"):
        docs_of(path, text_field="body")


def test_datasets_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", "", "gamma"], "idx": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    source, docs = docs_of(tmp_path / "ds", id_field="idx")
    assert source.kind == "datasets" and [d.text for d in docs] == ["alpha", None, "gamma"]
    assert docs[1].bad.reason == "empty" and docs[2].doc_id == "2"
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataPrepError, match=r"DatasetDict with splits \['test', 'train'\]"):
        resolve_source(InputSpec(str(tmp_path / "dd")), 0)
    _, docs = docs_of(tmp_path / "dd" / "train")
    assert docs[0].text == "alpha"
