"""Apply a stage's RoPE setting to a loaded HF model, in place.

Frequencies always come from transformers' own functions (``ROPE_INIT_FUNCTIONS`` and the rotary
module's ``compute_default_rope_parameters``), so a model changed here computes exactly what a
model freshly built from the same config computes. Traps handled (DESIGN.md section 3):

- ``config.rope_theta`` no longer exists in transformers 5.x: only ``config.rope_parameters`` is
  read. We never set ``rope_theta``.
- ``inv_freq`` / ``original_inv_freq`` are non-persistent buffers: not in checkpoints, and cast
  to bf16 by ``model.to(torch.bfloat16)`` (angle errors of tens of radians at base 1e6 and 32k
  positions). We re-register them in fp32 on every application.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Our config form, per type: required and optional keys (besides "type"). Keys are named as in
# transformers' rope_parameters, except "theta" (-> "rope_theta"). "theta" is required everywhere:
# a stage always states its base, so a schedule never silently inherits one.
_SCHEMA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset({"theta"}), frozenset()),
    "linear": (frozenset({"theta", "factor"}), frozenset()),
    "dynamic": (frozenset({"theta", "factor"}), frozenset()),
    "yarn": (
        frozenset({"theta", "factor"}),
        frozenset({"beta_fast", "beta_slow", "attention_factor", "original_max_position_embeddings"}),
    ),
    "llama3": (
        frozenset({"theta", "factor", "low_freq_factor", "high_freq_factor"}),
        frozenset({"original_max_position_embeddings"}),
    ),
    # LongRoPE (Phi-3): per-frequency rescale factors, head_dim // 2 each; transformers uses the short set
    # up to original_max_position_embeddings and the long set beyond (switched in every forward).
    "longrope": (
        frozenset({"theta", "short_factor", "long_factor"}),
        frozenset({"factor", "attention_factor", "original_max_position_embeddings"}),
    ),
}
_LIST_KEYS = frozenset({"short_factor", "long_factor"})
_NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")  # transformers reads original_max_position_embeddings
ROPE_TYPES = tuple(_SCHEMA)
_INT_KEYS = frozenset({"original_max_position_embeddings"})


def _number(rope: dict, key: str, *, minimum: float, strict: bool = False) -> float:
    value = rope[key]
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        hint = " (YAML reads 1e6 as a string: write 1.0e6 or 1000000)" if isinstance(value, str) else ""
        raise ValueError(f"rope.{key} must be a number {bound}, got {value!r} (in {rope}){hint}")
    return float(value)


def rope_parameters(rope: dict, *, original_max_position_embeddings: int) -> dict[str, Any]:
    """Our config form -> transformers' ``config.rope_parameters`` dict.

    ``rope``: ``{"type": "default", "theta": 1e6}``, ``{"type": "linear", "factor": 4, "theta": ...}``,
    ``dynamic`` (factor), ``yarn`` (factor; optional beta_fast, beta_slow, attention_factor,
    original_max_position_embeddings), ``llama3`` (factor, low_freq_factor, high_freq_factor; optional
    original_max_position_embeddings), ``longrope`` (short_factor, long_factor; optional factor,
    attention_factor, original_max_position_embeddings); every type also needs ``theta``.
    ``original_max_position_embeddings``: the length the model was pretrained at; yarn, llama3 and
    longrope scale relative to it. We always set it explicitly because
    transformers otherwise fills it from ``max_position_embeddings``, which the schedule enlarges.
    """
    if not isinstance(rope, dict):
        raise ValueError(f"rope must be a mapping like {{'type': 'default', 'theta': 1e6}}, got {rope!r}")
    rope_type = rope.get("type")
    if rope_type not in _SCHEMA:
        raise ValueError(f"rope.type {rope_type!r} is not supported; valid types: {', '.join(ROPE_TYPES)}")
    required, optional = _SCHEMA[rope_type]
    given = set(rope) - {"type"}
    missing = sorted(required - given)
    unexpected = sorted(given - required - optional)
    valid = ", ".join(sorted(required | optional))
    if missing:
        raise ValueError(f"rope (type {rope_type}) is missing key(s) {missing}; keys for {rope_type}: {valid}")
    if unexpected:
        raise ValueError(f"rope (type {rope_type}) has unexpected key(s) {unexpected}; keys for {rope_type}: {valid}")

    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": _number(rope, "theta", minimum=0, strict=True)}
    for key in sorted(given - {"theta"}):
        if key in _INT_KEYS:
            value = rope[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"rope.{key} must be a positive integer, got {value!r}")
            out[key] = value
        elif key in _LIST_KEYS:
            value = rope[key]
            if not isinstance(value, (list, tuple)) or not value or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value):
                raise ValueError(f"rope.{key} must be a non-empty list of positive numbers (head_dim // 2 of "
                                 f"them), got {value!r}")
            out[key] = [float(x) for x in value]
        elif key == "factor":
            out[key] = _number(rope, key, minimum=1.0)
        else:
            out[key] = _number(rope, key, minimum=0, strict=key != "attention_factor")
    if rope_type == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"rope.high_freq_factor must be > rope.low_freq_factor, got {rope}")
    if rope_type == "yarn" and out.get("beta_fast", 32.0) <= out.get("beta_slow", 1.0):
        raise ValueError(f"rope.beta_fast must be > rope.beta_slow (defaults 32 and 1), got {rope}")
    if rope_type in _NEEDS_ORIGINAL:
        if isinstance(original_max_position_embeddings, bool) or not isinstance(original_max_position_embeddings, int) \
                or original_max_position_embeddings <= 0:
            raise ValueError(f"original_max_position_embeddings must be a positive int, got "
                             f"{original_max_position_embeddings!r}")
        out.setdefault("original_max_position_embeddings", original_max_position_embeddings)
    return out


def original_max_position_embeddings(config) -> int:
    """The pretraining length a model config's RoPE scales from: ``rope_parameters``'
    ``original_max_position_embeddings`` once a scaled stage set it, else ``max_position_embeddings``."""
    params = getattr(config, "rope_parameters", None) or {}
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def rotary_modules(model: nn.Module, required: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every rotary embedding module of a HF model, the one finder that training,
    export and eval use: a module holding its own ``inv_freq`` buffer and the ``config`` it was built
    from (``model.model.rotary_emb`` in Llama / Qwen2 / Mistral). ``required=False`` returns ``[]`` for a
    model without one (learned positions, or per-layer-type RoPE such as Gemma-3's
    ``{layer_type}_inv_freq``), which eval can still score."""
    found = [(name, m) for name, m in model.named_modules()
             if "inv_freq" in dict(m.named_buffers(recurse=False)) and hasattr(m, "config")]
    if required and not found:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (a module with an `inv_freq` "
                         "buffer and its `config`, as transformers' Llama/Qwen2/Mistral have)")
    return found


def _settable_rotaries(model: nn.Module) -> list[nn.Module]:
    """The rotary modules ``apply_rope`` can change: one RoPE type each, with ``original_inv_freq``."""
    found = [m for _, m in rotary_modules(model)]
    for m in found:
        if not isinstance(getattr(m, "rope_type", None), str) or not hasattr(m, "original_inv_freq"):
            raise ValueError(f"{type(m).__name__} uses per-layer-type RoPE or lacks `original_inv_freq` "
                             f"(rope_type {getattr(m, 'rope_type', None)!r}); not supported")
    return found


def _validate_on_copy(config, rope_params: dict[str, Any], max_position_embeddings: int) -> None:
    """transformers' own RoPE validation, on a copy so a bad setting leaves the model untouched."""
    trial = copy.deepcopy(config)
    trial.rope_parameters = copy.deepcopy(rope_params)
    trial.max_position_embeddings = max_position_embeddings
    try:  # missing keys raise KeyError; odd values only log a warning there
        trial.standardize_rope_params()
        trial.validate_rope()
    except KeyError as err:
        raise ValueError(f"invalid rope_params {rope_params}: {err}") from err


def _check_longrope_lengths(config, rope_params: dict[str, Any]) -> None:
    """transformers only warns on a wrong length and then fails deep inside with a broadcast error."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = int(head_dim * rope_params.get("partial_rotary_factor", 1.0)) // 2
    for key in _LIST_KEYS:
        if len(rope_params[key]) != half:
            raise ValueError(f"rope.{key} has {len(rope_params[key])} factors but this model needs {half} "
                             f"(head_dim {head_dim} // 2)")


def apply_rope(model: nn.Module, rope_params: dict[str, Any], max_position_embeddings: int) -> None:
    """Set ``rope_params`` (from :func:`rope_parameters`) on ``model`` in place and recompute its frequencies.

    Works on a plain HF model and on ``engine.module`` after DeepSpeed wrapped it (also cast to bf16,
    also ZeRO-3: buffers are not partitioned). Afterwards the model computes what a model freshly built
    with ``rope_parameters=rope_params, max_position_embeddings=max_position_embeddings`` computes.

    Note for ``dynamic``: transformers scales relative to ``config.max_position_embeddings`` (NTK only
    grows the base for sequences longer than it) and keeps the enlarged base after a long forward
    until a forward shorter than the original length (DESIGN.md 3b trap (b)). Calling this function
    again resets that state; evaluate each length on a freshly reset model.
    """
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) \
            or max_position_embeddings <= 0:
        raise ValueError(f"max_position_embeddings must be a positive int, got {max_position_embeddings!r}")
    rope_type = rope_params.get("rope_type")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_params['rope_type']={rope_type!r}; valid: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    if rope_type in _NEEDS_ORIGINAL and "original_max_position_embeddings" not in rope_params:
        # transformers would fill it from max_position_embeddings, i.e. the *new* length: scaling by nothing.
        raise ValueError(f"rope_params for {rope_type} need original_max_position_embeddings (the pretraining "
                         "length); build them with rope_parameters(...)")
    rotaries = _settable_rotaries(model)
    configs = {id(m.config): m.config for m in rotaries}
    if getattr(model, "config", None) is not None:  # the HF model's own config (same object in Llama/Qwen2/Mistral)
        configs[id(model.config)] = model.config
    _validate_on_copy(next(iter(configs.values())), rope_params, max_position_embeddings)
    if rope_type == "longrope":
        _check_longrope_lengths(next(iter(configs.values())), rope_params)
    for config in configs.values():
        # Never `config.rope_theta` (DESIGN.md section 3): 5.x reads only rope_parameters.
        config.rope_parameters = dict(rope_params)
        config.max_position_embeddings = max_position_embeddings
        config.standardize_rope_params()
    for module in rotaries:
        device = module.inv_freq.device
        # (head_dim // 2,) fp32, computed on CPU like a model built on CPU would, then moved to the buffer's device.
        if rope_type == "default":  # a staticmethod of the rotary class, computes on CPU
            inv_freq, attention_scaling = type(module).compute_default_rope_parameters(module.config)
        else:
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](module.config, device=torch.device("cpu"))
        inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        # Re-register (not copy_ into the old buffer): the old one may be bf16 after model.to(bf16).
        module.register_buffer("inv_freq", inv_freq, persistent=False)
        module.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        module.rope_type = rope_type
        module.attention_scaling = attention_scaling
        # Mirrors the constructor; this also resets dynamic NTK's enlarged state.
        module.max_seq_len_cached = max_position_embeddings
        module.original_max_seq_len = max_position_embeddings
        if hasattr(module, "long_inv_freq"):  # LongRoPE's cached long set (a plain attribute): now stale
            delattr(module, "long_inv_freq")


def describe_rope(model: nn.Module) -> str:
    """One line for logs: the RoPE setting and frequencies the model actually holds."""
    module = rotary_modules(model)[0][1]
    inv = module.inv_freq
    params = ", ".join(f"{k}={f'[{len(v)} factors]' if isinstance(v, (list, tuple)) else v}"
                       for k, v in module.config.rope_parameters.items() if k != "rope_type")
    return (f"rope {module.rope_type} ({params}), max_position_embeddings={module.config.max_position_embeddings}, "
            f"attention_scaling={module.attention_scaling:.4f}, inv_freq {str(inv.dtype).replace('torch.', '')} "
            f"[{inv.max().item():.3g} .. {inv.min().item():.3g}], longest period {2 * math.pi / inv.min().item():.4g}")
