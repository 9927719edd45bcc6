"""Load a model to evaluate (exported HF folder or longtrain checkpoint), and reset its RoPE state.

Fresh RoPE per length (DESIGN.md section 3b, trap b): transformers' dynamic NTK rotary embedding
enlarges its base during a long forward and keeps it for a following forward of length exactly
``max_position_embeddings`` (``dynamic_rope_update`` only resets when ``seq_len < original``).
Instead of reloading weights for every length, we rebuild each rotary embedding module from the
model config with the module's own constructor, which is what a fresh ``from_pretrained`` does.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from data_prep.errors import DataPrepError
from data_prep.tokenizer import Tokenizer
from longtrain import checkpoint
from longtrain.eval.errors import EvalLoadError
from longtrain.export.files import DTYPES
from longtrain.rope import rotary_modules


# What data prep's Tokenizer reads from a folder (tokenizer_config.json: the special tokens of a tokenizer.json).
HUB_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")




@dataclasses.dataclass
class EvalModel:
    name: str
    path: str
    kind: str  # "hf" | "checkpoint"
    model: nn.Module  # a transformers *ForCausalLM in eval mode
    tokenizer: Tokenizer  # data prep's loader: the ids the training rows were encoded with


def model_kind(path: str | Path) -> str:
    """'checkpoint' for a longtrain run dir or tag folder, 'hf' for a HF folder (or a Hub name)."""
    p = Path(path)
    if (p / checkpoint.STATE_FILE).is_file() or (p / "checkpoints").is_dir() or checkpoint.complete_checkpoints(p):
        return "checkpoint"
    if p.is_dir() and not (p / "config.json").is_file():
        raise EvalLoadError(
            f"MODEL {path}: a folder without config.json (not an exported HF model) and without "
            f"longtrain_state.json or checkpoints/ (not a longtrain checkpoint); pass an exported "
            f"folder (`longtrain export`) or a run / checkpoint folder")
    return "hf"


def load_eval_model(path: str, name: str | None = None, device: str = "cpu", dtype: str = "fp32",
                    attn_implementation: str = "sdpa") -> EvalModel:
    """Load MODEL (exported HF folder, Hub name, longtrain run dir or checkpoint tag folder)."""
    if dtype not in DTYPES:
        raise EvalLoadError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    kind = model_kind(path)
    if kind == "checkpoint":
        from longtrain.export import load_checkpoint_model  # imports deepspeed: only when needed

        model, tokenizer_path = load_checkpoint_model(path)
        check_rotary_matches_config(model, path)  # before the cast: bf16 would blur the comparison
        model = model.to(dtype=DTYPES[dtype])
        # a training model may carry longtrain's packed-row attention; eval feeds plain rows
        model.set_attn_implementation(attn_implementation)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
        except OSError as exc:
            raise EvalLoadError(f"MODEL {path}: cannot load it as a HF causal LM ({exc})") from exc
        check_rotary_matches_config(model, path)
        tokenizer_path = path if Path(path).exists() else _hub_tokenizer_folder(path)
    model = model.to(device).eval()
    reset_rotary_embeddings(model)
    return EvalModel(name or Path(path).name, str(path), kind, model, load_tokenizer(tokenizer_path))


def _hub_tokenizer_folder(name: str) -> Path:
    """A Hub model's tokenizer files as a local folder (the cached snapshot when offline): data prep's
    loader reads files, it does not know the Hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=list(HUB_TOKENIZER_FILES)))
    except Exception as exc:  # offline and not cached, unknown repo, no network: all one user error
        raise EvalLoadError(f"MODEL {name}: cannot fetch its tokenizer files from the Hub ({exc}); download the "
                            f"model into a folder and pass that folder") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at ``path`` (a tokenizer file or a folder holding one), loaded as data prep loads it
    (``data_prep.tokenizer.Tokenizer``: a folder's ``tokenizer.json`` before its ``tokenizer.model``), so
    eval encodes text into exactly the ids ``longtrain prepare`` and training use."""
    try:
        return Tokenizer(path)
    except DataPrepError as exc:  # named as the MODEL argument whose tokenizer it is
        raise EvalLoadError(f"MODEL {path}: {exc}") from None


def _fresh_rotary(module: nn.Module, device: torch.device) -> nn.Module:
    try:
        fresh = type(module)(config=module.config)
    except TypeError as exc:
        raise EvalLoadError(f"cannot rebuild {type(module).__name__} from its config ({exc}); "
                            f"this architecture's rotary embedding is not supported by eval") from exc
    # .to(device) moves buffers without casting: inv_freq stays fp32 (DESIGN.md section 3).
    return fresh.to(device=device)


def reset_rotary_embeddings(model: nn.Module) -> int:
    """Replace every rotary embedding module by a fresh one built from the config (as after
    ``from_pretrained``). Returns how many were replaced."""
    found = rotary_modules(model, required=False)  # a model without RoPE has nothing to reset
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _fresh_rotary(module, module.inv_freq.device))
    return len(found)


def check_rotary_matches_config(model: nn.Module, path: str) -> None:
    """Refuse a model whose rotary frequencies are not what its config describes: eval rebuilds
    them from the config, which would silently change such a model."""
    for name, module in rotary_modules(model, required=False):
        fresh = _fresh_rotary(module, module.inv_freq.device)
        rtol = 1e-3 if module.inv_freq.dtype == torch.float32 else 1e-2  # a bf16 copy is ~3 digits
        if not torch.allclose(module.inv_freq.float(), fresh.inv_freq.float(), rtol=rtol, atol=0):
            raise EvalLoadError(
                f"MODEL {path}: {name}.inv_freq differs from what config.rope_parameters "
                f"({model.config.rope_parameters}) gives; the config must describe the model's RoPE")


def rope_settings(config) -> dict:
    """The RoPE settings as read from the config (transformers 5.x `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None)
    params = dict(params) if params else None
    return json.loads(json.dumps({
        "rope_parameters": params,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }, default=str))
