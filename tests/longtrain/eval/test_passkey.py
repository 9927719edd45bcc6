"""Passkey harness: exact prompt length, needle at the requested depth, exact-match scoring."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from longtrain.eval.passkey import NEEDLE, build_prompt, evaluate_passkey, passkey_correct
from longtrain.eval.loading import load_tokenizer

from tests.support.text import stdlib_text


@pytest.fixture(scope="module")
def tok(stdlib_spm):
    return load_tokenizer(stdlib_spm)


@pytest.fixture(scope="module")
def filler(tok):
    return np.asarray(tok.encode(stdlib_text()[-60_000:]))


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("prompt_len", [200, 999])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
def test_needle_lands_at_the_requested_depth(tok, filler, prompt_len, depth):
    p = build_prompt(tok, filler, prompt_len, depth, "40712", offset=1234)
    assert len(p.ids) == prompt_len
    needle = tok.encode(NEEDLE.format(key="40712"))
    assert _find(p.ids, needle) == [p.needle_start]  # exactly once, where reported
    assert p.needle_start - p.filler_start == round(depth * p.filler_len)
    overhead = prompt_len - p.filler_len  # intro + needle + question
    assert abs(p.needle_start / prompt_len - depth) <= overhead / prompt_len
    assert "40712" in tok.decode(p.ids[p.needle_start:p.needle_start + p.needle_len])
    # the haystack is the real text stream from the offset, split around the needle
    before = p.ids[p.filler_start:p.needle_start]
    after_start = p.needle_start + p.needle_len
    after = p.ids[after_start:after_start + p.filler_len - len(before)]
    assert before + after == filler[1234:1234 + p.filler_len].tolist()


def test_prompt_too_short_is_a_clear_error(tok, filler):
    with pytest.raises(ValueError, match="cannot hold"):
        build_prompt(tok, filler, 20, 0.5, "12345")


@pytest.mark.parametrize("text,ok", [
    (" 40712.", True), ("40712", True), ("40712 is", True), (" 407120", False), (" 4071", False),
    ("key 40 712", False), ("", False), (" no digits", False)])
def test_exact_match(text, ok):
    assert passkey_correct(text, "40712") is ok


class InductionCopier(nn.Module):
    """A deterministic 'model' that copies: it predicts the token that followed the longest earlier
    match of the current suffix (an ideal induction head). It solves passkey retrieval perfectly."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the harness a device

    def _next(self, seq: np.ndarray) -> int:
        t = len(seq) - 1
        cands = np.nonzero(seq[:t] == seq[t])[0]
        k = 1
        while len(cands) and k < 64:
            keep = cands[(cands - k >= 0) & (seq[np.maximum(cands - k, 0)] == seq[t - k])]
            if not len(keep):
                break
            cands, k = keep, k + 1
        return int(seq[cands[-1] + 1]) if len(cands) else 0

    def forward(self, input_ids, cache=None, use_cache=False, logits_to_keep=0, **kwargs):
        seq = torch.cat([cache, input_ids], 1) if cache is not None else input_ids
        logits = torch.zeros(1, 1, self.vocab_size)
        logits[0, 0, self._next(seq[0].numpy())] = 1.0
        return types.SimpleNamespace(logits=logits, cache=seq)


class ConstantDigit(InductionCopier):
    """Always answers with the same digit: never the key."""

    def __init__(self, vocab_size: int, token: int):
        super().__init__(vocab_size)
        self.token = token

    def _next(self, seq):
        return self.token


def test_copier_scores_all_and_constant_scores_none(tok, filler):
    depths = (0.0, 0.5, 1.0)
    cells = evaluate_passkey(InductionCopier(tok.vocab_size), tok, filler, 300, depths, trials=3,
                             seed=1, progress=False)
    assert [c["depth"] for c in cells] == list(depths)
    assert all(c["accuracy"] == 1.0 and c["correct"] == 3 for c in cells), cells
    assert all(d["prompt_tokens"] == 300 - 8 for c in cells for d in c["details"])
    keys = [d["key"] for c in cells for d in c["details"]]
    assert len(set(keys)) == len(keys) and all(len(k) == 5 for k in keys)

    seven = tok.encode("7")[-1]
    cells = evaluate_passkey(ConstantDigit(tok.vocab_size, seven), tok, filler, 300, depths, trials=3,
                             seed=1, progress=False)
    assert all(c["accuracy"] == 0.0 for c in cells)
    assert cells[0]["details"][0]["output"].startswith("7777")
    # same seed -> same questions for every model
    assert [d["key"] for c in cells for d in c["details"]] == keys
