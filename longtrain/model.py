"""Load (or build) the Hugging Face causal LM a run trains, and find its tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from longtrain.config import ConfigError, ModelConfig
from longtrain.rope import rotary_modules

# Files that make a folder a tokenizer we can identify (DESIGN.md section 2: sha256 of the file).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def zero3_loading(cfg: ModelConfig, ds_config: dict[str, Any]) -> HfDeepSpeedConfig | None:
    """Under ZeRO-3, let transformers load pretrained weights straight into partitions
    (deepspeed.zero.Init), so no rank ever holds the full model. Keep the returned object alive for
    the run: transformers holds only a weak reference to it."""
    if ds_config["zero_optimization"]["stage"] == 3 and cfg.name_or_path is not None:
        return HfDeepSpeedConfig(ds_config)
    return None


def load_model_config(cfg: ModelConfig):
    """The model's HF config alone (``config.json`` of the folder, or built from ``model.config``): what
    resolving stages and planning memory need, without loading any weight."""
    if cfg.name_or_path is not None:
        try:
            return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {exc}") from None
    fields = dict(cfg.config)
    model_type = fields.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"model.config: cannot build a {model_type!r} config: {exc}") from None


def load_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model in fp32 on CPU (DeepSpeed moves and casts it), with transformers' sdpa attention.

    The trainer then selects our document-masked attention (``longtrain.attention``) in one
    explicit step; nothing here patches model code.
    """
    if cfg.name_or_path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path, dtype=torch.float32, attn_implementation="sdpa",
                trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {exc}") from None
    else:
        hf_config = load_model_config(cfg)
        hf_config._attn_implementation = "sdpa"
        # A fixed seed makes from-scratch initialisation identical on every rank and every run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                     trust_remote_code=cfg.trust_remote_code)
    check_model_supported(model)
    return model


def check_model_supported(model: torch.nn.Module) -> None:
    """longtrain extends RoPE models: the model must hold a rotary embedding module (found as
    ``apply_rope`` finds it) and an LM head."""
    if not rotary_modules(model, required=False) or not hasattr(model, "lm_head"):
        raise ConfigError(
            f"model: {type(model).__name__} is not a supported RoPE causal LM (need a rotary embedding module "
            "with an inv_freq buffer, e.g. model.model.rotary_emb, and model.lm_head; Llama, Qwen2 and Mistral "
            "families are supported)")


def tokenizer_path(cfg: ModelConfig) -> Path | None:
    """The tokenizer file a run uses: model.tokenizer, else the model folder's tokenizer file."""
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer)
        if not path.exists():
            raise ConfigError(f"model.tokenizer: {path} does not exist")
        return path
    if cfg.name_or_path is not None and Path(cfg.name_or_path).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(cfg.name_or_path) / name).is_file():
                return Path(cfg.name_or_path)
    return None


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether zero.Init loaded the model straight into ZeRO-3 partitions."""
    return hasattr(model.get_input_embeddings().weight, "ds_numel")


def embedding_rows(model: torch.nn.Module) -> int:
    """The vocabulary the model's embedding holds (``ds_shape``: partitioned by zero.Init)."""
    embed = model.get_input_embeddings().weight
    return int(getattr(embed, "ds_shape", embed.shape)[0])


def attention_width(config) -> int:
    """``num_attention_heads * head_dim``: the attention FLOPs' width (longtrain.metrics.training_flops)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim * config.num_attention_heads


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters, counting tied weights once (ZeRO-3 partitioned ones by their ds_numel)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += int(getattr(param, "ds_numel", param.numel()))
    return total
