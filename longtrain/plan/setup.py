"""What the planner reads from a run config: the training settings that decide memory, resolved once.

Everything here comes from the run config and the DeepSpeed JSON the trainer generates from it
(``longtrain.ds_config.build_deepspeed_config``), so a ``deepspeed:`` pass-through (bucket sizes, ...)
is planned exactly as it will run. Where the JSON leaves a key out, DeepSpeed's own default applies:
``DS_DEFAULTS`` copies them from ``deepspeed/runtime/zero/config.py`` (0.19.8;
``tests/longtrain/test_plan.py`` checks them against the installed DeepSpeed).
"""
from __future__ import annotations

from dataclasses import dataclass

from longtrain.activation_checkpointing import mlp_tiles
from longtrain.config import RunConfig
from longtrain.ds_config import build_deepspeed_config, optimizer_impl
from longtrain.loss import default_chunk_tokens

# DeepSpeedZeroConfig field -> (JSON key, default), deepspeed/runtime/zero/config.py (elements, not bytes).
DS_DEFAULTS = {
    "reduce_bucket_size": ("reduce_bucket_size", 500_000_000),
    "allgather_bucket_size": ("allgather_bucket_size", 500_000_000),
    "prefetch_bucket_size": ("stage3_prefetch_bucket_size", 50_000_000),
    "max_live_parameters": ("stage3_max_live_parameters", 1_000_000_000),
    "param_persistence_threshold": ("stage3_param_persistence_threshold", 100_000),
}

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CHECKPOINT_MODES = ("none", "selective", "full")


def checkpoint_mode(train) -> str:
    """How decoder layers are recomputed (``longtrain.engine.loss_module``): none, selective (the
    attention kernel's output kept) or full (ZeRO-3: its parameter gathers break selective replay)."""
    if not train.activation_checkpointing:
        return "none"
    return "full" if train.zero_stage == 3 else "selective"


@dataclass(frozen=True)
class TrainSetup:
    """The run-level settings that decide a rank's memory (the stage-level ones are in ResolvedStage)."""

    zero_stage: int
    precision: str
    offload_optimizer: bool
    offload_param: bool
    checkpointing: str
    """none | selective | full (``checkpoint_mode``)."""
    optimizer: str
    """torch | fused | cpu_adam (``longtrain.ds_config.optimizer_impl``)."""
    loss_chunk_tokens: int
    reduce_bucket_size: int
    allgather_bucket_size: int
    prefetch_bucket_size: int
    max_live_parameters: int
    param_persistence_threshold: int
    grad_accum_fp32: bool
    """bf16 with ZeRO >= 1 accumulates gradients in fp32 (``data_types.grad_accum_dtype``)."""
    fused_adam: bool = False
    """torch AdamW with ``fused=True`` (the DeepSpeed JSON's choice on CUDA): one in-place kernel over all
    tensors, no parameter-sized temporaries (the foreach and per-tensor paths make them)."""
    tiled_mlp: int | str = 1
    """``train.tiled_mlp`` (N tiles along the sequence, or auto); 1: off."""
    offload_activations: bool = False
    """``train.offload_activations``: what backward needs waits in host memory."""
    attention: str = "auto"
    """``train.attention``: auto | flash_attn | torch_varlen | sdpa_loop."""

    @property
    def param_bytes(self) -> int:
        """Bytes per element of parameters, activations and their gradients (the model's dtype)."""
        return DTYPE_BYTES[self.precision]

    @property
    def grad_accum_bytes(self) -> int:
        return 4 if self.grad_accum_fp32 else self.param_bytes

    def mlp_tiles(self, tokens: int, hidden_size: int) -> int:
        """Tiles of the MLP for ``tokens`` local tokens: the trainer's own rule (``train.tiled_mlp`` N, or
        auto: tiles of max(hidden_size, 4096) tokens; as many as torch.chunk really makes)."""
        return mlp_tiles(self.tiled_mlp, tokens, hidden_size)

    @classmethod
    def from_config(cls, cfg: RunConfig, world_size: int, on_cuda: bool, vocab_size: int) -> "TrainSetup":
        train = cfg.train
        ds = build_deepspeed_config(cfg, world_size, on_cuda)
        zero = ds["zero_optimization"]
        sizes = {field: int(float(zero.get(key, default))) for field, (key, default) in DS_DEFAULTS.items()}
        return cls(
            zero_stage=train.zero_stage, precision=train.precision, offload_optimizer=train.offload_optimizer,
            offload_param=train.offload_param, checkpointing=checkpoint_mode(train),
            optimizer=optimizer_impl(cfg, on_cuda),
            loss_chunk_tokens=train.loss_chunk_tokens or default_chunk_tokens(vocab_size),
            grad_accum_fp32=train.precision == "bf16" and train.zero_stage >= 1, **sizes,
            fused_adam=bool(ds["optimizer"]["params"].get("fused")),
            tiled_mlp=train.tiled_mlp, offload_activations=train.offload_activations, attention=train.attention)
