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


def _document_layout(module, attention_mask, dropout: float, kwargs: dict, name: str):
    """The global document layout of the packed row, with the single-device attention's checks
    (``longtrain.attention.document_layout``) plus one of its own: no attention dropout across ranks."""
    from longtrain.attention import document_layout  # lazily, like register_attention below

    if dropout:
        raise ValueError(f"attention '{name}' does not implement attention dropout (got {dropout}); "
                         f"set the model config's attention_dropout to 0")
    return document_layout(module, attention_mask, kwargs, name)


def _ulysses_hf(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, state, **kwargs):
    """transformers attention signature: query (1, H, L, D), key/value (1, Hkv, L, D) -> ((1, L, H, D), None)."""
    from longtrain.attention import document_attention  # the single-device kernel, on the full row (lazy: below)

    cu, max_len = _document_layout(module, attention_mask, dropout, kwargs, "longtrain_ulysses")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # the start-up backend (longtrain.engine.loss_module) runs the local attention on the full row
    local = functools.partial(document_attention, sliding_window=kwargs.get("sliding_window"),
                              backend=kwargs.get("attention_backend"))
    return ulysses_attention(query, key, value, cu, max_len, state, scale, local), None


def _ring_hf(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, state, **kwargs):
    """transformers attention signature: query (1, H, L, D), key/value (1, Hkv, L, D) -> ((1, L, H, D), None)."""
    cu, max_len = _document_layout(module, attention_mask, dropout, kwargs, "longtrain_ring")
    window = kwargs.get("sliding_window")
    if window is not None and window < max_len:
        raise ValueError(f"attention 'longtrain_ring' does not implement sliding windows (window {window} < "
                         f"longest document {max_len}); use mode 'ulysses' for this model")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    backend = kwargs.get("attention_backend")  # the start-up choice also picks the ring's block kernel
    return ring_attention(query, key, value, cu, state, scale, backend=backend.name if backend else None), None


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
    from longtrain.attention import register_attention

    check_sp_for_model(model.config, state.sp_size, mode)
    if state.sp_size == 1:
        name = register_attention()
    else:
        state.require_group()
        impl = _ulysses_hf if mode == "ulysses" else _ring_hf
        name = register_attention(ATTENTION_NAMES[mode], functools.partial(impl, state=state))
    model.set_attn_implementation(name)
    return name
