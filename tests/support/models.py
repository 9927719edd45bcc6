"""The one tiny model family of the test suite: Llama, Qwen2 and Mistral built from a small config.

``tiny_model_config`` is the ``model.config`` mapping of a run YAML (the trainer builds it);
``tiny_config`` / ``tiny_model`` build the same family in-process. Tests pass only what they vary.
``induction_llama`` is a Llama with hand-set weights that copies (the context probes' positive control).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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


def induction_llama(vocab: int = 64, head_dim: int = 256, theta: float = 1e6) -> LlamaForCausalLM:
    """A 2-layer HF Llama whose weights are set by hand to copy (Olsson et al. 2022's induction circuit).

    Residual stream: one-hot token ``[0, V)``, previous token ``[V, 2V)``, copied token ``[2V, 3V)``,
    a constant ``3V``. Layer 0's head attends to the previous position (queries and keys from the
    constant dimension; the query is pre-rotated by one position, so RoPE's scores peak at offset 1)
    and writes that token into the previous-token space. Layer 1's head matches the current token
    (query) against each position's previous token (key) in RoPE's slowest pairs, where the rotation
    hardly moves over a few hundred positions, and writes the token found there into the copied space,
    which alone feeds the LM head. MLPs are zero; norms are 1.
    """
    V = vocab
    tok, prev, out, const = 0, V, 2 * V, 3 * V
    cfg = LlamaConfig(vocab_size=V, hidden_size=3 * V + 1, intermediate_size=4, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=1024,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": theta})
    model = LlamaForCausalLM(cfg)
    half, ids = head_dim // 2, torch.arange(V)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (half,)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.zero_()
        model.model.embed_tokens.weight[ids, tok + ids] = 1.0
        model.model.embed_tokens.weight[:, const] = 1.0
        a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        fast = torch.arange(16)  # transformers rotates dims (i, i + half) by position * inv_freq[i]
        a0.k_proj.weight[fast, const] = 1.0
        a0.q_proj.weight[fast, const] = 30.0 * torch.cos(inv_freq[fast])
        a0.q_proj.weight[fast + half, const] = -30.0 * torch.sin(inv_freq[fast])
        a0.v_proj.weight[ids, tok + ids] = 1.0
        a0.o_proj.weight[prev + ids, ids] = 1.0
        slow = half - V + ids
        a1.q_proj.weight[slow, tok + ids] = 12.0
        a1.k_proj.weight[slow, prev + ids] = 12.0
        a1.v_proj.weight[ids, tok + ids] = 1.0
        a1.o_proj.weight[out + ids, ids] = 1.0
        model.lm_head.weight[ids, out + ids] = 3.0
    return model.eval()
