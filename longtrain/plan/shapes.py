"""The model's shape as the planner needs it: sizes from ``config.json``, parameter counts exact.

The parameters are counted on a model built on the meta device (``torch.device("meta")``: shapes
only, no storage, no weights read or downloaded), so every architecture transformers knows is
counted as it will be built (biases of Qwen2's q/k/v, tied embeddings once, untied ``lm_head``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longtrain.config import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only RoPE model (Llama / Qwen2 / Mistral families: gated SiLU MLP, RMSNorm)."""

    n_params: int
    """Parameters, tied weights counted once."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    layer_params: int
    """Parameters of one decoder layer."""
    largest_param: int
    """Elements of the largest single parameter tensor (the embedding, usually)."""
    param_sizes: tuple[int, ...]
    """Elements of every parameter tensor (tied ones once)."""
    sliding_window: int | None = None

    def params_below(self, threshold: int) -> int:
        """Elements of the parameters smaller than ``threshold`` (ZeRO-3 keeps them whole on every rank:
        ``stage3_param_persistence_threshold``)."""
        return sum(n for n in self.param_sizes if n < threshold)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def q_width(self) -> int:
        """Query width ``H * D`` (may differ from ``hidden_size``, e.g. Gemma)."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def model_shape(hf_config, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model ``hf_config`` describes, its parameters counted on the meta device."""
    from transformers import AutoModelForCausalLM  # seconds to import: only the planner's callers pay it

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"model: cannot build {type(hf_config).__name__} on the meta device to count its "
                          f"parameters: {exc}") from None
    seen: set[int] = set()
    numels = []
    for param in model.parameters():
        if id(param) not in seen:  # tied embeddings: one tensor
            seen.add(id(param))
            numels.append(param.numel())
    layers = model.model.layers
    layer_params = sum(p.numel() for p in layers[0].parameters()) if len(layers) else 0
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return ModelShape(
        n_params=sum(numels), vocab_size=int(embed.shape[0]), hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, num_kv_heads=kv, head_dim=head_dim(hf_config),
        tied_embeddings=tied, layer_params=layer_params, largest_param=max(numels),
        param_sizes=tuple(numels),
        sliding_window=getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", True)
        else None)
