"""The DeepSpeed JSON, generated from the run config (never hand-synchronised).

Batch accounting: longtrain flattens each micro-batch of ``stage.micro_batch_size`` rows into one
packed sequence, so DeepSpeed always sees ``train_micro_batch_size_per_gpu = 1``; the number of
forward passes per optimizer step is ``stage.grad_accum`` and is changed at every stage start with
``engine.set_train_batch_size``. DeepSpeed is not told about sequence parallelism: ZeRO shards and
averages over all ranks, and the loss is scaled so that the average is exact (docs/internals.md,
"Loss contract").
"""
from __future__ import annotations

from typing import Any

from longtrain.config import RunConfig, deep_merge


def optimizer_impl(cfg: RunConfig, on_cuda: bool) -> str:
    """Which Adam implementation runs: DeepSpeedCPUAdam with offload, else torch AdamW (fused on CUDA).

    ``auto`` never picks DeepSpeed's FusedAdam: it is JIT-compiled on first use, and DeepSpeed 0.19.8's
    op builder fails where ``TORCH_CUDA_ARCH_LIST`` holds a suffixed architecture such as ``9.0a``
    (``invalid literal for int() with base 10: '0a'``, seen on an H200 image). torch's AdamW with
    ``fused=True`` is one multi-tensor CUDA kernel as well and ships compiled with torch.
    """
    impl = cfg.train.optimizer.impl
    if impl != "auto":
        return impl
    if cfg.train.offload_optimizer:
        return "cpu_adam"
    return "torch"


def build_deepspeed_config(cfg: RunConfig, world_size: int, on_cuda: bool) -> dict[str, Any]:
    train = cfg.train
    first = cfg.stages[0]
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        # Deterministic, overlap-free reductions keep resumed runs bitwise equal to straight runs.
        zero.update({"contiguous_gradients": True, "overlap_comm": False})
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if train.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    if train.zero_stage == 3:
        # Our export consolidates with zero_to_fp32; no 16-bit gather needed at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = False

    impl = optimizer_impl(cfg, on_cuda)
    opt = train.optimizer
    params: dict[str, Any] = {"lr": first.lr, "betas": list(opt.betas), "eps": opt.eps,
                              "weight_decay": opt.weight_decay}
    if impl == "torch":
        params["torch_adam"] = True  # torch.optim.AdamW; no JIT-compiled op needed (CPU, ROCm, ...)
        if on_cuda and not train.offload_optimizer:
            # DeepSpeed 0.19.8 builds torch.optim.AdamW(params, **these params, foreach=None) for
            # torch_adam (engine.get_optimizer_configuration), so fused=True reaches the optimizer.
            params["fused"] = True
    elif impl == "fused":
        params["torch_adam"] = False
    # With offload and torch_adam unset, DeepSpeed picks DeepSpeedCPUAdam itself.
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": first.grad_accum,
        "train_batch_size": first.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": params},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # our metrics logger prints; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if train.precision == "bf16" and train.zero_stage >= 1:
        # fp32 gradient accumulation: bf16 sums lose low bits over many micro-batches. (Without
        # ZeRO, DeepSpeed 0.19 refuses this mix; its bf16 path then accumulates in bf16.)
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return deep_merge(ds, cfg.deepspeed)  # the user's pass-through `deepspeed:` section over the generated one
