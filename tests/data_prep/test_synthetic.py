"""Synthetic long-dependency documents (data_prep/synthetic.py): the spec, determinism, tokenizer
safety with a real `longtrain tokenizer` model, distances in range, and `longtrain prepare --input
synthetic:...` end to end (meta.json counts the source)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.synthetic import KEY_WORDS, Corpus, Generator, parse_spec
from tests.support.text import stdlib_text


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic_src")
    text = stdlib_text(150_000)
    for i in range(3):
        (folder / f"part{i}.py").write_text(text[i * 50_000:(i + 1) * 50_000], encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus_dir):
    """A 1024-piece model trained by `longtrain tokenizer` (newline and tab are pieces of their own)."""
    from data_prep.cli import tokenizer_main
    from data_prep.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("synthetic_tok")
    assert tokenizer_main(["--input", str(corpus_dir), "--vocab-size", "1024", "--out", str(out)]) == 0
    return Tokenizer(out / "tokenizer.model")


@pytest.fixture(scope="module")
def corpus(tokenizer, corpus_dir) -> Corpus:
    from data_prep.synthetic import read_corpus

    return read_corpus(str(corpus_dir), lambda t: tokenizer.encode_batch(t, False, False), "test")


def docs(spec: str, corpus: Corpus, seed: int = 0, n: int = 40, doc_tokens: int = 126):
    gen = Generator(parse_spec(spec), corpus, doc_tokens, seed)
    return [gen.doc(i) for i in range(n)]


def ids_of(tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode_batch([text], False, False)[0]]


def test_spec_parsing_and_errors():
    spec = parse_spec("synthetic:copy?docs=10&source=a/b:c&min_distance=16&max_distance=96&passage=words")
    assert (spec.kind, spec.docs, spec.source, spec.min_distance, spec.max_distance, spec.passage) == \
        ("copy", 10, "a/b:c", 16, 96, "words")
    for bad, msg in [("synthetic:paste?docs=1&source=x", "unknown synthetic kind"),
                     ("synthetic:copy?source=x", "give docs"),
                     ("synthetic:kv?docs=3", "give source"),
                     ("synthetic:kv?docs=3&source=x&keyz=2", "unknown option 'keyz'"),
                     ("synthetic:kv?docs=three&source=x", "must be an integer"),
                     ("synthetic:copy?docs=3&source=x&min_distance=90&max_distance=20", "above max_distance"),
                     ("synthetic:copy?docs=3&source=x&passage=chars", "passage"),
                     ("synthetic:kv?docs=3&source=x&keys=0", "keys=0")]:
        with pytest.raises(DataPrepError, match=msg):
            parse_spec(bad)


@pytest.mark.parametrize("spec", ["synthetic:copy?docs=1&source=SRC",
                                  "synthetic:copy?docs=1&source=SRC&passage=words&min_distance=40",
                                  "synthetic:copy?docs=1&source=SRC&length=40&max_passage=10",
                                  "synthetic:kv?docs=1&source=SRC&keys=6&min_distance=60&max_distance=100"])
def test_documents_are_token_identical_where_they_depend(spec, corpus, tokenizer):
    made = docs(spec, corpus)
    length = 40 if "length=40" in spec else 126
    for doc in made:
        ids = ids_of(tokenizer, doc.text)  # the ids prepare will see (BOS/EOS aside)
        assert len(ids) <= length
        (a, b), (c, e) = doc.source_span, doc.dependent_span
        assert b > a and ids[a:b] == ids[c:e], "the dependent part repeats the source part token for token"
        assert c >= b, "the repeat comes after the original"
        lo = parse_spec(spec).min_distance or 0
        hi = parse_spec(spec).max_distance or length
        assert lo - 8 <= doc.distance <= hi, (doc.distance, lo, hi)  # whole lines: within half a line
        assert doc.answer_span[1] <= e and doc.answer_span[0] >= c
    distances = [d.distance for d in made]
    assert len(set(distances)) > 10, "distances are drawn per document"


def test_kv_documents(corpus, tokenizer):
    for doc in docs("synthetic:kv?docs=1&source=SRC&keys=4&value_digits=5", corpus, n=20):
        lines = doc.text.rstrip("\n").split("\n")
        key, _, value = lines[-1].partition(" = ")
        assert key in KEY_WORDS and len(value) == 5 and value.isdigit()
        needles = [line for line in lines[:-1] if line.partition(" = ")[0] in KEY_WORDS]
        assert len(needles) == 4 and lines[-1] in needles, "four key lines, the last line asks one of them"
        ids = ids_of(tokenizer, doc.text)
        assert tokenizer.decode(ids[doc.answer_span[0]:doc.answer_span[1]]).strip() == value


def test_deterministic_by_seed_and_document(corpus):
    spec = "synthetic:copy?docs=1&source=SRC"
    a, b, c = docs(spec, corpus, seed=0, n=10), docs(spec, corpus, seed=0, n=10), docs(spec, corpus, seed=1, n=10)
    assert [d.text for d in a] == [d.text for d in b]
    assert all(x.text != y.text for x, y in zip(a, c))
    gen = Generator(parse_spec(spec), corpus, 126, 0)
    assert gen.doc(7).text == a[7].text, "document i depends on (seed, spec, i) only"


def test_length_beyond_the_row_is_refused(corpus):
    with pytest.raises(DataPrepError, match="exceeds --seq-len"):
        Generator(parse_spec("synthetic:copy?docs=1&source=x&length=200"), corpus, 126, 0)


def test_prepare_with_a_synthetic_input(tmp_path, corpus_dir, tokenizer):
    from data_prep.cli import prepare_main

    out = tmp_path / "ds"
    spec = f"synthetic:copy?docs=30&source={corpus_dir}&max_distance=96"
    args = ["--input", f"{corpus_dir}/*.py", "--input", f"{spec}:2", "--input", f"synthetic:kv?docs=20&source={corpus_dir}",
            "--tokenizer", str(tokenizer.file), "--seq-len", "128", "--out", str(out), "--no-progress", "--no-plot",
            "--seed", "3"]
    assert prepare_main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    sources = {s["path"]: s for s in meta["sources"]}
    assert sources[spec]["documents_read"] == 30 and sources[spec]["weight"] == 2.0
    assert sources[spec]["tokens_train_out"] == 2 * sources[spec]["tokens_train_in"]
    assert sources[f"synthetic:kv?docs=20&source={corpus_dir}"]["documents_read"] == 20
    again = tmp_path / "again"
    assert prepare_main(args[:-6] + ["--out", str(again), "--no-progress", "--no-plot", "--seed", "3"]) == 0
    import datasets

    rows = [datasets.load_from_disk(str(p / "train"))["input_ids"] for p in (out, again)]
    assert np.array_equal(np.array(rows[0]), np.array(rows[1])), "prepare with --seed is deterministic"


def test_synthetic_input_cannot_train_a_tokenizer(tmp_path, corpus_dir):
    from data_prep.cli import tokenizer_main

    code = tokenizer_main(["--input", f"synthetic:copy?docs=3&source={corpus_dir}", "--vocab-size", "512",
                           "--out", str(tmp_path)])
    assert code == 2  # a UserError: one line, exit 2
