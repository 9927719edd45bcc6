"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", section 4.2; also used by
LongLoRA and YaRN): a random 5-digit key is hidden at a chosen depth inside filler, and the model is
asked for it at the end; greedy decoding, exact match of the digits.

The filler is real text (a span of the evaluation documents' token stream), not the repeated
"The grass is green." of the original test, so the key does not stand out from trivially
predictable filler. The prompt is built at the token level so that its length is exact:

    [BOS] intro | filler[:a] | needle | filler[a:] | question      a = round(depth * filler_len)

``depth`` is the fraction of the filler (the haystack) that comes before the needle: 0 puts the key
right after the intro, 1 right before the question. The prompt has ``length - max_new_tokens``
tokens, so that the decoded answer stays within the evaluated context length.
"""
from __future__ import annotations

import dataclasses
import random
import re

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from data_prep.tokenizer import Tokenizer
from longtrain.eval.errors import EvalError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass
class PasskeyPrompt:
    ids: list[int]  # the whole prompt
    key: str
    depth: float
    needle_start: int  # index in ids of the needle's first token
    needle_len: int
    filler_start: int  # index in ids where the filler begins (after the intro)
    filler_len: int


def make_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def build_prompt(tokenizer: Tokenizer, filler: np.ndarray, prompt_len: int, depth: float,
                 key: str, offset: int = 0) -> PasskeyPrompt:
    """A prompt of exactly ``prompt_len`` tokens with the needle at ``depth`` of the filler, which is
    taken from ``filler`` (a token stream, read cyclically) starting at ``offset``."""
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"passkey depth {depth}: must be between 0 and 1")
    prefix = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(INTRO)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    filler_len = prompt_len - len(prefix) - len(needle) - len(question)
    if filler_len < 0:
        raise EvalError(f"passkey length: a prompt of {prompt_len} tokens cannot hold the "
                         f"{prompt_len - filler_len} tokens of instructions; use longer --passkey-lengths")
    span = np.take(filler, np.arange(offset, offset + filler_len), mode="wrap").tolist()
    a = round(depth * filler_len)
    ids = prefix + span[:a] + needle + span[a:] + question
    return PasskeyPrompt(ids, key, depth, len(prefix) + a, len(needle), len(prefix), filler_len)


def passkey_correct(generated: str, key: str) -> bool:
    """Exact match: the first run of digits in the generated text is the key."""
    match = re.search(r"\d+", generated)
    return match is not None and match.group() == key


@torch.no_grad()
def greedy_decode(model: nn.Module, ids: list[int], max_new_tokens: int, tokenizer: Tokenizer) -> str:
    """Greedy continuation of ``ids``, stopped once a digit run is followed by another character.

    A plain KV-cache loop rather than ``generate``: it needs only the forward signature of a
    causal LM (the test oracle is a plain nn.Module), and ``logits_to_keep=1`` keeps the prompt's
    forward from producing (length, vocab) logits.
    """
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    while True:
        nxt = out.logits[:, -1].argmax(-1)  # (1,)
        generated.append(int(nxt))
        text = tokenizer.decode(generated, skip_special=True)  # an EOS after the key is no character
        if len(generated) >= max_new_tokens or re.search(r"\d\D", text):
            return text
        # transformers 5.24 names the KV cache `cache` (`past_key_values` is deprecated)
        out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True, logits_to_keep=1)


def check_digits(tokenizer: Tokenizer) -> None:
    key = "1234567890"
    decoded = tokenizer.decode(tokenizer.encode(key), skip_special=True).strip()
    if decoded != key:
        raise EvalError(f"tokenizer {tokenizer.file} cannot represent digits ({key!r} decodes as "
                         f"{decoded!r}): passkey retrieval needs them; pass --passkey-trials 0")


def check_passkey_setup(tokenizer: Tokenizer, lengths, max_new_tokens: int) -> None:
    """Fail before any long computation if the tokenizer or the shortest length cannot work."""
    check_digits(tokenizer)
    for length in lengths:
        build_prompt(tokenizer, np.zeros(1, dtype=np.int64), length - max_new_tokens, 0.5, "12345")


def evaluate_passkey(model: nn.Module, tokenizer: Tokenizer, filler: np.ndarray, length: int,
                     depths=DEFAULT_DEPTHS, trials: int = 5, seed: int = 0, max_new_tokens: int = 8,
                     before_each=None, progress: bool = True, desc: str = "") -> list[dict]:
    """Accuracy at each depth for context ``length``. Keys and filler offsets depend only on
    (seed, length, depth, trial), so every model is asked the same questions."""
    check_digits(tokenizer)
    cells = []
    bar = tqdm(total=len(depths) * trials, desc=desc or f"passkey@{length}", disable=not progress)
    for depth in depths:
        rng = random.Random(f"passkey-{seed}-{length}-{depth}")
        results = []
        for _ in range(trials):
            key, frac = make_key(rng), rng.random()
            prompt = build_prompt(tokenizer, filler, length - max_new_tokens, depth, key,
                                  offset=int(frac * len(filler)))
            if before_each is not None:
                before_each()  # fresh RoPE state (dynamic NTK) for every prompt
            text = greedy_decode(model, prompt.ids, max_new_tokens, tokenizer)
            results.append({"key": key, "output": text, "correct": passkey_correct(text, key),
                            "needle_start": prompt.needle_start, "prompt_tokens": len(prompt.ids)})
            bar.update(1)
        correct = sum(r["correct"] for r in results)
        cells.append({"length": length, "depth": depth, "trials": trials, "correct": correct,
                      "accuracy": correct / trials if trials else None, "details": results})
    bar.close()
    return cells
