"""The one tiny model family of the test suite: Llama, Qwen2 and Mistral built from a small config.

``tiny_model_config`` is the ``model.config`` mapping of a run YAML (the trainer builds it);
``tiny_config`` / ``tiny_model`` build the same family in-process. Tests pass only what they vary.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
         "mistral": ("MistralConfig", "MistralForCausalLM")}


def tiny_model_config(arch: str = "llama", vocab_size: int = 512, **over: Any) -> dict:
    """``model.config`` for a run YAML; embeddings tied except for Mistral (whose real models do not tie)."""
    return {"model_type": arch, **TINY, "vocab_size": vocab_size, "tie_word_embeddings": arch != "mistral", **over}


def model_classes(arch: str):
    import transformers

    config_name, model_name = ARCHS[arch]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def tiny_config(arch: str = "llama", **over: Any):
    config_cls, _ = model_classes(arch)
    fields = tiny_model_config(arch, **over)
    fields.pop("model_type")
    return config_cls(**fields)


def tiny_model(arch: str = "llama", seed: int = 0, **over: Any) -> torch.nn.Module:
    """A randomly initialised model (``torch.manual_seed(seed)`` first: the same weights on every rank)."""
    _, model_cls = model_classes(arch)
    config = tiny_config(arch, **over)
    torch.manual_seed(seed)
    return model_cls(config)


def tiny_llama(vocab_size: int, max_pos: int = 128, rope: dict | None = None, seed: int = 0):
    """The suite's tiny Llama as a pretrained short model would come: tied embeddings, BOS 1 / EOS 2, eval mode."""
    return tiny_model("llama", seed, vocab_size=vocab_size, max_position_embeddings=max_pos,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0}).eval()


def save_hf(model, tokenizer_model: Path, folder: Path) -> Path:
    """``model`` as an exported HF folder would hold it: weights, config and ``tokenizer.model``."""
    model.save_pretrained(folder)
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder
