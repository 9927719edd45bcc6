"""Plug sequence-parallel attention into a transformers model through its public interfaces.

``parallelize_attention(model, state, mode)`` registers ``"longtrain_ulysses"`` or
``"longtrain_ring"`` with ``transformers.AttentionInterface`` (and a mask function returning
``None`` with ``AttentionMaskInterface``: documents come from ``cu_seqlens``, never from an
``S x S`` mask) and selects it with ``model.set_attn_implementation``. The registered function
is bound to the given ``ParallelState``; calling ``parallelize_attention`` again (e.g. at a stage
start with another ``sp_size`` or mode) rebinds it. No model code is patched and nothing in the
forward reads environment variables (DESIGN.md section 1).

The model forward must receive the sharded batch and the *global* document layout, as the
single-device path does (docs/internals.md, "Attention contract"):
``model.model(input_ids=local_ids, position_ids=local_pos, use_cache=False,
cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)``.
"""
from __future__ import annotations

import functools

from .ring import ring_attention
from .sharding import check_mode
from .state import ParallelState
from .ulysses import check_ulysses_heads, ulysses_attention

ATTENTION_NAMES = {"ulysses": "longtrain_ulysses", "ring": "longtrain_ring"}


def _document_layout(kwargs: dict, name: str):
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise ValueError(
            f"attention '{name}' needs cu_seq_lens_q/max_length_q in the model forward (the global document "
            f"layout of the packed row): call model.model(..., use_cache=False, cu_seq_lens_q=batch.cu_seqlens, "
            f"cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)")
    return cu, int(max_len)


def _check_call(module, attention_mask, dropout: float, kwargs: dict, name: str) -> None:
    """Refuse what these attentions cannot honour instead of silently computing something else."""
    if attention_mask is not None:
        raise ValueError(f"attention '{name}' takes no attention_mask: documents come from cu_seq_lens_q")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError(f"attention '{name}' is causal only")
    for key in ("softcap", "s_aux"):
        if kwargs.get(key) is not None:
            raise ValueError(f"attention '{name}' does not implement {key}")
    if dropout:
        raise ValueError(f"attention '{name}' does not implement attention dropout (got {dropout}); "
                         f"set the model config's attention_dropout to 0")


def _ulysses_hf(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, state, **kwargs):
    """transformers attention signature: query (1, H, L, D), key/value (1, Hkv, L, D) -> ((1, L, H, D), None)."""
    from longtrain.attention import document_attention  # the single-device kernel, on the full row

    _check_call(module, attention_mask, dropout, kwargs, "longtrain_ulysses")
    cu, max_len = _document_layout(kwargs, "longtrain_ulysses")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    local = functools.partial(document_attention, sliding_window=kwargs.get("sliding_window"))
    return ulysses_attention(query, key, value, cu, max_len, state, scale, local), None


def _ring_hf(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, state, **kwargs):
    """transformers attention signature: query (1, H, L, D), key/value (1, Hkv, L, D) -> ((1, L, H, D), None)."""
    _check_call(module, attention_mask, dropout, kwargs, "longtrain_ring")
    cu, max_len = _document_layout(kwargs, "longtrain_ring")
    window = kwargs.get("sliding_window")
    if window is not None and window < max_len:
        raise ValueError(f"attention 'longtrain_ring' does not implement sliding windows (window {window} < "
                         f"longest document {max_len}); use mode 'ulysses' for this model")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return ring_attention(query, key, value, cu, state, scale), None


def check_sp_for_model(config, sp_size: int, mode: str) -> None:
    """Raise a ValueError naming the allowed degrees when ``mode`` cannot split ``config``'s heads."""
    check_mode(mode)
    if mode == "ulysses" and sp_size > 1:
        heads = config.num_attention_heads
        check_ulysses_heads(heads, getattr(config, "num_key_value_heads", None) or heads, sp_size)


def parallelize_attention(model, state: ParallelState, mode: str = "ulysses") -> str:
    """Select the attention for ``state.sp_size`` and ``mode`` on ``model``; returns its name.

    ``sp_size == 1`` selects the single-device ``"longtrain"`` attention, so a trainer can call
    this at every stage start whatever the stage's ``sp_size``.
    """
    # imported here: transformers costs seconds to import and only this entry point needs it
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    check_sp_for_model(model.config, state.sp_size, mode)
    if state.sp_size == 1:
        from longtrain.attention import register_attention

        register_attention()
        name = "longtrain"
    else:
        state.require_group()
        name = ATTENTION_NAMES[mode]
        impl = _ulysses_hf if mode == "ulysses" else _ring_hf
        from longtrain.attention import longtrain_mask  # builds no mask, refuses padding masks

        AttentionInterface.register(name, functools.partial(impl, state=state))
        AttentionMaskInterface.register(name, longtrain_mask)
    model.set_attn_implementation(name)
    return name
