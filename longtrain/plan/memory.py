"""Peak memory per rank of one stage: the sum of named terms at the step's highest phase.

A step goes through three phases whose memory differs (measured on CPU by resetting the peak RSS
between them, ``/proc/self/clear_refs``):

- **backward at the loss**: every layer's saved activations are alive, and one loss chunk is
  recomputed and differentiated: its fp32 logits, their log-softmax and two gradients of that size
  (``3 x 4 C V`` bytes for a chunk of ``C`` tokens; ``longtrain.loss``), the chunk's ``lm_head`` weight
  gradient and the gradient of the last hidden states;
- **backward of the top layer**: the saved activations, one layer recomputed (checkpointing) and that
  layer's gradient temporaries, the attention kernel's backward workspace and the sequence-parallel
  exchange buffers;
- **the optimizer step**: no activations; ZeRO's flattened gradient partition and Adam's temporaries.

The peak is the largest of the three; the model states (``longtrain.plan.states``) and the process's
fixed overhead are present in all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from longtrain.plan import activations as act
from longtrain.plan.activations import Layout
from longtrain.plan.setup import TrainSetup
from longtrain.plan.shapes import ModelShape
from longtrain.plan.states import model_states

# The order terms are printed in (scripts read them by name from --json's "breakdown").
TERMS = ("fixed_overhead", "parameters", "gradients", "master_weights_fp32", "optimizer_states", "zero_buckets",
         "zero3_gathered_parameters", "activations", "layer_recompute", "logits",
         "attention_workspace", "sequence_parallel_buffers", "optimizer_step")
PHASES = ("backward_loss", "backward_layer", "optimizer_step")
# Where an offloaded term is counted when the "device" is the CPU itself (it is in the process's RSS).
HOST_TERM_ON_CPU = {"parameters_partition": "parameters", "offload_staging": "parameters",
                    "gradients_fp32_partition": "gradients", "gradients_fp32_accumulated": "gradients",
                    "offload_grad_buffer": "zero_buckets"}


@dataclass
class MemoryPlan:
    breakdown: dict[str, int]
    """Every term at the peak phase (0 when the term is not alive then); sums to ``peak_bytes``."""
    peak_bytes: int
    peak_phase: str
    phases: dict[str, int]
    """Total of each phase."""
    host_bytes: int
    """Per rank, in host memory besides the process (offloaded optimizer state, parameters, activations)."""
    host_breakdown: dict[str, int] = field(default_factory=dict)


def mlp_backward_bytes(shape: ModelShape, setup: TrainSetup, layout: Layout) -> int:
    """Gradient temporaries at the top layer's MLP backward, the peak of a layer's backward: the
    gradient flowing in and a transposed copy of it (``2 b E`` per token), the gradient of the MLP's
    product (``b I``; a tiled MLP: one tile's), and the largest weight gradient before ZeRO takes it.
    Measured on CPU by reading the resident size in backward hooks of the top layer's modules (glibc
    returning freed memory at once): the recomputed layer plus these, within 1%."""
    b, t = setup.param_bytes, layout.local_tokens
    mlp_tokens = -(-t // setup.mlp_tiles(t, shape.hidden_size))
    return b * t * 2 * shape.hidden_size + b * mlp_tokens * shape.intermediate_size + \
        b * shape.intermediate_size * shape.hidden_size


def attention_backward_bytes(shape: ModelShape, setup: TrainSetup, layout: Layout) -> int:
    """What the top layer holds when its attention kernel runs backward, beyond the kept activations:
    the first half of the layer (norm, q / k / v, the kernel output unless kept) recomputed or saved,
    the gradients flowing in (``b E`` and ``b H D``), and the kernel's dq / dk / dv."""
    b, t = setup.param_bytes, layout.local_tokens
    kv = shape.kv_width * layout.kv_repeat
    grads = b * (shape.hidden_size + shape.q_width) + b * (shape.q_width + 2 * kv)
    if setup.checkpointing == "none":
        return t * grads  # the first half is among the saved activations
    first_half = act.norm_saved(shape, b) + b * (shape.q_width + 2 * kv)
    if b == 4:
        first_half -= 4 * shape.hidden_size  # fp32: the norm's input is the kept layer input
    if setup.checkpointing == "full" or layout.ring:
        first_half += act.kernel_output(shape, b)  # recomputed, not kept
    return t * (first_half + grads)


def attention_workspace(shape: ModelShape, setup: TrainSetup, layout: Layout) -> int:
    """The attention kernel's own backward buffers for this rank's tokens.

    The CPU per-document loop returns dq / dk / dv per document, which ``split``'s backward
    concatenates (both alive at once: ``b (H D + 2 Hkv D)`` per token more); flash attention's
    backward adds an fp32 dq accumulator and the fp32 ``rowsum(dO * O)`` (``4 H D + 4 H``; Dao 2023,
    FlashAttention-2, Algorithm 2)."""
    b, t = setup.param_bytes, layout.local_tokens
    if layout.flash_varlen:
        return t * (4 * shape.q_width + 4 * shape.num_heads)
    return t * b * (shape.q_width + 2 * shape.kv_width * layout.kv_repeat)


def sp_buffers(shape: ModelShape, setup: TrainSetup, layout: Layout) -> int:
    """Sequence-parallel exchange buffers alive during one layer's backward (docs/sequence_parallel.md).

    Ulysses: the all-to-all of q / k / v (and of their gradients) needs the message and the received
    blocks at once, ``2 b L (H + 2 Hkv') D``. Ring: the fp32 dq accumulator ``4 H L D``, the K/V block
    held and the one arriving ``2 x 2 b Hkv L D``, the fp32 dK/dV travelling with it and arriving
    ``2 x 2 x 4 Hkv L D``."""
    if layout.sp_size == 1:
        return 0
    b, t, d = setup.param_bytes, layout.local_tokens, shape.head_dim
    if layout.ring:
        return t * d * (4 * shape.num_heads + 4 * b * shape.num_kv_heads + 16 * shape.num_kv_heads)
    return 2 * b * t * (shape.num_heads + 2 * shape.num_kv_heads * layout.kv_repeat) * d


def logits_bytes(shape: ModelShape, setup: TrainSetup, layout: Layout) -> int:
    """One loss chunk's backward: fp32 logits' log-softmax and two gradients of its size, the chunk's
    ``lm_head`` weight gradient, and the gradient of the final hidden states (longtrain.loss)."""
    chunk = min(setup.loss_chunk_tokens, layout.local_tokens)
    b = setup.param_bytes
    return (3 * 4 * chunk * shape.vocab_size + b * shape.vocab_size * shape.hidden_size
            + b * layout.local_tokens * shape.hidden_size)


def activation_phases(shape: ModelShape, setup: TrainSetup, layout: Layout) -> dict[str, dict[str, int]]:
    """The activation terms of the two backward phases (bytes of this rank)."""
    t, b = layout.local_tokens, setup.param_bytes
    kept = int(shape.num_layers * act.kept_per_layer(shape, setup, layout) * t)
    model_level = act.model_saved(shape, b) * t
    recompute = 0 if setup.checkpointing == "none" else act.recompute_per_layer(shape, setup, layout) * t
    recompute += act.mlp_tile_bytes(shape, setup, layout)
    loss = {"activations": kept + model_level, "logits": logits_bytes(shape, setup, layout)}
    # by the top layer's backward the final norm's saved tensors are freed
    layer_kept = kept + model_level - act.norm_saved(shape, b) * t
    mlp_point = {"activations": layer_kept, "layer_recompute": recompute + mlp_backward_bytes(shape, setup, layout)}
    attention_point = {"activations": layer_kept,
                       "layer_recompute": attention_backward_bytes(shape, setup, layout),
                       "attention_workspace": attention_workspace(shape, setup, layout),
                       "sequence_parallel_buffers": sp_buffers(shape, setup, layout)}
    layer = max((mlp_point, attention_point), key=lambda d: sum(d.values()))
    return {"backward_loss": loss, "backward_layer": layer}


def plan_memory(shape: ModelShape, setup: TrainSetup, layout: Layout, world_size: int,
                fixed_overhead: int, grad_accum: int = 1) -> MemoryPlan:
    """The peak of one rank for one stage (``layout``: this rank's tokens per micro-batch)."""
    states = model_states(shape, setup, world_size, layout.on_cuda, grad_accum)
    if not layout.on_cuda:  # "offloaded" to the memory the CPU run already uses: part of its peak
        for name, value in states.host.items():
            key = HOST_TERM_ON_CPU.get(name, name)
            states.device[key] = states.device.get(key, 0) + value
        states.host = {}
    for phase in (states.backward, states.step):  # the ipg bucket is one of ZeRO's buckets
        if "ipg_bucket" in phase:
            phase["zero_buckets"] = phase.get("zero_buckets", 0) + phase.pop("ipg_bucket")
    acts = activation_phases(shape, setup, layout)
    host = dict(states.host)
    if setup.offload_activations and layout.on_cuda:
        # what the layers keep waits in host memory; the device holds the one being copied back
        layers_kept = int(shape.num_layers * act.kept_per_layer(shape, setup, layout) * layout.local_tokens)
        host["activations"] = layers_kept
        for phase in acts.values():
            phase["activations"] -= layers_kept - layers_kept // max(1, shape.num_layers)
    persistent = {"fixed_overhead": fixed_overhead, **states.device}
    phase_terms = {
        "backward_loss": {**states.backward, **acts["backward_loss"]},
        "backward_layer": {**states.backward, **acts["backward_layer"]},
        "optimizer_step": dict(states.step),
    }
    phases = {name: sum(persistent.values()) + sum(t.values()) for name, t in phase_terms.items()}
    peak_phase = max(PHASES, key=lambda name: phases[name])
    breakdown = {name: 0 for name in TERMS}
    for name, value in [*persistent.items(), *phase_terms[peak_phase].items()]:
        breakdown[name] = breakdown.get(name, 0) + value
    return MemoryPlan(breakdown=breakdown, peak_bytes=phases[peak_phase], peak_phase=peak_phase, phases=phases,
                      host_bytes=sum(host.values()), host_breakdown=host)
