"""Probes that show whether a causal LM uses its context: repeat-copy gain and key-value retrieval.

Pure functions over a causal LM (anything called as ``model(input_ids=(B, S), use_cache=False,
logits_to_keep=positions)`` that returns ``.logits``, as Hugging Face models are) and token ids:
held-out text comes in as one token stream (documents concatenated), and text that must be
tokenized (the retrieval task's lines) goes through an ``encode(text) -> list[int]`` callable
without BOS/EOS. Every choice comes from a seeded generator keyed by (seed, length or distance,
trial), so two models are asked exactly the same questions.

**Repeat-copy gain** (the induction-head test of Olsson et al. 2022, "In-context learning and
induction heads", measured on real text): a passage ``A`` of ``P`` tokens and other text ``F`` are
cut from the held-out stream at random places, and the model reads

    A  F  A        len(F) = D - P, so the sequence has D + P tokens

``D`` is the **start-to-start distance**: the repeat's first token sits ``D`` positions after the
first copy's first token. ``gain = NLL(first copy) - NLL(repeat)`` in nats per token, each mean over
the copy's tokens but its first (its first token cannot be predicted from the other copy), averaged
over ``passages`` sequences. With the default ``P = 32`` and a model trained at ``L = 128``,
``D = 96 = 0.75 L`` fills exactly ``L`` tokens and ``D = 480 = 3.75 L`` fills ``4 L = 512``.
The first copy sits at positions 1..P-1, where any model is context-starved, so ``gain`` is
slightly positive even without copying; ``gain_vs_control`` removes that: the same repeat tokens at
the same positions after ``A' F`` (``A'`` another passage), ``NLL(control) - NLL(repeat)``.

**Key-value retrieval** (RULER's multi-key needle, Hsieh et al. 2024, at the token level):
``keys`` lines ``KEY = VALUE`` (the format of ``data_prep.synthetic``'s ``kv`` documents: words of
``KEY_WORDS``, ``value_digits`` random digits) are placed at line starts of held-out filler, and the
prompt ends with one of them again; the prompt has exactly ``length`` tokens, its last tokens being
the asked value. ``depth`` is the fraction of the filler before the asked line (0: right at the
start, 1: right before the question); the distractors go to random line starts. Scored
**teacher-forced**: a trial is correct when the argmax prediction of every value token, given the
true prompt before it, is that token (exact match; as greedy decoding of the value would give,
without running a decoder loop). ``token_accuracy`` is the per-token rate.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.synthetic import KEY_WORDS, KV_LINE

Encode = Callable[[str], list]
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-free module (a test oracle)
        return torch.device("cpu")


@torch.no_grad()
def _logits_at(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 logits (B, len(positions), V) at ``positions`` only (the LM head is applied there alone)."""
    out = model(input_ids=ids.to(_device(model)), use_cache=False, logits_to_keep=positions.to(_device(model)))
    return out.logits.float().cpu()


def _nll(model: nn.Module, seqs: np.ndarray, targets: np.ndarray, batch_size: int, before_each=None) -> np.ndarray:
    """NLL (B, len(targets)) of ``seqs[:, t]`` for each target index ``t`` (predicted at ``t - 1``)."""
    out = []
    for s in range(0, len(seqs), batch_size):
        if before_each is not None:
            before_each()  # fresh RoPE state (dynamic NTK) for every forward
        ids = torch.from_numpy(seqs[s:s + batch_size]).long()
        logits = _logits_at(model, ids, torch.from_numpy(targets - 1).long())  # (b, T, V)
        gold = ids[:, torch.from_numpy(targets).long()]  # (b, T)
        out.append(F.cross_entropy(logits.transpose(1, 2), gold, reduction="none").numpy())
    return np.concatenate(out)


def _spans(rng: random.Random, n_stream: int, sizes: Sequence[int]) -> list[int]:
    """Starts of non-overlapping spans of ``sizes`` tokens at random places of a stream."""
    for _ in range(1000):
        starts = [rng.randrange(0, n_stream - size + 1) for size in sizes]
        ranges = sorted(zip(starts, sizes))
        if all(a + n <= b for (a, n), (b, _) in zip(ranges, ranges[1:])):
            return starts
    raise ValueError(f"held-out stream of {n_stream} tokens is too short for spans of {list(sizes)} tokens")


def copy_sequences(stream: np.ndarray, distance: int, passage: int, n: int, seed: int):
    """(repeat sequences, control sequences), each (n, distance + passage): ``A F A`` and ``A' F A``."""
    if not passage >= 2:
        raise ValueError(f"passage length {passage}: need at least 2 tokens (the first is not scored)")
    if distance < passage:
        raise ValueError(f"copy distance {distance} is shorter than the passage ({passage} tokens): the copies "
                         "would overlap; the distance is start-to-start")
    rng = random.Random(f"copy-{seed}-{distance}-{passage}")
    gap = distance - passage
    rep, ctl = [], []
    for _ in range(n):
        a, other, f = _spans(rng, len(stream), [passage, passage, max(gap, 1)])
        A, A2, Fill = stream[a:a + passage], stream[other:other + passage], stream[f:f + gap]
        rep.append(np.concatenate([A, Fill, A]))
        ctl.append(np.concatenate([A2, Fill, A]))
    return np.stack(rep).astype(np.int64), np.stack(ctl).astype(np.int64)


def repeat_copy_gain(model: nn.Module, stream: np.ndarray, distances: Sequence[int], passage: int = 32,
                     passages: int = 64, seed: int = 0, batch_size: int = 16, before_each=None) -> list[dict]:
    """Copy gain by start-to-start distance (module docstring): one dict per distance with
    ``distance, passage, passages, tokens`` (sequence length), ``nll_first, nll_repeat,
    nll_control`` (nats per token), ``gain = nll_first - nll_repeat``,
    ``gain_vs_control = nll_control - nll_repeat``."""
    stream = np.asarray(stream)
    results = []
    for d in distances:
        rep, ctl = copy_sequences(stream, int(d), passage, passages, seed)
        first = np.arange(1, passage)                 # targets of the first copy, its first token excluded
        repeat = np.arange(d + 1, d + passage)        # the same tokens in the repeat
        nll_rep = _nll(model, rep, np.concatenate([first, repeat]), batch_size, before_each)
        nll_ctl = _nll(model, ctl, repeat, batch_size, before_each)
        f, r, c = (float(x) for x in (nll_rep[:, :passage - 1].mean(), nll_rep[:, passage - 1:].mean(), nll_ctl.mean()))
        results.append({"distance": int(d), "passage": passage, "passages": passages, "tokens": int(d + passage),
                        "nll_first": f, "nll_repeat": r, "nll_control": c, "gain": f - r, "gain_vs_control": c - r})
    return results


# ------------------------------------------------------------------------------------------- retrieval
def line_ids(encode: Encode, text: str) -> list[int]:
    """Ids of ``text`` at the start of a line, as inside a document (``encode("\\n" + text)``
    minus ``encode("\\n")``); raises when the tokenizer does not split at newlines."""
    head, ids = list(encode("\n")), list(encode("\n" + text))
    if ids[:len(head)] != head:
        raise ValueError(f"the tokenizer does not split at newlines ({text[:30]!r}): the retrieval probe places "
                         "its lines at line starts and needs a newline that is a token of its own")
    return ids[len(head):]


@dataclasses.dataclass
class KVPrompt:
    ids: list[int]        # exactly ``length`` tokens; the asked value is the last ``length - value_start``
    value_start: int      # index of the value's first token
    needle_start: int     # index of the asked key line's first token
    question_start: int   # index of the last line's first token (the key asked again)

    @property
    def distance(self) -> int:
        return self.question_start - self.needle_start


def kv_prompt(encode: Encode, filler: np.ndarray, length: int, depth: float, keys: int, value_digits: int,
              rng: random.Random, prefix: Sequence[int] = ()) -> KVPrompt:
    """A retrieval prompt of exactly ``length`` tokens (``prefix``, e.g. ``[bos_id]``, included)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"retrieval depth {depth}: must be between 0 and 1")
    newline = line_ids(encode, "\n")
    names = rng.sample(KEY_WORDS, keys)
    values = ["".join(rng.choice("0123456789") for _ in range(value_digits)) for _ in names]
    needles = [line_ids(encode, KV_LINE.format(key=k, value=v) + "\n") for k, v in zip(names, values)]
    asked = line_ids(encode, KV_LINE.format(key=names[0], value=""))
    question = needles[0][:-len(newline)]  # the asked line without its newline: ends with the value
    if question[:len(asked)] != asked or len(question) == len(asked):
        raise ValueError("the tokenizer merges a key line's value with what precedes it; the probe cannot "
                         "tell the value's tokens apart")
    n_filler = length - len(prefix) - sum(map(len, needles)) - len(newline) - len(question)
    if n_filler < 1:
        raise ValueError(f"retrieval length {length}: too short for {keys} key lines and the question")
    start = rng.randrange(0, len(filler))
    hay = np.take(filler, np.arange(start, start + n_filler), mode="wrap").tolist()
    n = len(newline)
    line_starts = [i for i in range(n, n_filler + 1) if hay[i - n:i] == newline] or [n_filler]

    def snap(i: int) -> int:  # the line start nearest to i
        return min(line_starts, key=lambda s: abs(s - i))

    spots = [snap(round(depth * n_filler))] + [snap(rng.randrange(0, n_filler + 1)) for _ in needles[1:]]
    pieces = list(hay)
    # Inserted from the end so earlier spots keep their index; lines sharing a spot keep key order.
    for j in sorted(range(keys), key=lambda j: (spots[j], j), reverse=True):
        pieces[spots[j]:spots[j]] = needles[j]
    ids = list(prefix) + pieces + newline + question
    if len(ids) != length:
        raise AssertionError(f"kv prompt has {len(ids)} tokens, expected {length}")
    needle_start = len(prefix) + spots[0] + sum(len(needles[j]) for j in range(1, keys) if spots[j] < spots[0])
    if ids[needle_start:needle_start + len(question)] != question:
        raise AssertionError("asked key line not where it was placed")
    return KVPrompt(ids, length - (len(question) - len(asked)), needle_start, length - len(question))


def kv_retrieval_accuracy(model: nn.Module, encode: Encode, filler: np.ndarray, lengths: Sequence[int],
                          depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 20, keys: int = 4,
                          value_digits: int = 4, seed: int = 0, prefix: Sequence[int] = (), batch_size: int = 16,
                          before_each=None) -> list[dict]:
    """Teacher-forced exact-match accuracy of the asked value (module docstring), one dict per
    (length, depth): ``length, depth, trials, keys, accuracy, token_accuracy, mean_distance``
    (tokens from the asked key line's start to the question's start)."""
    filler = np.asarray(filler)
    cells = []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"kv-{seed}-{length}-{depth}-{keys}-{value_digits}")
            prompts = [kv_prompt(encode, filler, int(length), float(depth), keys, value_digits, rng, prefix)
                       for _ in range(trials)]
            first = min(p.value_start for p in prompts)
            targets = np.arange(first, int(length))  # every prompt's value lies in here
            hits, scored = [], []
            for s in range(0, trials, batch_size):
                if before_each is not None:
                    before_each()
                batch = prompts[s:s + batch_size]
                ids = torch.tensor([p.ids for p in batch])
                pred = _logits_at(model, ids, torch.from_numpy(targets - 1)).argmax(-1)  # (b, T)
                hits.append((pred == ids[:, targets]).numpy())
                scored.append(np.array([[t >= p.value_start for t in targets] for p in batch]))
            hit, mask = np.concatenate(hits), np.concatenate(scored)
            cells.append({"length": int(length), "depth": float(depth), "trials": trials, "keys": keys,
                          "accuracy": float((hit | ~mask).all(1).mean()),
                          "token_accuracy": float(hit[mask].mean()),
                          "mean_distance": float(np.mean([p.distance for p in prompts]))})
    return cells
