"""Fixtures for the eval tests: SentencePiece tokenizers trained in-test and tiny Llama folders."""
from __future__ import annotations

import io
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_file

BOOK_TRAIN_CHARS = 12000  # the tiny model is trained on this prefix of the book
BOOK_HELDOUT = slice(300000, 330000)  # held-out text for the CLI test


def train_spm(lines: list[str], vocab_size: int = 1024) -> bytes:
    """A small BPE SentencePiece model; byte fallback so that every digit is representable."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        minloglevel=2, num_threads=1)
    return buf.getvalue()


def stdlib_text(max_chars: int = 200_000) -> str:
    """Real text present on every machine: the Python standard library's own sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in ("argparse.py", "dataclasses.py", "inspect.py", "random.py", "textwrap.py"):
        text = (root / name).read_text(encoding="utf-8")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def tiny_llama(vocab_size: int, max_pos: int = 128, rope: dict | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(cfg).eval()


def save_hf(model, tokenizer_model: Path, folder: Path) -> Path:
    model.save_pretrained(folder)
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


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
