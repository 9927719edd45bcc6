"""eval reads and tokenizes text exactly as `longtrain prepare` does (data_prep.sources + Tokenizer):
the same line-ending, BOM and encoding rules, every input kind, the same bad-document errors."""
from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import prepare_main
from longtrain.cli import main as longtrain_main
from longtrain.eval.data import read_data, tokenize_documents
from longtrain.eval.loading import load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _stdlib_docs(n: int = 6) -> list[str]:
    """Real documents with indentation, blank lines, docstrings and digits."""
    files = ("textwrap.py", "colorsys.py", "bisect.py", "fnmatch.py", "keyword.py", "shlex.py")[:n]
    return [(STDLIB / name).read_text(encoding="utf-8") for name in files]


def test_crlf_file_and_its_lf_twin_give_the_same_tokens(tmp_path, stdlib_tokenizer):
    lf, crlf, mac = tmp_path / "lf", tmp_path / "crlf", tmp_path / "cr"
    for folder in (lf, crlf, mac):
        folder.mkdir()
    docs = _stdlib_docs()
    for i, text in enumerate(docs):
        (lf / f"{i}.py").write_bytes(text.encode("utf-8"))
        (crlf / f"{i}.py").write_bytes(b"\xef\xbb\xbf" * (i % 2) + text.replace("\n", "\r\n").encode("utf-8"))
        (mac / f"{i}.py").write_bytes(text.replace("\n", "\r").encode("utf-8"))  # old Mac line endings
    assert b"\r\n" in (crlf / "0.py").read_bytes() and b"\r\n" not in (lf / "0.py").read_bytes()
    tok = load_tokenizer(stdlib_tokenizer)
    want = tokenize_documents(read_data([str(lf)]), tok)
    for args in ([str(crlf)], [str(mac)], [str(crlf / "*.py")], [str(crlf / f"{i}.py") for i in range(len(docs))]):
        got = tokenize_documents(read_data(args), tok)
        assert [g.tolist() for g in got] == [w.tolist() for w in want], args
    assert [w[0] for w in want] == [tok.bos_id] * len(docs)  # BOS once, explicitly
    assert sum(map(len, want)) > 5000
    # Guard: this tokenizer does tell "\r\n" from "\n", so a reader that kept CRLF would fail above.
    raw = (crlf / "0.py").read_bytes().decode("utf-8")
    assert tok.encode(raw) != want[0][1:].tolist()


def _write_every_kind(folder: Path, docs: list[str], field: str) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    folder.mkdir()
    lines = "".join(json.dumps({field: d, "n": i}) + "\n" for i, d in enumerate(docs))
    paths = {"jsonl": folder / "docs.jsonl", "jsonl.gz": folder / "docs.jsonl.gz", "parquet": folder / "docs.parquet",
             "datasets": folder / "saved"}
    paths["jsonl"].write_text(lines, encoding="utf-8")
    with gzip.open(paths["jsonl.gz"], "wt", encoding="utf-8") as f:
        f.write(lines)
    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), paths["parquet"])
    Dataset.from_dict({field: docs}).save_to_disk(str(paths["datasets"]))
    return paths


def test_every_input_kind_prepare_reads(tmp_path, stdlib_spm):
    docs = _stdlib_docs(4)
    paths = _write_every_kind(tmp_path / "in", docs, "content")
    tok = load_tokenizer(stdlib_spm)
    want = [t.tolist() for t in tokenize_documents(read_data([str(paths["jsonl"])], text_field="content"), tok)]
    assert len(want) == 4 and want[0][0] == tok.bos_id
    for kind, path in paths.items():
        data = read_data([str(path)], text_field="content")
        assert data.texts == docs, kind
        assert [t.tolist() for t in tokenize_documents(data, tok)] == want, kind
    with pytest.raises(ValueError, match=r"docs.parquet: no column 'text' \(columns: content, n\).*--text-field"):
        read_data([str(paths["parquet"])])
    with pytest.raises(ValueError, match=r"docs.jsonl:1: no field 'text' \(fields: content, n\)"):
        read_data([str(paths["jsonl"])])
    # A mix of kinds and a plain text file, in the order given.
    (tmp_path / "note.txt").write_text("A plain text document.\n", encoding="utf-8")
    mixed = read_data([str(tmp_path / "note.txt"), str(paths["datasets"])], text_field="content")
    assert mixed.texts == ["A plain text document.\n", *docs]
    assert mixed.describe() == {"kind": "text", "sources": [str(tmp_path / "note.txt"), str(paths["datasets"])],
                                "documents": 5, "skipped": {}}


def _prepare_error(capsys, tmp_path, data: Path, tokenizer: Path) -> str:
    code = prepare_main(["--input", str(data), "--tokenizer", str(tokenizer), "--seq-len", "32",
                         "--out", str(tmp_path / "ds"), "--no-plot", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    return err.split("error: ", 1)[1].strip()


def _eval_error(capsys, tmp_path, args: list[str]) -> str:
    code = longtrain_main(["eval", str(tmp_path / "no-model-needed"), "--data", *args, "--out", str(tmp_path / "o"),
                           "--no-progress"])  # --data is read before any model is loaded
    err = capsys.readouterr().err
    assert code == 2, err
    return err.split("error: ", 1)[1].strip()


BAD_LINES = [
    (b'{"text": "fine"}', None),
    (b'{"text": "broken', "invalid_json"),
    (b'["a list"]', "not_an_object"),
    (b'{"body": "no text field"}', "missing_text_field"),
    (b'{"text": 42}', "text_not_string"),
    (b'{"text": "\xff\xfe bad bytes"}', "not_utf8"),
    (b'{"text": "   "}', "empty"),
]


@pytest.mark.parametrize("line,reason", [c for c in BAD_LINES if c[1]])
def test_bad_document_stops_with_prepares_error(capsys, tmp_path, stdlib_spm, line, reason):
    data = tmp_path / "docs.jsonl"
    data.write_bytes(b'{"text": "a good first document"}\n\n' + line + b"\n")
    message = _eval_error(capsys, tmp_path, [str(data)])
    assert message.startswith(f"{data}:3: ") and f"[{reason}]" in message and "--skip-bad" in message
    assert message == _prepare_error(capsys, tmp_path, data, stdlib_spm)  # word for word


def test_skip_bad_counts_like_prepare(capsys, tmp_path, stdlib_spm):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "docs.jsonl").write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    (folder / "blob.bin").write_bytes(b"\x00\x01binary")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / ".hidden.txt").write_text("left out, as prepare leaves it out")
    data = read_data([str(folder)], skip_bad=True)
    assert data.texts == ["fine"]
    assert prepare_main(["--input", str(folder), "--tokenizer", str(stdlib_spm), "--seq-len", "32", "--skip-bad",
                         "--out", str(tmp_path / "ds"), "--no-plot", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert data.skipped == meta["counts"]["documents_skipped"]
    assert sum(data.skipped.values()) == len(BAD_LINES) - 1 + 2  # every bad line, the binary and the latin-1 file


def test_input_errors_name_data(capsys, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert "--data " in _eval_error(capsys, tmp_path, [str(tmp_path / "missing.jsonl")])
    assert "no such file or folder" in _eval_error(capsys, tmp_path, [str(tmp_path / "missing.jsonl")])
    message = _eval_error(capsys, tmp_path, [f"{tmp_path}/*.parquet"])
    assert message.startswith(f"--data {tmp_path}/*.parquet: the glob '*.parquet'") and "matches no file" in message
    message = _eval_error(capsys, tmp_path, [f"{tmp_path / 'a.jsonl'}:2"])
    assert message.startswith(f"--data {tmp_path / 'a.jsonl'}:2: weights (PATH:WEIGHT)")


def test_datasets_dict_and_prepared_dataset_folders(tmp_path, stdlib_spm):
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_dict({"text": ["held out"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['validation'\]; pass one split's folder, "
                                         r"e.g. --data .*dd/validation"):
        read_data([str(tmp_path / "dd")])
    assert read_data([str(tmp_path / "dd" / "validation")]).texts == ["held out"]


def test_exported_folder_tokenizes_as_its_sentencepiece_model(tmp_path, stdlib_tokenizer):
    """An export holds tokenizer.json (converted) beside tokenizer.model; eval, like data prep, reads
    the tokenizer.json. Both give the ids training used, on real text with CRLF, unicode and digits."""
    from longtrain.export.tokenizer import write_tokenizer

    src, out = tmp_path / "run_tokenizer", tmp_path / "export"
    src.mkdir()
    out.mkdir()
    (src / "tokenizer.model").write_bytes(stdlib_tokenizer.read_bytes())
    write_tokenizer(src, out, add_bos=True, model_max_length=128)
    folder_tok, spm_tok = load_tokenizer(out), load_tokenizer(out / "tokenizer.model")
    assert (folder_tok.kind, spm_tok.kind) == ("hf", "sentencepiece")
    for key in ("vocab_size", "bos_id", "eos_id", "pad_id"):
        assert getattr(folder_tok, key) == getattr(spm_tok, key), key
    # A special token's string inside a text (WikiText spells "<unk>") is text to SentencePiece, and
    # must stay text to the export's tokenizer.json too (split_special_tokens).
    specials = "The <unk> river , a <unk> of </s> and <s> and <pad> . @-@ 1 @,@ 000"
    docs = _stdlib_docs() + [d.replace("\n", "\r\n") for d in _stdlib_docs(2)] + [
        "Prix 1 234,56 \u20ac, na\u00efve caf\u00e9, \u6771\u4eac 2026\u5e74, \U0001f642 0x1F 40712\t\t  end",
        specials]
    data = read_data([str(_jsonl(tmp_path / "docs.jsonl", docs))])
    assert [t.tolist() for t in tokenize_documents(data, folder_tok)] == \
        [t.tolist() for t in tokenize_documents(data, spm_tok)]
    want = spm_tok.encode(specials)
    assert folder_tok.unk_id not in want and want == folder_tok.encode(specials)  # guard: no special id
    from transformers import AutoTokenizer  # what users of the export load

    assert AutoTokenizer.from_pretrained(out)(specials, add_special_tokens=False)["input_ids"] == want


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_filler_reads_any_input_kind(tmp_path, stdlib_spm):
    from longtrain.eval.data import filler_tokens

    tok = load_tokenizer(stdlib_spm)
    paths = _write_every_kind(tmp_path / "in", _stdlib_docs(2), "text")
    streams = [filler_tokens(tokenize_documents(read_data([str(p)]), tok), tok) for p in paths.values()]
    assert all(np.array_equal(s, streams[0]) for s in streams) and tok.bos_id not in streams[0][:1]
