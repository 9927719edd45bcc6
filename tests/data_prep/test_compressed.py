"""Compressed inputs (gzip, bzip2, xz, zstd) read like plain ones, found by suffix or by magic bytes;
truncated or damaged ones are named with the position and, with --skip-bad, keep what came before."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil
from pathlib import Path

import pytest
import zstandard

from data_prep.cli import prepare_main
from data_prep.sources import InputSpec, ReadOptions, iter_documents, resolve_source

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda data: zstandard.ZstdCompressor(write_checksum=True).compress(data)}


def compress(src: Path, dest: Path) -> Path:
    dest.write_bytes(COMPRESS[dest.suffix](src.read_bytes()))
    return dest


def prepare(capsys, out: Path, inputs, tokenizer, *extra) -> tuple[int, str]:
    argv = [a for i in inputs for a in ("--input", str(i))]
    code = prepare_main(argv + ["--tokenizer", str(tokenizer), "--seq-len", "64", "--out", str(out), "--no-progress",
                                "--no-plot", *extra])
    return code, capsys.readouterr().err


def content(out: Path) -> str:
    """The fingerprint of the rows' content (writer.py hashes ids, doc_lens and mask)."""
    return json.loads((out / "train" / "state.json").read_text())["_fingerprint"]


def docs(path: Path, **opts) -> list:
    return list(iter_documents(resolve_source(InputSpec(str(path)), 0), ReadOptions(**opts)))


def test_compressed_inputs_give_the_same_rows(capsys, tmp_path, corpus, tiny_tokenizer):
    """JSONL, text files and a folder of text files, each compressed in every format, give the rows
    of the plain files byte for byte; the progress total is the bytes on disk."""
    plain_dir, packed_dir = tmp_path / "plain", tmp_path / "packed"
    shutil.copytree(corpus["code"], plain_dir)
    packed_dir.mkdir()
    for i, f in enumerate(sorted(p for p in plain_dir.rglob("*") if p.is_file())):  # every format in one folder
        compress(f, packed_dir / f"{f.relative_to(plain_dir).as_posix().replace('/', '_')}{list(COMPRESS)[i % 4]}")
    for f in sorted(plain_dir.rglob("*")):  # the plain folder with the same (flat, sorted) names
        if f.is_file():
            f.rename(plain_dir / f.relative_to(plain_dir).as_posix().replace("/", "_"))
    shutil.rmtree(plain_dir / "pkg")
    assert prepare(capsys, tmp_path / "ref", [corpus["jsonl"], corpus["book"], plain_dir], tiny_tokenizer)[0] == 0
    for suffix in COMPRESS:
        inputs = [compress(corpus["jsonl"], tmp_path / f"docs.jsonl{suffix}"),
                  compress(corpus["book"], tmp_path / f"book.txt{suffix}"), packed_dir]
        code, err = prepare(capsys, tmp_path / suffix[1:], inputs, tiny_tokenizer)
        assert code == 0, err
        assert content(tmp_path / suffix[1:]) == content(tmp_path / "ref"), suffix
        assert sum(d.nbytes for d in docs(inputs[0])) == inputs[0].stat().st_size, "progress counts bytes on disk"
    meta = json.loads((tmp_path / "zst" / "meta.json").read_text())
    assert meta["sources"][0]["kind"] == "jsonl" and meta["counts"]["documents_skipped"] == {}


def test_format_by_magic_bytes(tmp_path):
    rows = b"".join(json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(5))
    disguised = tmp_path / "really_gzip.jsonl"
    disguised.write_bytes(gzip.compress(rows))
    assert [d.text for d in docs(disguised)] == [f"document {i}" for i in range(5)]
    legacy = tmp_path / "old.jsonl.lzma"  # the legacy .lzma format has no magic: by suffix
    legacy.write_bytes(lzma.compress(rows, format=lzma.FORMAT_ALONE))
    assert len(docs(legacy)) == 5
    fake = tmp_path / "plain.jsonl.gz"
    fake.write_bytes(rows)
    [bad] = docs(fake)
    assert bad.bad.reason == "damaged_input" and "named .gz but its first bytes (7b 22 74 65 78 74) are not gzip" in str(bad.bad)
    empty = tmp_path / "empty.jsonl.zst"
    empty.write_bytes(b"")
    assert docs(empty) == []


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_truncated_or_damaged_stream_is_named_with_its_position(tmp_path, suffix):
    lines = [json.dumps({"text": f"line {i} " + "word " * 40}).encode() + b"\n" for i in range(3000)]
    full = COMPRESS[suffix](b"".join(lines))
    path = tmp_path / f"data.jsonl{suffix}"
    path.write_bytes(full[: len(full) * 3 // 4])
    got = docs(path)
    *good, bad = got
    assert all(d.bad is None for d in good) and len(good) < len(lines)
    assert [d.text for d in good] == [json.loads(line)["text"] for line in lines[: len(good)]], "kept: a prefix"
    assert bad.bad.reason == "damaged_input" and bad.where == f"{path}:{len(good) + 1}"
    assert f"data ends early: the file is truncated ({path.stat().st_size:,} bytes on disk)" in str(bad.bad)
    assert f"the {len(good):,} whole lines before it" in str(bad.bad)
    assert sum(d.nbytes for d in got) == path.stat().st_size, "the bar still ends at the file's size"
    damaged = bytearray(full)
    damaged[len(full) // 2: len(full) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(damaged))
    *_, bad = docs(path)  # found at the format's next checksum: lines decoded before it may be garbled
    assert bad.bad.reason == "damaged_input" and "data is damaged near byte" in str(bad.bad), bad
    assert "may be garbled, so replace the file rather than skip" in str(bad.bad)


def test_truncated_gz_stops_or_keeps_what_came_before(capsys, tmp_path, tiny_tokenizer):
    """The brief's case: a truncated .jsonl.gz. Default: exit 2 naming file and line. --skip-bad: the
    documents before the damage give the rows a plain file of just those lines gives; the rest counts once."""
    lines = [json.dumps({"text": f"The garden was quiet, letter {i}. " * (1 + i % 7)}) for i in range(400)]
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    data = tmp_path / "web.jsonl.gz"
    data.write_bytes(blob[: len(blob) // 2])
    code, err = prepare(capsys, tmp_path / "out", [data], tiny_tokenizer)
    assert code == 2 and f"{data}:" in err and "gzip data ends early: the file is truncated" in err, err
    assert "[damaged_input]" in err and "--skip-bad" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    kept = int(err.split(f"{data}:")[1].split(":")[0]) - 1
    assert 0 < kept < len(lines)
    code, err = prepare(capsys, tmp_path / "out", [data], tiny_tokenizer, "--skip-bad")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["counts"]["documents_skipped"] == {"damaged_input": 1}
    assert meta["counts"]["documents_train"] == kept and meta["counts"]["documents_read"] == kept + 1
    prefix = tmp_path / "prefix.jsonl"
    prefix.write_text("\n".join(lines[:kept]) + "\n")
    assert prepare(capsys, tmp_path / "ref", [prefix], tiny_tokenizer)[0] == 0
    assert content(tmp_path / "out") == content(tmp_path / "ref"), "exactly the documents before the damage"


def test_unsupported_compression_lists_the_supported_ones(capsys, tmp_path, tiny_tokenizer):
    lz4 = tmp_path / "data.jsonl.lz4"
    lz4.write_bytes(b"\x04\x22\x4d\x18" + b"\x00" * 20)
    code, err = prepare(capsys, tmp_path / "out", [lz4], tiny_tokenizer)
    assert code == 2 and f"{lz4}: compressed with lz4, which prepare cannot read" in err, err
    assert "supported: gzip (.gz), bzip2 (.bz2), xz (.xz, .lzma) and zstd (.zst)" in err
    assert "[unsupported_compression]" in err and "Traceback" not in err
    zipped = tmp_path / "data.jsonl"  # a zip under a .jsonl name: by its magic bytes
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    assert docs(zipped)[0].bad.reason == "unsupported_compression"
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "notes.txt.br").write_bytes(b"\x1b\x03\x00")
    (folder / "a.py").write_text("print('kept')\n")
    code, err = prepare(capsys, tmp_path / "out", [folder], tiny_tokenizer, "--skip-bad")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["counts"]["documents_skipped"] == {"unsupported_compression": 1}
    assert meta["counts"]["documents_train"] == 1


def test_huge_line_inside_a_compressed_file_is_never_read_whole(tmp_path):
    data = tmp_path / "big.jsonl.zst"
    body = b'{"text": "a"}\n' + b'{"text": "' + b"a" * (8 << 20) + b'"}\n' + b'{"text": "b"}\n'
    data.write_bytes(COMPRESS[".zst"](body))
    got = docs(data, max_doc_bytes=1 << 16)
    assert [d.bad.reason if d.bad else d.text for d in got] == ["a", "too_large", "b"]
