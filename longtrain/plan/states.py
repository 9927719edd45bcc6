"""Model states per rank: parameters, gradients, the fp32 master copy, optimizer states, ZeRO's buffers.

From DeepSpeed 0.19.8's code (``runtime/zero/stage_1_and_2.py``, ``stage3.py``, ``bf16_optimizer.py``,
``engine.py::_do_optimizer_sanity_check``) and the ZeRO paper's accounting (Rajbhandari et al. 2020,
"ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 3: with Adam, ``K = 12``
bytes of fp32 master weights and moments per parameter; ZeRO-1 partitions them over the ``N_d`` ranks,
ZeRO-2 the gradients too, ZeRO-3 the parameters). ``W`` is the world size: longtrain does not tell
DeepSpeed about sequence parallelism, so ZeRO partitions over all ranks (``longtrain/ds_config.py``).
What DeepSpeed allocates beyond the paper's count, per the code:

- ZeRO 1/2 always clone an fp32 master partition (4N/W), even for an fp32 model; ZeRO-2 keeps the
  reduced gradient partition (``grads_in_partition``) and an ``ipg`` bucket of ``reduce_bucket_size``
  elements, allocated for each backward with ``torch.empty`` (on CPU only the pages written count:
  at most the parameters' size); at the step it flattens the partition's gradients once more.
- bf16 with fp32 gradient accumulation (longtrain's setting for ZeRO >= 1): ZeRO-1 runs as
  DeepSpeed's ``BF16_Optimizer`` (an fp32 gradient buffer of the full model on every rank);
  ZeRO-2/3 accumulate the partition in fp32. bf16 without ZeRO trains the bf16 parameters directly
  (DDP_BFLOAT16: Adam's moments in bf16, no master copy).
- ZeRO-3 holds the parameter partition (N b / W), parameters below ``stage3_param_persistence_threshold``
  whole, the gathered parameters of the module running plus the prefetch bucket, an fp32 gradient
  partition and the fp32 gradient buffer the optimizer reads.
- Adam's step: torch's AdamW on CPU (its single-tensor path) makes two partition-sized temporaries
  (``sqrt``, then the division); fused kernels (FusedAdam, torch ``fused=True``) and DeepSpeedCPUAdam none.
- Offload (``offload_optimizer``): master copy, moments and the fp32 gradient partition live in host
  memory, plus a parameter-dtype staging copy of the partition; the device keeps parameters and buckets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from longtrain.plan.setup import TrainSetup
from longtrain.plan.shapes import ModelShape


@dataclass
class StateMemory:
    """Bytes per rank; ``device`` terms count against the device, ``host`` terms against host memory."""

    device: dict[str, int] = field(default_factory=dict)
    """Persistent terms (alive through the whole step)."""
    backward: dict[str, int] = field(default_factory=dict)
    """Buffers alive during forward / backward (and the step's start)."""
    step: dict[str, int] = field(default_factory=dict)
    """Temporaries of the optimizer step."""
    host: dict[str, int] = field(default_factory=dict)
    """Offloaded terms (host memory per rank)."""


def _div(n: int, w: int) -> int:
    return -(-n // w)


def model_states(shape: ModelShape, setup: TrainSetup, world_size: int, on_cuda: bool,
                 grad_accum: int = 1) -> StateMemory:
    """Model-state bytes of one rank, by phase.

    Gradient buffers made with ``torch.empty`` (ZeRO-1/2's partition and ipg bucket) are on CUDA handed
    out whole by the caching allocator, but on CPU take memory only as pages are written: at the
    backward's peak (early in the backward) they are still unwritten, unless an earlier micro-batch of
    the same step filled them (``grad_accum > 1``: the partition; the bucket is made anew for every
    backward). Autograd's own ``param.grad`` tensors appear layer by layer as the backward goes (none
    yet at its peak), and stay between micro-batches."""
    n, w, b = shape.n_params, world_size, setup.param_bytes
    part = _div(n, w)
    s = StateMemory()
    accumulating = grad_accum > 1
    # fp32 temporaries of torch AdamW's step, in parameter-sized units: the per-tensor path (CPU) two of
    # the tensor it updates, foreach (CUDA) one of the whole group, fused none; DeepSpeed's kernels none
    if setup.optimizer != "torch" or setup.fused_adam:
        adam_temps = 0
    else:
        adam_temps = 1 if on_cuda else 2

    def lazy(nbytes: int) -> int:  # a torch.empty buffer at the backward's peak
        return nbytes if (on_cuda or accumulating) else 0

    if setup.zero_stage == 0:
        if setup.precision == "fp32":
            s.device.update(parameters=4 * n, optimizer_states=8 * n)
        else:  # DDP_BFLOAT16 / FP16: the optimizer on the 16-bit parameters
            s.device.update(parameters=b * n, optimizer_states=2 * b * n)
        if accumulating:
            s.backward["gradients"] = b * n
        s.step["gradients"] = b * n
        s.step["optimizer_step"] = adam_temps * 4 * shape.largest_param  # per-tensor loop: one tensor at a time
        return s

    master, moments = 4 * part, 8 * part
    grad_part = setup.grad_accum_bytes * part
    target = s.host if setup.offload_optimizer else s.device
    target.update(master_weights_fp32=master, optimizer_states=moments)
    flat = 4 * part  # the step flattens the partition's gradients (and casts them to fp32)
    if setup.offload_optimizer:
        s.host["gradients_fp32_partition"] = 4 * part
        s.host["offload_staging"] = b * part  # param_buffer_of_bit16_for_cpu_offload
        if setup.zero_stage in (1, 2):
            # temp_grad_buffer_for_cpu_offload / _for_gpu_offload: the largest parameter, one on each side
            s.host["offload_grad_buffer"] = b * shape.largest_param
            s.device["zero_buckets"] = b * shape.largest_param
            if accumulating:
                s.host["gradients_fp32_accumulated"] = 4 * part  # accumulated_grads_in_cpu
        adam_temps, flat = 0, 0  # DeepSpeedCPUAdam updates in place, gradients copied straight to the host

    if setup.zero_stage in (1, 2):
        s.device["parameters"] = b * n
        if setup.zero_stage == 1 and setup.precision == "bf16" and not setup.offload_optimizer:
            # BF16_Optimizer: an fp32 gradient buffer of the whole model on every rank (torch.zeros)
            s.device["gradients"] = 4 * n
        else:
            # grads_in_partition (ZeRO-1 keeps other partitions' param.grad until the step too)
            grads = grad_part + (b * (n - part) if setup.zero_stage == 1 else 0)
            if not setup.offload_optimizer:
                s.backward["gradients"] = lazy(grads)
                s.step["gradients"] = grads
            # the ipg bucket: reduce_bucket_size elements, a fresh torch.empty at every backward (freed at
            # its end): whole on CUDA, on CPU unwritten at the backward's peak whatever the accumulation
            if on_cuda:
                s.backward["ipg_bucket"] = setup.reduce_bucket_size * b
        s.step["optimizer_step"] = flat + adam_temps * 4 * part
    else:
        persistent = shape.params_below(setup.param_persistence_threshold) * b
        if setup.offload_param:
            s.host["parameters_partition"] = b * part
            s.device["parameters"] = persistent
        else:
            s.device["parameters"] = b * part + persistent
        if not setup.offload_optimizer:
            # grad_partitions_flat_buffer (accumulation dtype) and the fp32 buffer the optimizer reads:
            # torch.zeros, written at start-up
            s.device["gradients"] = grad_part + 4 * part
        # all-gathered parameters: the module running (the embedding / lm_head is the largest) and the
        # prefetch bucket (stage3_prefetch_bucket_size elements) of the ones that follow
        gathered = (max(shape.largest_param, shape.layer_params)
                    + min(setup.prefetch_bucket_size, shape.layer_params)) * b
        s.backward["zero3_gathered_parameters"] = gathered
        # the ipg bucket is made once and reused: written by the first backward, then resident
        s.device["zero_buckets"] = (setup.reduce_bucket_size if on_cuda else min(setup.reduce_bucket_size, n)) * b
        s.step["optimizer_step"] = adam_temps * 4 * part
    return s
