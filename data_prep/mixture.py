"""Deterministic document choices: the validation split and per-source weights (by tokens).

Both use a keyed hash of (seed, source, document key) rather than a shared random stream, so a
document's fate does not depend on how many documents came before it or on ``--num-proc``.
"""
from __future__ import annotations

import hashlib

import numpy as np


def unit_hash(seed: int, *keys) -> float:
    """A number in [0, 1) fixed by ``seed`` and ``keys`` (blake2b, 64 bits)."""
    text = "\x1f".join(str(k) for k in (seed,) + keys)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") / 2.0**64


def is_validation(seed: int, source_index: int, doc_key, fraction: float) -> bool:
    """Whether a document goes to the validation split (a whole document, never part of one)."""
    return fraction > 0 and unit_hash(seed, "val", source_index, doc_key) < fraction


class WeightSampler:
    """Up- or down-samples one source by tokens.

    ``weight = k + f`` (k an integer, 0 <= f < 1): every document is emitted ``k`` times, and
    an extra copy is emitted for a deterministic subset of documents holding a fraction ``f``
    of the source's tokens. The subset comes from error diffusion: a running token deficit
    ``D += f * n`` per document, and a document is taken when ``D >= u * n`` (``u`` a seeded
    hash of the document), so the realized weight never drifts by more than one document.
    The last taken and the last passed-over document are held back until the source ends;
    ``finish`` then cuts the held document to a prefix (or emits a prefix of the passed-over
    one) so the source's realized tokens match ``weight * tokens`` to within a token.
    Those prefixes are the only documents weighting truncates; they are counted.
    """

    def __init__(self, weight: float, seed: int, source_index: int):
        self.copies = int(weight)
        self.fraction = weight - self.copies
        self.seed, self.source_index = seed, source_index
        self.deficit = 0.0
        self.held_taken: np.ndarray | None = None
        self.held_passed: np.ndarray | None = None
        self.tokens_in = self.tokens_out = 0
        self.documents_cut = 0  # documents emitted as a prefix by finish()

    def feed(self, tokens: np.ndarray, doc_key) -> list[np.ndarray]:
        n = len(tokens)
        self.tokens_in += n
        out = [tokens] * self.copies
        if self.fraction > 0:
            self.deficit += self.fraction * n
            if self.deficit >= unit_hash(self.seed, "weight", self.source_index, doc_key) * n:
                self.deficit -= n
                if self.held_taken is not None:
                    out.append(self.held_taken)
                self.held_taken = tokens
            else:
                self.held_passed = tokens
        self.tokens_out += sum(len(t) for t in out)
        return out

    def _prefix(self, tokens: np.ndarray, keep: int) -> list[np.ndarray]:
        """``tokens[:keep]`` (counted as a cut document), or nothing when under 2 tokens remain
        (a one-token document has no target)."""
        keep = max(0, min(keep, len(tokens)))
        if keep < 2:
            return []
        if keep < len(tokens):
            self.documents_cut += 1
        self.tokens_out += keep
        return [tokens[:keep]]

    def finish(self) -> list[np.ndarray]:
        """The held documents, cut so the source's realized tokens match the request."""
        error = round(self.deficit)  # > 0: too few tokens taken so far, < 0: too many
        out: list[np.ndarray] = []
        if self.held_taken is not None:
            out += self._prefix(self.held_taken, len(self.held_taken) + min(error, 0))
        if error > 0 and self.held_passed is not None:
            out += self._prefix(self.held_passed, error)
        self.held_taken = self.held_passed = None
        return out
