"""What DeepSpeed wraps and how: the loss module, parameter groups, and the one engine builder.

Used by the trainer, the benchmarks and the tests alike (one way to assemble an engine):
``loss_module(hf_model, train_cfg)`` chooses the attention kernel (once, for the run), selects our
document-masked attention, tiled MLP and activation checkpointing on a loaded model and wraps it
with :class:`CausalLMLoss`; ``build_engine(module, ds_config, weight_decay)`` hands it to
``deepspeed.initialize``.
"""
from __future__ import annotations

from typing import Any

import deepspeed
import torch

from longtrain.activation_checkpointing import enable_activation_checkpointing, enable_tiled_mlp, offload_context
from longtrain.attention import register_attention
from longtrain.attention_backends import AttentionBackend, select_backend
from longtrain.config import TrainConfig
from longtrain.loss import chunked_lm_loss_sum, default_chunk_tokens, logit_softcap

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CausalLMLoss(torch.nn.Module):
    """Returns the *sum* of token cross-entropies of a packed micro-batch (docs/internals.md).

    Wrapping (rather than calling the HF model's own loss) lets DeepSpeed see one forward whose
    output is the loss, while the logits are computed chunk by chunk and never held in full.
    Parameter names gain the prefix ``hf_model.``; export strips it.
    """

    def __init__(self, hf_model: torch.nn.Module, loss_chunk_tokens: int | None,
                 attention_backend: AttentionBackend | None = None, offload_activations: bool = False,
                 tiled_mlp: int | str = 1):
        super().__init__()
        self.hf_model = hf_model
        self.loss_chunk_tokens = loss_chunk_tokens or default_chunk_tokens(hf_model.config.vocab_size)
        self.attention_backend = attention_backend  # None: auto for the tensors of each call
        self.offload_activations = offload_activations
        self.tiled_mlp = tiled_mlp  # for describe(): enable_tiled_mlp already tiled the model's MLPs
        # Gemma-2-style final-logit soft-capping is part of the model's logits: train on the logits it
        # computes (None for Llama / Qwen2 / Mistral: the loss ops are then exactly the plain ones).
        self.softcap = logit_softcap(hf_model.config)

    def forward(self, input_ids, position_ids, labels, cu_seqlens, max_seqlen: int):
        # input_ids, position_ids, labels: (1, T); cu_seqlens: (n_segments + 1,) int32
        with offload_context(self.offload_activations):  # what backward needs waits in host memory
            out = self.hf_model.model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False,
                cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                max_length_k=max_seqlen, attention_backend=self.attention_backend)
            return chunked_lm_loss_sum(out.last_hidden_state, self.hf_model.lm_head, labels, self.loss_chunk_tokens,
                                       self.softcap)

    def describe(self) -> str:
        """One line for the start-up log: kernel, MLP tiling, offload."""
        tiles = self.tiled_mlp if self.tiled_mlp != 1 else "off"
        return (f"attention kernel {self.attention_backend or 'auto per call'}, MLP tiles {tiles}, "
                f"activation offload {'on' if self.offload_activations else 'off'}")

    def batch_loss_sum(self, batch) -> torch.Tensor:
        """The loss sum of a ``longtrain.batching.PackedBatch`` already on this module's device."""
        return self(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (biases, norm weights and other 1-D tensors are not decayed)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            # A parameter already partitioned by zero.Init is a flat stub: its real shape is ds_shape.
            ndim = len(getattr(param, "ds_shape", param.shape))
            (decay if ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def training_device() -> torch.device:
    """The device a process trains on (``longtrain.distributed.init_distributed``'s rule)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def choose_attention(hf_model: torch.nn.Module, train: TrainConfig, device: torch.device | None = None
                     ) -> AttentionBackend:
    """The run's attention kernel from ``train.attention``, the device, ``train.precision`` and what is
    installed (``longtrain.attention_backends.select_backend``; a ConfigError names the reason)."""
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return select_backend(train.attention, device or training_device(), PRECISION_DTYPES[train.precision],
                          head_dim=head_dim, dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0))


def loss_module(hf_model: torch.nn.Module, train: TrainConfig, device: torch.device | None = None) -> CausalLMLoss:
    """The loaded model prepared for training: the attention kernel chosen for the run, document-masked
    attention, no KV cache, tiled MLP, activation checkpointing and offload as configured, wrapped with
    the chunked loss. ``device``: where it will train (default: ``training_device()``)."""
    backend = choose_attention(hf_model, train, device)
    hf_model.set_attn_implementation(register_attention())
    hf_model.config.use_cache = False
    enable_tiled_mlp(hf_model, train.tiled_mlp)
    if train.activation_checkpointing:
        # Under ZeRO-3 DeepSpeed gathers and frees parameters inside every layer, so the
        # recomputation's op sequence differs from the forward's, which torch's selective
        # checkpointing refuses ("encountered during backward but not found in storage"):
        # full recomputation there.
        enable_activation_checkpointing(hf_model, keep_attention=train.zero_stage < 3)
    return CausalLMLoss(hf_model, train.loss_chunk_tokens, backend, train.offload_activations, train.tiled_mlp)


def build_engine(module: torch.nn.Module, ds_config: dict[str, Any], weight_decay: float):
    """``deepspeed.initialize`` on ``module`` in training mode, with our parameter groups."""
    # from_pretrained returns a model in eval mode, where transformers silently skips activation
    # checkpointing (and dropout): training mode, explicitly.
    module.train()
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups(module, weight_decay),
                                           config=ds_config)
    return engine
