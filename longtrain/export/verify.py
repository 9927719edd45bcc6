"""Verification of a written export: load it with ``from_pretrained`` and compare it with the
checkpoint's fp32 model: weights (rounded to the export dtype) and logits on sample rows of the
stage's dataset, the config, both RoPE forms of ``config.json``, and the RoPE frequencies
(``inv_freq`` is a non-persistent buffer, so the loaded model's are checked against the stage's).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from longtrain.data import PreparedDataset
from longtrain.export.consolidate import current_stage
from longtrain.export.errors import VerificationError
from longtrain.export.files import legacy_rope_keys
from longtrain.rope import apply_rope, rotary_modules

# Logits of the export loaded in its own dtype vs the fp32 checkpoint model, relative to the largest
# |logit| of the reference (at least 1). bf16 keeps 8 significant bits, fp16 11, and the rounding
# compounds over layers: random 20M-70M-parameter Llamas show up to 5% (bf16) and 0.6% (fp16), trained
# models with activation outliers more (docs/export.md). These bounds only flag a broken export (NaN,
# inf, fp16 overflow, wrong weights: errors of order 100%); exactness is checked separately and
# without tolerance (same dtype, same weights, same logits).
NATIVE_RTOL = {torch.float32: 1e-6, torch.bfloat16: 0.25, torch.float16: 0.1}
FP32_ATOL = 1e-5  # absolute bound for fp32 exports (the acceptance bound)


@dataclasses.dataclass
class Verification:
    source: str                    # where the sample rows came from
    rows: int
    tokens: int                    # per row; positions are the last `tokens` of the stage's context
    max_abs_diff: float            # logits: export in its dtype vs the fp32 checkpoint model
    max_abs_logit: float           # largest |logit| of the fp32 checkpoint model
    tolerance: float
    same_dtype_max_abs_diff: float  # logits: export vs the checkpoint model cast to the export dtype
    weights_equal: bool            # every tensor == the consolidated fp32 weight rounded to the dtype
    rope_equal: bool               # inv_freq (fp32) and attention scaling == the stage's
    config_diff: dict[str, Any]    # model-shape keys that differ from the checkpoint's HF config
    legacy_rope_ok: bool           # config.json's rope_theta / rope_scaling say what rope_parameters say

    @property
    def passed(self) -> bool:
        return (self.weights_equal and self.rope_equal and not self.config_diff and self.legacy_rope_ok
                and self.same_dtype_max_abs_diff <= FP32_ATOL and self.max_abs_diff <= self.tolerance)

    def lines(self) -> list[str]:
        ok = lambda flag: "ok" if flag else "FAILED"  # noqa: E731
        native_ok, same_ok = self.max_abs_diff <= self.tolerance, self.same_dtype_max_abs_diff <= FP32_ATOL
        return [
            f"verify: {self.rows} x {self.tokens} tokens ({self.source})",
            f"verify: max |logits diff| vs the fp32 checkpoint model: {self.max_abs_diff:.3g} (tolerance "
            f"{self.tolerance:.3g}; largest |logit| {self.max_abs_logit:.3g}) {ok(native_ok)}",
            f"verify: max |logits diff| vs the checkpoint model in the export dtype: "
            f"{self.same_dtype_max_abs_diff:.3g} {ok(same_ok)}",
            f"verify: weights equal the consolidated checkpoint: {ok(self.weights_equal)}; RoPE inv_freq equals the "
            f"stage's: {ok(self.rope_equal)}; config: {ok(not self.config_diff)}"
            + (f" {self.config_diff}" if self.config_diff else "") + f"; 4.x RoPE keys: {ok(self.legacy_rope_ok)}",
        ]


def sample_inputs(state: dict[str, Any], vocab_size: int, context: int, rows: int, tokens: int,
                  log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(input_ids, position_ids, source)``, both ``(rows, L)`` with ``L = min(tokens, context)``: the
    first rows of the checkpoint stage's dataset (validation split if any), else deterministic random
    ids. Positions are the *last* L of the context, where a RoPE mistake shows most."""

    length = max(1, min(tokens, context))
    _, stage = current_stage(state)
    data = stage.get("data")
    ids, source = None, "deterministic random ids"
    if data:
        try:

            split = "validation" if (Path(data) / "validation").is_dir() else "train"
            dataset = PreparedDataset(data, split)
            batch = dataset.rows(list(range(min(rows, len(dataset)))))
            ids = torch.from_numpy(np.stack([r["input_ids"][:length] for r in batch]).astype(np.int64))
            if int(ids.max()) >= vocab_size:
                raise ValueError(f"token id {int(ids.max())} >= vocab size {vocab_size}")
            source = f"{len(batch)} {split} rows of {data}"
        except Exception as exc:  # any reason: the fallback is announced and still checks the export
            log(f"note: verifying on random ids: the stage's dataset {data} is not readable ({exc})")
            ids = None
    if ids is None:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    positions = torch.arange(context - ids.shape[1], context).expand(ids.shape[0], -1)
    return ids, positions, source


@torch.no_grad()
def _hidden(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(R, L) ids -> (R, L, E) last hidden states (logits are formed chunk by chunk from these)."""
    return model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state


@torch.no_grad()
def _logits_diff(head, hidden, ref_head, ref_hidden, chunk: int = 64) -> tuple[float, float]:
    """(max |logits - ref logits|, max |ref logits|), never holding (R, L, vocab) logits in full."""
    diff, scale = 0.0, 0.0
    for start in range(0, hidden.shape[1], chunk):
        got = head(hidden[:, start:start + chunk]).float()  # (R, chunk, V)
        want = ref_head(ref_hidden[:, start:start + chunk]).float()
        delta = (got - want).abs()
        diff = max(diff, float(delta.max()) if torch.isfinite(delta).all() else float("inf"))
        scale = max(scale, float(want.abs().max()))
    return diff, scale


# Keys of the HF config that may differ between the checkpoint and the export by design.
_CONFIG_KEYS_CHANGED = {"use_cache", "dtype", "torch_dtype", "architectures", "bos_token_id", "eos_token_id",
                        "pad_token_id", "transformers_version", "_name_or_path", "rope_theta", "rope_scaling",
                        "original_max_position_embeddings"}


@torch.no_grad()
def verify_export(out: Path, reference, dtype: torch.dtype, rope: tuple[dict[str, Any], int],
                  ids: torch.Tensor, positions: torch.Tensor, source: str) -> Verification:
    """Load ``out`` with ``AutoModelForCausalLM.from_pretrained`` (dtype from its config) and compare it
    with ``reference``: the fp32 checkpoint model with the stage's RoPE applied, which is cast to
    ``dtype`` in place first (its fp32 hidden states and head are kept), so that at most the export
    and one 16-bit copy of the model are held besides (memory: see the CLI help)."""

    ref_hidden, ref_head = _hidden(reference, ids, positions), copy.deepcopy(reference.lm_head)  # fp32
    if dtype != torch.float32:
        reference.to(dtype)  # the same rounding as the written weights (Tensor.to, round to nearest even)
        apply_rope(reference, *rope)  # .to() cast inv_freq too: the stage's fp32 frequencies again
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto", attn_implementation="sdpa").eval()
    if loaded.dtype != dtype:
        raise VerificationError(f"{out}: loads as {loaded.dtype}, expected {dtype} (config.json dtype)")
    ref_state = reference.state_dict()
    weights_equal = all(name in ref_state and torch.equal(value, ref_state[name])
                        for name, value in loaded.state_dict().items())
    ref_rots, got_rots = rotary_modules(reference), rotary_modules(loaded)
    rope_equal = [n for n, _ in ref_rots] == [n for n, _ in got_rots] and all(
        got.inv_freq.dtype == torch.float32 and torch.equal(got.inv_freq, ref.inv_freq)
        and got.attention_scaling == ref.attention_scaling for (_, ref), (_, got) in zip(ref_rots, got_rots))
    want_cfg, got_cfg = reference.config.to_dict(), loaded.config.to_dict()
    config_diff = {k: (v, got_cfg.get(k)) for k, v in want_cfg.items()
                   if k not in _CONFIG_KEYS_CHANGED and not k.startswith("_") and got_cfg.get(k) != v}
    # transformers 5.x ignores rope_theta when rope_parameters has one: check the 4.x keys by reading them.
    written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    written_rope = written.get("rope_parameters") or {}
    legacy_ok = (all(written_rope.get(k) == v for k, v in rope[0].items())
                 and all(written.get(k, "missing") == v for k, v in legacy_rope_keys(written_rope).items()))

    hidden = _hidden(loaded, ids, positions)  # (R, L, E)
    diff, scale = _logits_diff(loaded.lm_head, hidden, ref_head, ref_hidden)
    tolerance = FP32_ATOL if dtype == torch.float32 else NATIVE_RTOL[dtype] * max(1.0, scale)
    same = diff if dtype == torch.float32 else _logits_diff(loaded.lm_head, hidden, reference.lm_head,
                                                            _hidden(reference, ids, positions))[0]
    return Verification(source, ids.shape[0], ids.shape[1], diff, scale, tolerance, same, weights_equal,
                        rope_equal, config_diff, legacy_ok)
