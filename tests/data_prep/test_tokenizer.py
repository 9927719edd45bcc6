"""Tokenizer loading and identity (SentencePiece and HF tokenizer.json), and `longtrain tokenizer`."""
from __future__ import annotations

import hashlib
import json

import pytest

from data_prep.cli import tokenizer_main
from data_prep.errors import DataPrepError
from data_prep.sources import InputSpec
from data_prep.tokenizer import Tokenizer, tokenizer_identity
from data_prep.train_tokenizer import TokenizerConfig, train_tokenizer
from tests.support.paths import shared_file

from tests.support.dataset_checks import read_rows
from .test_prepare import run_prepare


def make_hf_tokenizer(folder, texts):
    """A byte-level BPE tokenizer.json whose post-processor adds BOS by itself (as Llama 3's does)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|bos|>", "<|eos|>"]))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>", "special": True}, "pad_token": None}))
    return folder


def test_sentencepiece_identity(tiny_tokenizer):
    ident = tokenizer_identity(tiny_tokenizer)
    assert ident == {"path": str(tiny_tokenizer.resolve()), "kind": "sentencepiece",
                     "sha256": hashlib.sha256(tiny_tokenizer.read_bytes()).hexdigest(), "vocab_size": 400,
                     "bos_id": 1, "eos_id": 2, "pad_id": 3}
    assert tokenizer_identity(tiny_tokenizer.parent) == ident, "a folder with tokenizer.model resolves to it"


def test_open_llama_identity_and_explicit_bos_eos():
    path = shared_file("tokenizers", "open_llama_tokenizer.model")
    tok = Tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, None)
    plain, both = tok.encode_batch(["Hello world"], False, False)[0], tok.encode_batch(["Hello world"], True, True)[0]
    assert both.dtype.name == "int32" and both.tolist() == [1] + plain.tolist() + [2]


def test_hf_tokenizer_json(tmp_path, corpus):
    texts = [json.loads(line)["text"] for line in corpus["jsonl"].read_text().splitlines()]
    folder = make_hf_tokenizer(tmp_path / "hf", texts)
    tok = Tokenizer(folder)
    assert tok.kind == "hf" and tok.file.name == "tokenizer.json"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    ids = tok.encode_batch(["the river"], True, True)[0].tolist()
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1, "BOS added once: the post-processor is not used"
    assert tok.decode(ids[1:-1]) == "the river"
    ident = tokenizer_identity(folder / "tokenizer.json")
    assert ident["sha256"] == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    meta = run_prepare(tmp_path / "out", [corpus["jsonl"]], folder, strategy="best-fit")
    assert meta["tokenizer"] == ident and meta["padding"] == {"id": 2, "source": "eos"}
    rows = read_rows(tmp_path / "out")
    assert sum(int((ids == 1).sum()) for ids, _, _ in rows) == meta["counts"]["documents_train"]


def test_train_tokenizer_round_trips_code(tmp_path, corpus):
    ident = train_tokenizer(TokenizerConfig([InputSpec(str(corpus["code"]))], vocab_size=320, out=str(tmp_path / "t"),
                                            max_chars=20_000), log=lambda *_: None)
    tok = Tokenizer(tmp_path / "t" / "tokenizer.model")
    assert ident == tok.identity() and (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 320)
    code = "def f(x):\n\tif x:\n        return 'naïve ünïcode ✓'  # 12345\n"
    ids = tok.encode_batch([code], False, False)[0].tolist()
    assert tok._sp.decode(ids) == code, "identity normalization + byte fallback: exact round trip"
    assert tok._sp.piece_to_id("\n") not in (0, tok._sp.unk_id()) and tok._sp.unk_id() not in ids


def test_tokenizer_cli(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    argv = ["--input", str(corpus["jsonl"]), "--input", f"{corpus['code']}/**/*.py", "--vocab-size", "350",
            "--out", str(out), "--max-chars", "50000"]
    assert tokenizer_main(argv) == 0
    assert "trained bpe vocab 350" in capsys.readouterr().out and (out / "tokenizer.model").is_file()
    assert tokenizer_main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert tokenizer_main(argv + ["--overwrite", "--vocab-size", "100"]) == 2
    assert "at least 300" in capsys.readouterr().err
    assert tokenizer_main(argv + ["--overwrite", "--vocab-size", "60000"]) == 2
    err = capsys.readouterr().err
    assert "SentencePiece training failed" in err and "lower --vocab-size" in err and "Traceback" not in err
    unicode = tmp_path / "unicode.txt"  # more distinct characters than a 300-piece vocabulary can hold
    unicode.write_text("".join(chr(c) for c in range(0x4E00, 0x4E00 + 400)) * 3)
    assert tokenizer_main(["--input", str(unicode), "--vocab-size", "300", "--out", str(tmp_path / "u")]) == 2
    assert "raise --vocab-size" in capsys.readouterr().err


def test_train_tokenizer_sampling_is_bounded(tmp_path, corpus):
    cfg = TokenizerConfig([InputSpec(str(corpus["jsonl"]))], vocab_size=300, out=str(tmp_path), max_chars=5000)
    from data_prep.train_tokenizer import sample_sentences

    sentences, counts = sample_sentences(cfg)
    assert counts["characters"] <= 5000 and sum(map(len, sentences)) == counts["characters"] > 2000
    assert sample_sentences(cfg)[0] == sentences, "seeded: the same sample"
    with pytest.raises(DataPrepError, match="weights"):
        TokenizerConfig([InputSpec("x", 2.0)], vocab_size=300, out="o")


def test_split_at_spaces_cuts_only_single_spaces():
    from data_prep.tokenizer import split_at_spaces

    text = "alpha beta  gamma\tdelta epsilon\nzeta eta " * 40
    parts = split_at_spaces(text, 30)
    assert len(parts) > 20 and " ".join(parts) == text
    assert all(not p[-1].isspace() for p in parts[:-1]) and all(not p[0].isspace() for p in parts[1:])
    assert split_at_spaces("x" * 500, 30) == ["x" * 500], "no space: not cut"


def _long_texts():
    texts = [shared_file("corpora", "botchan.txt").read_text(encoding="utf-8-sig").replace("\r\n", "\n")]
    lines = shared_file("corpora", "wikitext2_valid.jsonl").read_text(encoding="utf-8").splitlines()
    return texts + [json.loads(line)["text"] for line in lines[:12]]


@pytest.mark.parametrize("model", ["open_llama_tokenizer.model", "spm_botchan_test_model.model"])
def test_chunked_encoding_gives_the_whole_document_ids(model):
    from data_prep.tokenizer import CHUNK_CHARS

    tok = Tokenizer(shared_file("tokenizers", model))
    texts = _long_texts()
    assert tok.chunked and sum(len(t) > 2 * CHUNK_CHARS for t in texts) >= 3, "guard: chunking must happen"
    chunked = tok.encode_batch(texts, True, True)
    whole = tok._sp.encode(texts, add_bos=True, add_eos=True)
    assert [c.tolist() for c in chunked] == whole


def test_chunked_encoding_own_tokenizer_and_unsafe_models(tmp_path, corpus, tiny_tokenizer):
    import sentencepiece as spm

    from data_prep.tokenizer import CHUNK_CHARS

    code = "".join(p.read_text() for p in sorted(corpus["code"].rglob("*.py")))
    texts = [corpus["book"].read_text() * 2, code * 40]
    assert all(len(t) > 2 * CHUNK_CHARS for t in texts)
    tok = Tokenizer(tiny_tokenizer)
    assert tok.chunked and [c.tolist() for c in tok.encode_batch(texts, False, False)] == tok._sp.encode(texts)
    # A model without the dummy prefix would change ids at a cut: it is never chunked.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[0].split("\n")), model_prefix=str(tmp_path / "nd"),
                                   vocab_size=150, add_dummy_prefix=False, minloglevel=2)
    unsafe = Tokenizer(tmp_path / "nd.model")
    assert not unsafe.chunked
    assert [c.tolist() for c in unsafe.encode_batch(texts, False, False)] == unsafe._sp.encode(texts)


def test_identity_mismatches_compare_bytes_only_within_a_kind():
    from data_prep.tokenizer import identity_mismatches

    spm = {"kind": "sentencepiece", "sha256": "a" * 64, "vocab_size": 2048, "bos_id": 1, "eos_id": 2}
    assert identity_mismatches(spm, dict(spm)) == []
    assert identity_mismatches(spm, dict(spm, sha256="b" * 64)) == [("sha256", "a" * 64, "b" * 64)]
    # Its converted tokenizer.json: other bytes, same ids -> the same tokenizer.
    assert identity_mismatches(spm, dict(spm, kind="hf", sha256="b" * 64)) == []
    assert identity_mismatches(spm, dict(spm, kind="hf", eos_id=None)) == [("eos_id", 2, None)]
    assert identity_mismatches({"vocab_size": 32000}, spm) == [("vocab_size", 32000, 2048)]  # only what was recorded
