"""Generated corpora and a tokenizer trained on them: the data_prep tests that always run."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("the of and to in is was for on that with as by at from his her they this which be have had not are "
         "but were one all an their has been more would who when will there can so no if out up into some time "
         "very what about than them only other new could its first two after then may any like our over such "
         "river mountain castle letter window garden morning evening winter summer silver golden quiet sudden "
         "remember discover believe wonder travel borrow gather whisper").split()
CODE = ("def {name}(x, y):\n    \"\"\"Return the {name} of x and y.\"\"\"\n    if x > y:\n        return x - y\n"
        "    for i in range({n}):\n        y += i * {n}\n    return y\n")


def prose(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    lines, line = [], []
    for w in words:
        line.append(w)
        if len(line) >= rng.randint(6, 14):
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines).strip()


def write_corpus(folder: Path, seed: int = 0, n_docs: int = 120) -> dict[str, Path]:
    """A JSONL of prose documents (a few long ones), a folder of .py files, a text file."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            n_words = rng.choice([3, 8, 20, 40, 60, 90]) if i % 10 else rng.randint(300, 900)
            f.write(json.dumps({"id": f"doc{i}", "text": prose(rng, n_words)}) + "\n")
    code = folder / "src"
    (code / "pkg").mkdir(parents=True, exist_ok=True)
    for i in range(12):
        body = "".join(CODE.format(name=f"f{i}_{k}", n=k + 1) for k in range(rng.randint(1, 6)))
        (code / ("pkg" if i % 2 else "") / f"mod{i}.py").write_text(body, encoding="utf-8")
    (code / "notes.txt").write_text("not python\n", encoding="utf-8")
    book = folder / "book.txt"
    book.write_text(prose(rng, 3000), encoding="utf-8")
    return {"jsonl": jsonl, "code": code, "book": book}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, corpus) -> Path:
    """A 400-piece BPE SentencePiece model trained (by our own trainer) on the generated corpus."""
    from data_prep.sources import InputSpec
    from data_prep.train_tokenizer import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TokenizerConfig([InputSpec(str(corpus["jsonl"])), InputSpec(str(corpus["code"]))],
                                    vocab_size=400, out=str(out)), log=lambda *_: None)
    return out / "tokenizer.model"
