"""The tokenizer eval needs: text -> ids, ids -> text, and the BOS id (if the tokenizer has one).

Two backends behind one small class:
- a SentencePiece ``tokenizer.model`` read with ``sentencepiece`` directly. DESIGN.md section 3:
  ``LlamaTokenizer(vocab_file=...)`` silently ignores the file in transformers 5.x, so we do not go
  through it;
- any other tokenizer folder through ``AutoTokenizer`` (``tokenizer.json`` etc.).
Special tokens are never added implicitly (transformers 5.x stopped adding BOS by default; 4.x did):
callers add BOS themselves, explicitly, like data prep does.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.tokenizer import file_sha256  # the hash data prep records in meta.json

SPM_FILE = "tokenizer.model"


class EvalTokenizer:
    """Uniform view of a SentencePiece model or a Hugging Face tokenizer."""

    def __init__(self, path: str, backend: str, impl, sha256: str | None = None):
        self.path = path
        self.backend = backend  # "sentencepiece" | "transformers"
        self._impl = impl
        self.sha256 = sha256  # of tokenizer.model or tokenizer.json, the file data prep hashes too

    @property
    def kind(self) -> str:
        """As data prep's meta.json names it: "sentencepiece" or "hf"."""
        return "sentencepiece" if self.backend == "sentencepiece" else "hf"

    @property
    def bos_id(self) -> int | None:
        if self.backend == "sentencepiece":
            bos = self._impl.bos_id()
            return bos if bos >= 0 else None
        return self._impl.bos_token_id

    @property
    def eos_id(self) -> int | None:
        if self.backend == "sentencepiece":
            eos = self._impl.eos_id()
            return eos if eos >= 0 else None
        return self._impl.eos_token_id

    @property
    def vocab_size(self) -> int:
        if self.backend == "sentencepiece":
            return self._impl.vocab_size()
        return len(self._impl)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token."""
        if self.backend == "sentencepiece":
            return self._impl.encode(text)
        return self._impl.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.backend == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=True)

    def identity(self) -> dict:
        """The keys data prep's meta.json records for its tokenizer (compare with ``identity_mismatches``)."""
        return {"path": self.path, "kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def describe(self) -> dict:
        return {"path": self.path, "backend": self.backend, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "sha256": self.sha256}


def load_tokenizer(path: str | Path) -> EvalTokenizer:
    """Load the tokenizer at ``path``: a ``tokenizer.model`` file, a folder holding one, or any
    folder (or Hub name) ``AutoTokenizer`` can read."""
    p = Path(path)
    spm_path = p if p.is_file() else p / SPM_FILE
    if spm_path.is_file():
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
        except Exception as exc:  # sentencepiece raises plain RuntimeError/OSError
            raise ValueError(f"tokenizer {spm_path}: not a readable SentencePiece model ({exc})") from exc
        return EvalTokenizer(str(spm_path), "sentencepiece", sp, file_sha256(spm_path))
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ValueError(
            f"tokenizer {path}: no {SPM_FILE} there and AutoTokenizer cannot load it ({exc}); "
            f"put the tokenizer files (tokenizer.model or tokenizer.json) in the model folder"
        ) from exc
    tok_json = Path(path) / "tokenizer.json"
    return EvalTokenizer(str(path), "transformers", tok, file_sha256(tok_json) if tok_json.is_file() else None)
