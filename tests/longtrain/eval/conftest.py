"""Fixtures for the eval tests: SentencePiece tokenizers trained in-test and tiny Llama folders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.models import save_hf, tiny_llama
from tests.support.paths import shared_file
from tests.support.text import BOOK_TRAIN_CHARS, stdlib_text, train_spm

@pytest.fixture(scope="session")
def stdlib_spm(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "stdlib.model"
    path.write_bytes(train_spm([l for l in stdlib_text().splitlines() if l.strip()]))
    return path


@pytest.fixture(scope="session")
def book_text() -> str:
    return shared_file("corpora", "pride_and_prejudice.txt").read_text(encoding="utf-8-sig")


@pytest.fixture(scope="session")
def book_spm(tmp_path_factory, book_text) -> Path:
    path = tmp_path_factory.mktemp("spm") / "book.model"
    path.write_bytes(train_spm([l for l in book_text[:200_000].splitlines() if l.strip()]))
    return path


@pytest.fixture(scope="session")
def trained_folder(tmp_path_factory, book_text, book_spm) -> Path:
    """A tiny Llama trained for a few seconds on the book's first BOOK_TRAIN_CHARS characters."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(book_spm))
    data = torch.tensor([sp.bos_id()] + sp.encode(book_text[:BOOK_TRAIN_CHARS]))  # ~4k tokens
    model = tiny_llama(sp.vocab_size()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):  # ~3 s on one core; loss 6.9 -> ~3.5
        starts = torch.randint(0, len(data) - 65, (16,), generator=gen)
        x = torch.stack([data[s:s + 64] for s in starts])  # (16, 64)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 4.2, f"tiny model did not learn (loss {loss.item():.2f})"
    return save_hf(model.eval(), book_spm, tmp_path_factory.mktemp("models") / "trained")


@pytest.fixture(scope="session")
def untrained_folder(tmp_path_factory, book_spm) -> Path:
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(book_spm)).vocab_size()
    return save_hf(tiny_llama(vocab, seed=1), book_spm, tmp_path_factory.mktemp("models") / "untrained")
