"""Activation checkpointing of the decoder layers: selective (keep the attention kernel's output) or full.

Selective checkpointing keeps the output of the fused attention kernel instead of recomputing it.
At long lengths attention is the O(S^2) part of a layer while its output is O(S) (flash kernels save
only the output and the log-sum-exp), so this skips the most expensive recomputation for a few MB
per layer; the projections and the MLP are recomputed as usual.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def attention_kernel_ops() -> set:
    """The fused attention kernels whose outputs selective checkpointing keeps."""
    aten = torch.ops.aten
    ops = {aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default}
    flash_attn = getattr(torch.ops, "flash_attn", None)  # flash-attn >= 2.6 registers torch custom ops
    for name in ("_flash_attn_varlen_forward", "_flash_attn_forward"):
        op = getattr(flash_attn, name, None) if flash_attn is not None else None
        if op is not None:
            ops.add(op.default)
    return ops


def enable_activation_checkpointing(hf_model: torch.nn.Module, keep_attention: bool = True) -> None:
    """Recompute every decoder layer in backward (non-reentrant: works with ZeRO-3's hooks).

    ``keep_attention``: selective checkpointing (torch's ``create_selective_checkpoint_contexts``)
    that keeps the attention kernel's output (module docstring).

    transformers 5.24 renamed ``gradient_checkpointing_enable`` (deprecated) to
    ``activation_checkpointing_enable``; use whichever this version has.
    """
    kwargs: dict = {"use_reentrant": False}
    if keep_attention:
        keep = attention_kernel_ops()

        def policy(_ctx, op, *_args, **_kwargs):
            return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    if hasattr(hf_model, "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def recomputed_layers(hf_model: torch.nn.Module) -> int:
    """How many decoder layers will recompute in backward (checkpointing on and in training mode)."""
    return sum(bool(getattr(layer, "gradient_checkpointing", False) and layer.training)
               for layer in hf_model.model.layers)
