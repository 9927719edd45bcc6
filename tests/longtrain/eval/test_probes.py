"""The context probes (longtrain/eval/probes.py): the repeat-copy gain is large for a model built to
copy and about zero for a random one; the retrieval prompts are exact and the score is right for a
model that retrieves and near zero for one that does not; both are deterministic."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from data_prep.synthetic import KEY_WORDS
from longtrain.eval.probes import copy_sequences, kv_prompt, kv_retrieval_accuracy, line_ids, repeat_copy_gain
from tests.support.models import induction_llama, tiny_llama
from tests.support.text import stdlib_text


class NGramRetriever(nn.Module):
    """A causal LM by rule, the retrieval probe's reference "model that retrieves": predicts the token
    that followed the latest earlier occurrence of the longest suffix (2..``k`` tokens) of its context."""

    def __init__(self, vocab: int, k: int = 6):
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, input_ids, logits_to_keep, use_cache=False):
        logits = torch.zeros(input_ids.shape[0], len(logits_to_keep), self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            for j, t in enumerate(logits_to_keep.tolist()):
                logits[b, j] = self._predict(row, t)
        return SimpleNamespace(logits=logits)

    def _predict(self, row: list[int], t: int) -> torch.Tensor:
        out = torch.zeros(self.vocab)
        for n in range(self.k, 1, -1):
            for s in range(t - 1, n - 2, -1):
                if row[s - n + 1:s + 1] == row[t - n + 1:t + 1]:
                    out[row[s + 1]] = 10.0
                    return out
        return out


@pytest.fixture(scope="module")
def random_stream() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 64, 20_000)


def test_copy_sequences_are_start_to_start(random_stream):
    rep, ctl = copy_sequences(random_stream, distance=96, passage=32, n=8, seed=0)
    assert rep.shape == ctl.shape == (8, 128), "D = 0.75 L with P = L / 4 fills exactly L = 128 tokens"
    assert (rep[:, :32] == rep[:, 96:]).all(), "the repeat starts D tokens after the first copy"
    assert (ctl[:, 96:] == rep[:, 96:]).all() and (ctl[:, 32:96] == rep[:, 32:96]).all()
    assert (ctl[:, :32] != rep[:, :32]).any(1).all(), "the control's first passage is another one"
    again, _ = copy_sequences(random_stream, distance=96, passage=32, n=8, seed=0)
    other, _ = copy_sequences(random_stream, distance=96, passage=32, n=8, seed=1)
    assert (again == rep).all() and not (other == rep).all()
    with pytest.raises(ValueError, match="overlap"):
        copy_sequences(random_stream, distance=16, passage=32, n=1, seed=0)


def test_copy_gain_of_a_copying_and_a_random_model(random_stream):
    copier = repeat_copy_gain(induction_llama(), random_stream, [48, 96], passage=32, passages=16)
    for r in copier:
        assert r["gain"] > 1.0 and r["gain_vs_control"] > 1.0, r
        assert r["nll_first"] > 3.0, "without an earlier copy the copier knows nothing (ln 64 = 4.2)"
    random_model = repeat_copy_gain(tiny_llama(64, max_pos=256), random_stream, [48, 96], passage=32, passages=16)
    for r in random_model:
        assert abs(r["gain"]) < 0.05 and abs(r["gain_vs_control"]) < 0.05, r
    assert repeat_copy_gain(induction_llama(), random_stream, [96], passage=32, passages=16) == copier[1:]


def test_kv_prompt_layout(stdlib_tokenizer):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(stdlib_tokenizer))
    filler = np.array(sp.encode("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 40))
    for depth in (0.0, 0.5, 1.0):
        p = kv_prompt(sp.encode, filler, 256, depth, keys=4, value_digits=4, rng=random.Random(3), prefix=[1])
        assert len(p.ids) == 256 and p.ids[0] == 1
        text = sp.decode(p.ids[p.question_start:])
        key, _, value = text.partition(" = ")
        assert key in KEY_WORDS and len(value) == 4 and value.isdigit(), text
        assert sp.decode(p.ids[p.value_start:]).strip() == value
        asked = p.ids[p.question_start:]
        assert p.ids[p.needle_start:p.needle_start + len(asked)] == asked, "the asked line is where it says"
        assert sum(sp.decode(p.ids).count(f"\n{k} = ") for k in KEY_WORDS) == 4 + 1, "four key lines and the question"
    near = kv_prompt(sp.encode, filler, 256, 1.0, 4, 4, random.Random(3), [1])
    far = kv_prompt(sp.encode, filler, 256, 0.0, 4, 4, random.Random(3), [1])
    assert far.distance > near.distance
    assert line_ids(sp.encode, "x = 1") == sp.encode("\nx = 1")[len(sp.encode("\n")):]


def test_kv_accuracy_of_a_retriever_and_a_random_model(stdlib_tokenizer):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(stdlib_tokenizer))
    filler = np.array(sp.encode(stdlib_text(60_000)))
    vocab = sp.get_piece_size()
    args = dict(lengths=[128, 256], depths=[0.0, 1.0], trials=6, prefix=[1])
    oracle = kv_retrieval_accuracy(NGramRetriever(vocab), sp.encode, filler, **args)
    assert [c["accuracy"] for c in oracle] == [1.0] * 4 and all(c["token_accuracy"] == 1.0 for c in oracle)
    random_model = kv_retrieval_accuracy(tiny_llama(vocab, max_pos=256), sp.encode, filler, **args)
    assert all(c["accuracy"] == 0.0 for c in random_model), random_model
    assert kv_retrieval_accuracy(tiny_llama(vocab, max_pos=256), sp.encode, filler, **args) == random_model
    assert [(c["length"], c["depth"]) for c in oracle] == [(128, 0.0), (128, 1.0), (256, 0.0), (256, 1.0)]
    assert oracle[2]["mean_distance"] > oracle[0]["mean_distance"] > oracle[1]["mean_distance"]


def test_eval_runs_the_probes_deterministically(tmp_path, stdlib_tokenizer):
    """`longtrain eval`'s probes: the hand-set copier gains > 1 nat on held-out text at 0.75 L, a random
    model ~0; the same --seed gives the same figures, another seed other passages; table and plot."""
    from longtrain.eval.runner import EvalConfig, run_eval
    from tests.support.models import save_hf

    # `longtrain tokenizer`'s 512 pieces (its key lines tokenize as the retrieval probe needs)
    copier = save_hf(induction_llama(vocab=512, head_dim=2048), stdlib_tokenizer, tmp_path / "copier")
    rand = save_hf(tiny_llama(512, max_pos=256), stdlib_tokenizer, tmp_path / "random")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(stdlib_text(40_000))
    cfg = dict(lengths=[128], max_tokens=256, passkey_trials=0, copy_passages=8, kv_trials=2, kv_depths=(0.0, 1.0),
               progress=False)
    res = run_eval([str(copier), str(rand)], [str(held_out)], tmp_path / "a", EvalConfig(**cfg), ["copier", "random"])
    copy, rand_copy = (m["copy"] for m in res["models"])
    assert [c["distance"] for c in copy] == [96], "default distance: the one whose sequence fills L"
    assert copy[0]["gain"] > 1.0 and copy[0]["gain_vs_control"] > 1.0, copy
    assert abs(rand_copy[0]["gain"]) < 0.1 and abs(rand_copy[0]["gain_vs_control"]) < 0.1, rand_copy
    assert all(set(m["kv"]["128"]) == {"0", "1"} and "kv_skipped" not in m for m in res["models"])
    again = run_eval([str(copier), str(rand)], [str(held_out)], tmp_path / "b", EvalConfig(**cfg), ["copier", "random"])
    for m, n in zip(res["models"], again["models"]):
        assert (m["copy"], m["kv_details"]) == (n["copy"], n["kv_details"]), "same seed, same figures"
    other = run_eval([str(rand)], [str(held_out)], tmp_path / "c", EvalConfig(**cfg, seed=1), ["random"])
    assert other["models"][0]["copy"][0]["nll_first"] != rand_copy[0]["nll_first"], "another seed: other passages"
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "copy gain (d)" in summary and f"| {copy[0]['gain']:+.2f} (96) |" in summary
    assert (tmp_path / "a" / "probes.png").read_bytes()[:4] == b"\x89PNG"
