"""Activation memory of the decoder layers: checkpointing, tiled MLP, host offload of what is kept.

- Checkpointing, selective (keep the attention kernel's output) or full. Selective checkpointing keeps
  the output of the fused attention kernel instead of recomputing it. At long lengths attention is the
  O(S^2) part of a layer while its output is O(S) (flash kernels save only the output and the
  log-sum-exp), so this skips the most expensive recomputation for a few MB per layer; the
  projections and the MLP are recomputed as usual.
- Tiled MLP (``train.tiled_mlp``; ALST, Bekman et al. 2025, arXiv:2506.13996): the MLP runs in tiles
  along the sequence, so its ``[T, intermediate]`` activations (the largest of a layer's recomputation
  at long rows: 3 x intermediate / hidden times the layer input) exist one tile at a time.
- Host offload (``train.offload_activations``): everything the forward saves for backward outside the
  checkpointed regions, i.e. with checkpointing the layer inputs, goes to host memory and comes back
  in backward (ALST's activation-checkpoint offload). The attention outputs selective checkpointing
  keeps stay on the device (torch keeps them in its own cache, not through saved-tensor hooks).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from longtrain.config import ConfigError

AUTO_TILE_TOKENS = 4096  # tiled_mlp auto: tiles of max(hidden_size, this) tokens (matmuls stay large)


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


# ------------------------------------------------------------------------------ tiled MLP

def mlp_tiles(setting: int | str, tokens: int, hidden_size: int) -> int:
    """How many tiles an MLP call on ``tokens`` tokens runs in (``setting``: N or "auto").

    auto: tiles of ``max(hidden_size, AUTO_TILE_TOKENS)`` tokens (ALST uses tiles of ``hidden_size``
    tokens: each tile's activations are then about the size of a weight matrix; the floor keeps a
    tile's matmuls large enough to run at full speed). The count depends only on the tokens, so every
    rank makes the same number of calls (ZeRO-3 gathers the MLP's weights once per tile in backward).
    """
    wanted = math.ceil(tokens / max(hidden_size, AUTO_TILE_TOKENS)) if setting == "auto" else int(setting)
    wanted = max(1, min(wanted, tokens))
    # DeepSpeed's TiledMLP splits with torch.chunk, which makes ceil(T / ceil(T / n)) pieces: fewer than n
    # for some T (T=300, n=23 -> 22 pieces). Its backward marks the MLP's gradients ready for ZeRO's
    # reduction (ds_grad_is_ready) only at piece n - 1, so with fewer pieces the flag stays False. Seen on
    # 2 gloo ranks: ZeRO-2 then applies wrong MLP updates (0.04 off after 2 steps at lr 1e-2) and ZeRO-3
    # fails in zero_grad ("unknown parameter type"). Pass the number of pieces torch.chunk really makes.
    return math.ceil(tokens / math.ceil(tokens / wanted))


def _class_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(mlp).forward(mlp, x)  # the model's own MLP code (the instance's forward is the tiled one)


def _tiled_forward(mlp: torch.nn.Module, setting: int | str, hidden_size: int, x: torch.Tensor) -> torch.Tensor:
    """x (1, T, E) -> (1, T, E) in ``mlp_tiles`` tiles along T (DeepSpeed's TiledMLP)."""
    tiles = mlp_tiles(setting, x.shape[-2], hidden_size)
    if tiles == 1:
        return _class_forward(mlp, x)
    # TiledMLP(fn, module, x, shards, compute_params): forward under no_grad tile by tile, backward
    # recomputes each tile with grad; compute_params get ds_grad_is_ready so ZeRO reduces them once.
    return TiledMLP.apply(_class_forward, mlp, x, tiles, [p for p in mlp.parameters() if p.requires_grad])


def enable_tiled_mlp(hf_model: torch.nn.Module, setting: int | str) -> int:
    """Tile every decoder layer's MLP along the sequence (``train.tiled_mlp``); returns the layers tiled.

    DeepSpeed's ``TiledMLP`` (the ALST code) does the work; its contract fits: any ``fn(module, x)``
    over ``(..., T, E)``, exact gradients (each tile's recomputation backpropagates its own slice),
    ZeRO-aware through ``ds_grad_is_ready``; we only fix the tile count (``mlp_tiles``). It is installed
    as the MLP instance's ``forward`` rather than by patching the model class: only this model's MLPs
    change, parameter names and module types stay (checkpoints and exports are unchanged) and
    ``del layer.mlp.forward`` undoes it.
    """
    if setting == 1:
        return 0
    hidden = hf_model.config.hidden_size
    layers = hf_model.model.layers
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise ConfigError(f"train.tiled_mlp: decoder layer {i} of {type(hf_model).__name__} has no `mlp` "
                              "module to tile; set train.tiled_mlp: 1")
        mlp.forward = functools.partial(_tiled_forward, mlp, setting, hidden)
    return len(layers)


# ------------------------------------------------------------------------------ host offload

class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Tensors the forward saves for backward live in host memory until backward needs them.

    torch's ``save_on_cpu`` (pinned host buffers, asynchronous copies) with a count of what moved
    (``bytes``, ``tensors``: what the offload saves, for logs and tests). Tensors already on the
    CPU stay where they are (nothing to free) unless ``copy_cpu`` (tests: run the copy path on CPU).
    """

    def __init__(self, pin_memory: bool | None = None, copy_cpu: bool = False):
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.bytes, self.tensors = 0, 0

        def pack(tensor: torch.Tensor):
            self.bytes += tensor.numel() * tensor.element_size()
            self.tensors += 1
            if tensor.device.type == "cpu" and not copy_cpu:
                return tensor.device, tensor
            packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                                 pin_memory=pin and tensor.device.type != "cpu")
            packed.copy_(tensor, non_blocking=packed.is_pinned())
            return tensor.device, packed

        def unpack(packed) -> torch.Tensor:
            device, tensor = packed
            return tensor.to(device, non_blocking=tensor.is_pinned())

        super().__init__(pack, unpack)


def offload_context(enabled: bool):
    """``HostOffload()`` around a forward when ``train.offload_activations``, else a no-op context."""
    return HostOffload() if enabled else contextlib.nullcontext()
