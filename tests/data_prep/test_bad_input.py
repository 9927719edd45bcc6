"""Every kind of bad input: by default a one-line error naming the file and line and what to do
(exit 1, no traceback); with --skip-bad the document is skipped and counted by reason."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.cli import prepare_main

GOOD = [json.dumps({"text": f"The river was quiet in the morning, number {i}."}) for i in range(6)]


def run(capsys, tmp_path, inputs, tokenizer, *extra, out="out"):
    argv = [a for i in inputs for a in ("--input", str(i))]
    argv += ["--tokenizer", str(tokenizer), "--seq-len", "32", "--out", str(tmp_path / out), "--no-progress",
             "--no-plot", *extra]
    code = prepare_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD_LINES = {  # reason -> (line bytes, expected words in the message)
    "invalid_json": (b'{"text": "unterminated', "invalid JSON"),
    "missing_text_field": (b'{"body": "text under another name", "id": 3}', "no field 'text' (fields: body, id)"),
    "not_utf8": (b'{"text": "caf\xe9 au lait"}', "invalid UTF-8 byte at column 14"),
    "empty": (b'{"text": "   "}', "empty document"),
    "text_not_string": (b'{"text": 42}', "holds a int"),
    "not_an_object": (b'["text", "in a list"]', "not an object"),
    "too_large": (b'{"text": "' + b"long " * 400 + b'"}', "exceeds --max-doc-bytes 1000"),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_jsonl_line_stops_with_file_and_line(capsys, tmp_path, tiny_tokenizer, reason):
    line, words = BAD_LINES[reason]
    data = write_lines(tmp_path / "data.jsonl", [g.encode() for g in GOOD[:3]] + [line] + [GOOD[3].encode()])
    code, out, err = run(capsys, tmp_path, [data], tiny_tokenizer, "--max-doc-bytes", "1000")
    assert code == 2
    assert f"data.jsonl:4: " in err and words in err and f"[{reason}]" in err, err
    assert "--skip-bad" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_skip_bad_counts_every_reason(capsys, tmp_path, tiny_tokenizer):
    lines = [g.encode() for g in GOOD]
    for line, _ in BAD_LINES.values():
        lines.insert(2, line)
    lines.insert(1, b"")  # a blank line is not a document, but it is counted
    data = write_lines(tmp_path / "data.jsonl", lines)
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.py").write_text("def f():\n    return 1\n")
    (folder / "b.py").write_bytes(b"\x7fELF\x00\x00binary" * 10)
    (folder / "c.py").write_bytes(b"x = 'caf\xe9'\n# line two\n")
    (folder / "d.py").write_text("")
    code, out, err = run(capsys, tmp_path, [data, folder], tiny_tokenizer, "--max-doc-bytes", "1000", "--skip-bad")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    skipped = meta["counts"]["documents_skipped"]
    assert skipped == {**{r: 1 for r in BAD_LINES}, "binary_file": 1, "not_utf8": 2, "empty": 2}
    assert meta["counts"]["blank_lines"] == 1
    assert meta["counts"]["documents_read"] == len(GOOD) + len(BAD_LINES) + 4
    assert meta["counts"]["documents_train"] == len(GOOD) + 1
    assert meta["sources"][1]["skipped"] == {"binary_file": 1, "not_utf8": 1, "empty": 1}
    assert "skipped" in out and "binary_file" in out, "the report lists what was skipped"


def test_text_file_errors_name_file_and_line(capsys, tmp_path, tiny_tokenizer):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "ok.py").write_text("print('ok')\n")
    (folder / "latin1.py").write_bytes(b"line one\nline two\nname = 'Andr\xe9'\n")
    code, _, err = run(capsys, tmp_path, [f"{folder}/*.py"], tiny_tokenizer)
    assert code == 2 and "latin1.py:3: invalid UTF-8 byte" in err and "Re-encode the file as UTF-8" in err
    (folder / "latin1.py").unlink()
    (folder / "image.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    code, _, err = run(capsys, tmp_path, [folder], tiny_tokenizer)
    assert code == 2 and "image.py: binary file" in err and "narrower glob" in err
    (folder / "image.py").unlink()
    (folder / "huge.py").write_text("x = 1  # " + "y" * 5000)  # a single huge line
    code, _, err = run(capsys, tmp_path, [folder], tiny_tokenizer, "--max-doc-bytes", "4096")
    assert code == 2 and "huge.py: file of 5009 bytes exceeds --max-doc-bytes 4096" in err
    (folder / "huge.py").write_text("")
    code, _, err = run(capsys, tmp_path, [folder], tiny_tokenizer)
    assert code == 2 and "huge.py: empty document" in err


def test_huge_jsonl_line_is_never_read_whole(tmp_path):
    from data_prep.sources import InputSpec, ReadOptions, iter_documents, resolve_source

    data = tmp_path / "big.jsonl"
    with open(data, "wb") as f:
        f.write(GOOD[0].encode() + b"\n")
        f.write(b'{"text": "' + b"a" * (8 << 20) + b'"}\n')  # 8 MiB on one line
        f.write(GOOD[1].encode() + b"\n")
    docs = list(iter_documents(resolve_source(InputSpec(str(data)), 0), ReadOptions(max_doc_bytes=1 << 16)))
    assert [d.bad.reason if d.bad else "ok" for d in docs] == ["ok", "too_large", "ok"]
    assert docs[1].where.endswith("big.jsonl:2") and docs[2].where.endswith("big.jsonl:3")


@pytest.mark.parametrize("spec,words", [("missing.jsonl", "no such file or folder"),
                                        ("src/*.rs", "matches no file"), ("nodir/*.py", "does not exist")])
def test_missing_input_is_an_error_even_with_skip_bad(capsys, tmp_path, tiny_tokenizer, spec, words):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    code, _, err = run(capsys, tmp_path, [tmp_path / spec], tiny_tokenizer, "--skip-bad")
    assert code == 2 and words in err and str(tmp_path / spec.split("/")[0]) in err and "Traceback" not in err


def test_tokenizer_that_does_not_load(capsys, tmp_path, tiny_tokenizer):
    data = write_lines(tmp_path / "d.jsonl", [g.encode() for g in GOOD])
    garbage = tmp_path / "broken.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    code, _, err = run(capsys, tmp_path, [data], garbage)
    assert code == 2 and "could not load" in err and "broken.model" in err and "SentencePiece .model" in err
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{}")
    code, _, err = run(capsys, tmp_path, [data], bad_json)
    assert code == 2 and "could not load" in err and "tokenizer.json" in err
    code, _, err = run(capsys, tmp_path, [data], tmp_path / "nope.model")
    assert code == 2 and "tokenizer not found" in err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    code, _, err = run(capsys, tmp_path, [data], empty)
    assert code == 2 and "neither tokenizer.json nor tokenizer.model" in err


@pytest.mark.parametrize("extra,words", [
    (["--seq-len", "1"], "--seq-len: 1 is too small"),
    (["--strategy", "slide-window", "--stride", "0"], "--stride: 0 must be between 1 and --seq-len"),
    (["--strategy", "slide-window", "--stride", "33"], "--stride: 33 must be between 1 and --seq-len (32)"),
    (["--strategy", "slide-window", "--stride", "-4"], "--stride: -4"),
    (["--input", "x.jsonl:-1"], "the weight must be a positive number"),
])
def test_bad_options(capsys, tmp_path, tiny_tokenizer, extra, words):
    data = write_lines(tmp_path / "d.jsonl", [g.encode() for g in GOOD])
    code, _, err = run(capsys, tmp_path, [data], tiny_tokenizer, *extra)
    assert code == 2 and words in err and "Traceback" not in err, err


def test_usage_error_exit_code_2(capsys, tmp_path, tiny_tokenizer):
    assert prepare_main(["--tokenizer", str(tiny_tokenizer)]) == 2
    assert "required" in capsys.readouterr().err


def test_existing_dataset_refused_unless_overwrite(capsys, tmp_path, tiny_tokenizer):
    data = write_lines(tmp_path / "d.jsonl", [g.encode() for g in GOOD])
    assert run(capsys, tmp_path, [data], tiny_tokenizer)[0] == 0
    before = (tmp_path / "out" / "meta.json").read_text()
    code, _, err = run(capsys, tmp_path, [data], tiny_tokenizer, "--seq-len", "16")
    assert code == 2 and "already holds a prepared dataset; pass --overwrite" in err
    assert (tmp_path / "out" / "meta.json").read_text() == before
    code, _, err = run(capsys, tmp_path, [data], tiny_tokenizer, "--seq-len", "16", "--overwrite")
    assert code == 0 and json.loads((tmp_path / "out" / "meta.json").read_text())["seq_len"] == 16


def test_a_weight_that_is_not_a_number_is_named(capsys, tmp_path, tiny_tokenizer):
    data = write_lines(tmp_path / "d.jsonl", [g.encode() for g in GOOD])
    code, _, err = run(capsys, tmp_path, [f"{data}:abc"], tiny_tokenizer)
    assert code == 2 and f"--input {data}:abc: the weight 'abc' after the last ':' is not a number" in err, err
    code, _, err = run(capsys, tmp_path, [f"{tmp_path}/*.jsonl:x2"], tiny_tokenizer)  # a glob with a bad weight
    assert code == 2 and "the weight 'x2' after the last ':' is not a number" in err, err
    code, _, err = run(capsys, tmp_path, [tmp_path / "missing.jsonl:abc"], tiny_tokenizer)
    assert code == 2 and "no such file or folder (a weight after ':' must be a number)" in err, err


def test_overwrite_replaces_only_a_dataset(capsys, tmp_path, tiny_tokenizer):
    """--overwrite onto a dataset folder that also holds the user's files refuses, naming them, and
    deletes nothing; a folder holding only a dataset is replaced."""
    data = write_lines(tmp_path / "d.jsonl", [g.encode() for g in GOOD])
    assert run(capsys, tmp_path, [data], tiny_tokenizer)[0] == 0
    out = tmp_path / "out"
    (out / "notes.md").write_text("my notes")
    (out / "experiments").mkdir()
    (out / "experiments" / "run1.log").write_text("log")
    (out / "train" / "extra.bin").write_bytes(b"x")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code, _, err = run(capsys, tmp_path, [data], tiny_tokenizer, "--seq-len", "16", "--overwrite")
    assert code == 2 and "--overwrite replaces only a prepared dataset" in err, err
    assert "holds files prepare did not write: experiments/, notes.md, train/extra.bin;" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before, "nothing deleted"
    assert json.loads((out / "meta.json").read_text())["seq_len"] == 32
    for extra in ("notes.md", "experiments/run1.log", "experiments", "train/extra.bin"):
        path = out / extra
        path.rmdir() if path.is_dir() else path.unlink()
    code, _, err = run(capsys, tmp_path, [data], tiny_tokenizer, "--seq-len", "16", "--overwrite")
    assert code == 0 and json.loads((out / "meta.json").read_text())["seq_len"] == 16, err
