"""Load a tokenizer (SentencePiece ``.model`` or Hugging Face ``tokenizer.json``) and describe it.

SentencePiece models are read with the ``sentencepiece`` library directly: transformers 5's
``LlamaTokenizer(vocab_file=...)`` silently ignores the file (DESIGN.md section 3). Hugging Face
tokenizers are read with the ``tokenizers`` library (imported lazily), so data prep never needs
transformers. BOS/EOS are never added implicitly: callers say whether they want them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError

_HINT = "pass a SentencePiece .model file, an HF tokenizer.json, or a folder holding one of them"


def resolve_tokenizer_file(path: str | Path) -> tuple[Path, str]:
    """(file, kind) for a tokenizer path. A folder prefers ``tokenizer.json`` (what transformers'
    fast tokenizers load) over ``tokenizer.model``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataPrepError(f"tokenizer not found: {p}; {_HINT}")
    if p.is_dir():
        for name, kind in (("tokenizer.json", "hf"), ("tokenizer.model", "sentencepiece")):
            if (p / name).is_file():
                return (p / name).resolve(), kind
        raise DataPrepError(f"tokenizer folder {p} holds neither tokenizer.json nor tokenizer.model; {_HINT} "
                            "(an HF tokenizer saved with save_pretrained() writes tokenizer.json)")
    kind = "hf" if p.suffix == ".json" else "sentencepiece"
    return p.resolve(), kind


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_special_tokens(folder: Path) -> tuple[dict[str, str], dict]:
    """The special tokens named in ``folder/tokenizer_config.json`` (each a string or ``{"content": ...}``),
    ``{"bos_token": "<s>", ...}``, and that config (``{}`` when there is none). Export reads them here too."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    specials = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            specials[name] = token
    return specials, config


class Tokenizer:
    """A loaded tokenizer with explicit special ids (``None`` when the tokenizer has none)."""

    def __init__(self, path: str | Path):
        self.file, self.kind = resolve_tokenizer_file(path)
        given = Path(path).expanduser()
        # tokenizer_config.json is looked for beside the path given, not beside the resolved file: a
        # Hugging Face cache snapshot links each file to its own blob.
        self._config_dir = given if given.is_dir() else given.parent
        self.sha256 = file_sha256(self.file)
        if self.kind == "sentencepiece":
            self._load_sentencepiece()
        else:
            self._load_hf()

    def _load_sentencepiece(self) -> None:
        import sentencepiece as spm  # per kind: a run loads only its tokenizer's library

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.file))
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise DataPrepError(f"could not load {self.file} as a SentencePiece model ({exc}); {_HINT}") from None
        sp = self._sp
        self.vocab_size = int(sp.vocab_size())
        ids = (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (i if i >= 0 else None for i in ids)
        self.chunked = _splits_at_spaces_safely(self.file) and self._chunked_matches_whole()

    def _chunked_matches_whole(self) -> bool:
        """Self-check: the model tokenizes a sample cut into many chunks exactly as in one piece."""
        whole = self._sp.encode(_SELF_CHECK_TEXT)
        parts = self._sp.encode(split_at_spaces(_SELF_CHECK_TEXT, 40))
        return len(parts) > 20 and whole == [i for part in parts for i in part]

    def _load_hf(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer  # per kind, as above

        try:
            self._hf = HFTokenizer.from_file(str(self.file))
        except Exception as exc:
            raise DataPrepError(f"could not load {self.file} as an HF tokenizer.json ({exc}); {_HINT}") from None
        self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=True))
        specials, config = read_special_tokens(self._config_dir)
        # transformers' `split_special_tokens`: a special token's string inside a text stays text. An
        # export of a SentencePiece run sets it, because SentencePiece encodes "<unk>" in a text as
        # ordinary pieces: its tokenizer.json then gives the training rows' ids (longtrain/export/tokenizer.py).
        self._hf.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            self._hf.token_to_id(specials[name]) if name in specials else None
            for name in ("bos_token", "eos_token", "pad_token", "unk_token"))
        self._special = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    def identity(self) -> dict:
        """What meta.json records; compare with :func:`tokenizer_identity` of another path."""
        return {"path": str(self.file), "kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def special_tokens(self) -> dict[str, str]:
        """``{"bos_token": "<s>", ...}``: the pieces of the special ids the tokenizer has (bos, eos, unk,
        pad), as a ``tokenizer_config.json`` names them (export writes them)."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        return {name: self.piece(i) for name, i in ids.items() if i is not None}

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without BOS/EOS (the ids ``encode_batch`` gives it)."""
        return self.encode_batch([text], add_bos=False, add_eos=False)[0].tolist()

    def encode_batch(self, texts: list[str], add_bos: bool, add_eos: bool) -> list[np.ndarray]:
        """Token ids (int32 arrays), with BOS/EOS added exactly as asked."""
        if self.kind == "sentencepiece":
            if not self.chunked or all(len(t) <= 2 * CHUNK_CHARS for t in texts):
                return self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos, return_type="numpy")
            return self._encode_chunked(texts, add_bos, add_eos)
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        # A plain loop: encode_batch's thread pool is slower than this on busy small machines
        # (DESIGN.md section 3); --num-proc parallelises across processes instead.
        return [np.array(head + self._hf.encode(t, add_special_tokens=False).ids + tail, dtype=np.int32)
                for t in texts]

    def _encode_chunked(self, texts: list[str], add_bos: bool, add_eos: bool) -> list[np.ndarray]:
        """Long documents encoded in chunks cut at single spaces (same ids, see CHUNK_CHARS)."""
        chunks, counts = [], []
        for text in texts:
            parts = split_at_spaces(text, CHUNK_CHARS) if len(text) > 2 * CHUNK_CHARS else [text]
            chunks += parts
            counts.append(len(parts))
        encoded = self._sp.encode(chunks, return_type="numpy")
        head = [np.array([self.bos_id], dtype=np.int32)] if add_bos else []
        tail = [np.array([self.eos_id], dtype=np.int32)] if add_eos else []
        out, k = [], 0
        for n in counts:
            out.append(np.concatenate(head + encoded[k:k + n] + tail).astype(np.int32, copy=False))
            k += n
        return out

    def is_special(self, token_id: int) -> bool:
        if self.kind == "sentencepiece":
            return bool(self._sp.is_control(token_id) or self._sp.is_unknown(token_id))
        return token_id in self._special

    def piece(self, token_id: int) -> str:
        if self.kind == "sentencepiece":
            return self._sp.id_to_piece(token_id)
        return self._hf.id_to_token(token_id) or f"<{token_id}>"

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens appear as their piece (e.g. ``<s>``), or not at all with
        ``skip_special`` (generated text, as the tokenizer libraries decode it by default)."""
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            return self._sp.decode(ids)  # SentencePiece's own rule: control tokens dropped, <unk> shown
        out, run = [], []
        for i in ids:  # SentencePiece drops control tokens when decoding: show them explicitly
            if self.is_special(i):
                out.append(self._sp.decode(run) + self.piece(i))
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


# SentencePiece's encoder is superlinear in the input length: measured on these machines, a
# 1M-character document encodes at ~0.3M characters/s, 10k-character pieces at ~1.2M. Long
# documents are therefore encoded in chunks of about CHUNK_CHARS characters, cut at a single
# space between two non-space characters. For a model that escapes whitespace as "▁", adds the
# dummy "▁" prefix and has no piece with "▁" inside (split_by_whitespace), no piece crosses
# such a space, and the dummy prefix of a chunk stands for the dropped space: the ids are
# exactly those of the whole document. Models without these properties, or that fail a
# self-check on a mixed sample, are never chunked (Tokenizer.chunked is False).
CHUNK_CHARS = 4096
_SELF_CHECK_TEXT = (
    "It was the best of times,  it was the worst of times; 1,234.5 apples (naïve café, 東京, 🙂)!\n"
    "def f(x):\n    if x  >  2:\n\treturn [x ** 2 for x in range(10)]  # comment\n\n"
    "  Leading spaces, trailing spaces   \nLine\r\nwith CRLF. Ünïcödé and ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ; "
    "e-mail: someone@example.com; URL https://example.org/a?b=c&d=e ... --- *** ### $$$ 0x1F\n") * 3


def split_at_spaces(text: str, every: int) -> list[str]:
    """``text`` cut into pieces of about ``every`` characters at single spaces between two
    non-space characters; the space at each cut is dropped (the dummy prefix restores it)."""
    pieces, start = [], 0
    while len(text) - start > 2 * every:
        i = text.find(" ", start + every)
        while i != -1 and (text[i - 1].isspace() or i + 1 >= len(text) or text[i + 1].isspace()):
            i = text.find(" ", i + 1)
        if i == -1:
            break
        pieces.append(text[start:i])
        start = i + 1
    pieces.append(text[start:])
    return pieces


def _splits_at_spaces_safely(model_file: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as model_pb2  # protobuf: only for .model files

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if not (norm.add_dummy_prefix and norm.escape_whitespaces and trainer.split_by_whitespace
            and not trainer.treat_whitespace_as_suffix):
        return False
    return not any("\u2581" in p.piece.lstrip("\u2581") for p in proto.pieces)


def tokenizer_identity(path: str | Path) -> dict:
    """``{"path", "kind", "sha256", "vocab_size", "bos_id", "eos_id", "pad_id"}`` as meta.json records it.

    ``sha256`` is that of the ``.model`` or ``tokenizer.json`` file. Compare two tokenizers by
    ``sha256`` when their ``kind`` matches; a SentencePiece model and its converted
    tokenizer.json differ in bytes, so compare ``vocab_size`` and the special ids then.
    """
    return Tokenizer(path).identity()


def identity_mismatches(recorded: dict, ours: dict) -> list[tuple[str, object, object]]:
    """``(key, recorded value, our value)`` for each way ``ours`` differs from the tokenizer a dataset
    recorded (both dicts as :meth:`Tokenizer.identity` writes them): ``vocab_size``, ``bos_id`` and
    ``eos_id`` always, ``sha256`` when both are the same kind of file (a SentencePiece model and its
    converted tokenizer.json differ in bytes). A key the dataset did not record is not compared."""
    keys = ["vocab_size", "bos_id", "eos_id"] + (["sha256"] if recorded.get("kind") == ours.get("kind") else [])
    return [(k, recorded[k], ours.get(k)) for k in keys if recorded.get(k) is not None and recorded[k] != ours.get(k)]
