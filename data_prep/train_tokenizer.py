"""``longtrain tokenizer``: train a SentencePiece model on a (sampled) corpus.

Defaults chosen for a mix of source code and prose, where text must round-trip exactly:
- ``byte_fallback``: any character outside the vocabulary becomes its UTF-8 bytes, never ``<unk>``;
- ``normalization_rule_name=identity`` and ``remove_extra_whitespaces=False``: no NFKC, runs
  of spaces (indentation) survive; ``allow_whitespace_only_pieces``: indentation can be one piece;
- ``split_digits``: numbers are spelled digit by digit (as Llama and others do);
- ``\\n`` and ``\\t`` are user-defined symbols (one token each, rather than byte pieces);
- ids: ``<unk>`` 0, ``<s>`` (BOS) 1, ``</s>`` (EOS) 2, ``<pad>`` 3, as Llama numbers the first three.
SentencePiece trains on lines ("sentences"), so documents are split at newlines; lines are
sampled with probability ``max_chars / corpus bytes`` (seeded) so training takes seconds
(BPE 8k-32k on 10 MiB: 2-3 s, DESIGN.md section 3).
"""
from __future__ import annotations

import io
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.sources import InputSpec, ReadOptions, good_documents, resolve_source
from data_prep.tokenizer import Tokenizer

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


@dataclass
class TokenizerConfig:
    inputs: list[InputSpec]
    vocab_size: int
    out: str
    model_type: str = "bpe"
    max_chars: int = 10_000_000
    seed: int = 0
    text_field: str = "text"
    skip_bad: bool = False
    overwrite: bool = False
    max_doc_bytes: int = 64 << 20
    character_coverage: float = 0.9995
    max_sentence_chars: int = 4096
    num_threads: int = 1

    def __post_init__(self):
        if not self.inputs:
            raise DataPrepError("--input: give at least one input")
        if any(spec.weight != 1.0 for spec in self.inputs):
            raise DataPrepError("--input: weights (PATH:WEIGHT) are not used when training a tokenizer; drop them")
        if self.model_type not in ("bpe", "unigram"):
            raise DataPrepError(f"--model-type: {self.model_type!r} is not bpe or unigram")
        # 256 byte pieces + 4 specials + \n and \t, plus room for real pieces.
        if self.vocab_size < 300:
            raise DataPrepError(f"--vocab-size {self.vocab_size}: at least 300 (256 byte-fallback pieces, "
                                "4 special tokens, \\n and \\t come first)")
        if self.max_chars < 1000:
            raise DataPrepError(f"--max-chars {self.max_chars}: at least 1000")


def sample_sentences(cfg: TokenizerConfig) -> tuple[list[str], dict]:
    """Lines sampled uniformly (seeded) from all documents, at most ``max_chars`` characters."""
    sources = [resolve_source(spec, i) for i, spec in enumerate(cfg.inputs)]
    total = sum(s.total_bytes for s in sources)
    keep = min(1.0, cfg.max_chars / max(1, total))
    rng = random.Random(cfg.seed)
    opts = ReadOptions(cfg.text_field, None, cfg.max_doc_bytes)
    sentences, chars, counts = [], 0, {"documents": 0, "skipped": {}}
    for source in sources:
        for raw in good_documents(source, opts, cfg.skip_bad, counts["skipped"]):
            counts["documents"] += 1
            for line in raw.text.split("\n"):
                for i in range(0, len(line), cfg.max_sentence_chars):
                    piece = line[i:i + cfg.max_sentence_chars]
                    if piece.strip() and rng.random() < keep and chars + len(piece) <= cfg.max_chars:
                        sentences.append(piece)
                        chars += len(piece)
    counts.update(sentences=len(sentences), characters=chars, corpus_bytes=total, sample_rate=round(keep, 6))
    if not sentences:
        raise DataPrepError("no text to train on: every document was empty or skipped")
    return sentences, counts


def train_tokenizer(cfg: TokenizerConfig, log=print) -> dict:
    """Train, write ``OUT/tokenizer.model``, return its identity (see tokenizer.tokenizer_identity)."""
    import sentencepiece as spm  # lazily, as data_prep/tokenizer.py: each command loads only what it uses

    out = Path(cfg.out).expanduser()
    target = out / "tokenizer.model"
    if target.exists() and not cfg.overwrite:
        raise DataPrepError(f"--out {out}: already holds tokenizer.model; pass --overwrite to replace it")
    start = time.monotonic()
    sentences, counts = sample_sentences(cfg)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type=cfg.model_type,
            vocab_size=cfg.vocab_size, byte_fallback=True, character_coverage=cfg.character_coverage,
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", user_defined_symbols=["\n", "\t"],
            max_sentence_length=4 * cfg.max_sentence_chars, num_threads=cfg.num_threads,
            minloglevel=2, **SPECIAL_IDS)
    except RuntimeError as exc:
        if "smaller than required_chars" in str(exc):  # every character seen needs a piece of its own
            hint = "raise --vocab-size (the corpus has many distinct characters)"
        else:  # "Vocabulary size too high": not enough distinct pieces in the sample
            hint = "lower --vocab-size, or give more text (--max-chars or more inputs)"
            if cfg.model_type == "unigram":
                hint += ", or use --model-type bpe"
        raise DataPrepError(f"SentencePiece training failed: {exc}; {hint}") from None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tokenizer.model.partial-{os.getpid()}"
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, target)
    tok = Tokenizer(target)
    sample = "\n".join(sentences[:2000])
    n_tokens = len(tok.encode_batch([sample], False, False)[0])
    log(f"trained {cfg.model_type} vocab {cfg.vocab_size} on {counts['sentences']:,} lines, "
        f"{counts['characters']:,} characters sampled from {counts['documents']:,} documents "
        f"({counts['corpus_bytes']:,} bytes) in {time.monotonic() - start:.1f} s"
        + (f"; skipped {counts['skipped']}" if counts["skipped"] else ""))
    log(f"{len(sample) / max(1, n_tokens):.2f} characters per token on the first sampled lines; wrote {target} "
        f"(unk 0, bos 1, eos 2, pad 3, byte fallback)")
    return tok.identity()
