"""Activation memory of one micro-batch on one rank: what autograd saves, per token, by checkpointing mode.

Counted op by op from the code that runs (transformers 5.24's Llama / Qwen2 / Mistral decoder layer,
``longtrain.attention``, ``longtrain.parallel``, ``longtrain.loss``), in the spirit of Korthikanti et al.
2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4: per-layer saved
bytes as a sum over the layer's ops). ``b`` is the model dtype's bytes (4 fp32, 2 bf16); RMSNorm and
the attention's log-sum-exp work in fp32 whatever the dtype. Per token of one decoder layer:

- each RMSNorm (two per layer): its fp32 input (``pow`` and ``mul`` save it; in fp32 it *is* the layer
  input), the normalised value (``weight *`` saves it, in the model dtype) and the output (saved by the
  next linear): ``4E + 2bE``, plus the fp32 rsqrt (4 bytes);
- q and k after RoPE, v: ``b (H D + 2 Hkv D)`` (RoPE's multiplications save cos / sin, shared by all
  layers, not q / k);
- the attention kernel's output ``b H D`` and log-sum-exp ``4 H``; the CPU per-document loop and the
  ring give transformers a transposed view, which ``reshape`` copies for ``o_proj`` (``b H D`` more);
  flash varlen's (T, H, D) output is that input already;
- the gated MLP: gate output (SiLU saves it), SiLU output and up output (their product saves both), the
  product (``down_proj`` saves it): ``4 b I``.

Checkpointing keeps per layer only the layer input ``b E`` (full), plus the attention kernel's output
and log-sum-exp (selective, ``longtrain.activation_checkpointing``); the backward of each layer then
recomputes the rest of it once. Measured on CPU (fp32, 20M-parameter Llama, 2k-8k tokens): within 1%
of these counts for all three modes (``benchmarks/bench_plan.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from longtrain.plan.setup import TrainSetup
from longtrain.plan.shapes import ModelShape

IDS_BYTES_PER_TOKEN = 3 * 8  # input_ids, position_ids, labels (int64)


@dataclass(frozen=True)
class Layout:
    """How one micro-batch sits on a rank: tokens, sequence-parallel mode, kernel."""

    local_tokens: int
    """Tokens of this rank's slice of one micro-batch (``ResolvedStage.local_tokens``)."""
    sp_size: int
    sp_mode: str
    on_cuda: bool
    kv_repeat: int = 1
    """Ulysses repeats each kv head this many times when ``Hkv % sp_size != 0``."""
    varlen: bool | None = None
    """A varlen flash kernel runs (one call per row, output in (T, H, D)); default: on CUDA. The exact
    per-document loop (CPU, fp32, ``train.attention: sdpa_loop``) is not one."""

    @property
    def ring(self) -> bool:
        return self.sp_size > 1 and self.sp_mode == "ring"

    @property
    def flash_varlen(self) -> bool:
        return self.on_cuda if self.varlen is None else self.varlen

    @property
    def output_copy(self) -> bool:
        """Whether ``o_proj``'s input is a copy of the kernel's output (the loop and the ring return a
        transposed view that transformers' ``reshape`` copies)."""
        return self.ring or not self.flash_varlen


def norm_saved(shape: ModelShape, b: int) -> int:
    """Bytes per token one RMSNorm saves: fp32 input, normalised value and output, fp32 rsqrt."""
    return 4 * shape.hidden_size + 2 * b * shape.hidden_size + 4


def kernel_output(shape: ModelShape, b: int) -> int:
    """The attention kernel's saved output and fp32 log-sum-exp, bytes per token."""
    return b * shape.q_width + 4 * shape.num_heads


def mlp_saved(shape: ModelShape, b: int) -> int:
    return 4 * b * shape.intermediate_size


def layer_saved(shape: ModelShape, b: int, layout: Layout, mlp: bool = True) -> int:
    """Bytes per token autograd saves for one decoder layer without checkpointing.

    ``mlp=False``: the MLP is tiled (``train.tiled_mlp``): it saves nothing beyond its input (already
    the norm's output) and recomputes its tile in backward."""
    kv = shape.kv_width * layout.kv_repeat
    attention = b * (shape.q_width + 2 * kv) + kernel_output(shape, b) + (b * shape.q_width if layout.output_copy
                                                                         else 0)
    return 2 * norm_saved(shape, b) + attention + (mlp_saved(shape, b) if mlp else 0)


def ring_kept_factor(sp_size: int) -> float:
    """Kernel outputs selective checkpointing keeps under ring attention, in units of the local tokens.

    The ring calls the kernel once per (query chunk, key chunk) block; selective checkpointing keeps
    every call's output. A document spanning the row (the worst case) gives rank r ``2P + 1`` blocks
    of ``T / 2P`` rows (``longtrain.parallel.ring.ring_plan``)."""
    return (2 * sp_size + 1) / 2


def kept_per_layer(shape: ModelShape, setup: TrainSetup, layout: Layout) -> float:
    """Bytes per token each layer keeps through the forward, by checkpointing mode."""
    b = setup.param_bytes
    if setup.checkpointing == "none":
        return layer_saved(shape, b, layout, mlp=setup.mlp_tiles(layout.local_tokens, shape.hidden_size) == 1)
    kept = b * shape.hidden_size  # the layer input, from which backward recomputes
    if setup.checkpointing == "selective":
        kept += kernel_output(shape, b) * (ring_kept_factor(layout.sp_size) if layout.ring else 1)
    return kept


def model_saved(shape: ModelShape, b: int) -> int:
    """Bytes per token saved once per model: the final norm, RoPE's cos / sin, the token ids."""
    return norm_saved(shape, b) + 2 * shape.head_dim * b + IDS_BYTES_PER_TOKEN


def recompute_per_layer(shape: ModelShape, setup: TrainSetup, layout: Layout) -> int:
    """Bytes per token the backward of one checkpointed layer recomputes (what the layer saved
    without checkpointing, less what checkpointing kept and the recomputation reuses)."""
    b = setup.param_bytes
    tiles = setup.mlp_tiles(layout.local_tokens, shape.hidden_size)
    total = layer_saved(shape, b, layout, mlp=tiles == 1)
    reused = 4 * shape.hidden_size if b == 4 else 0  # fp32: the norm's fp32 input is the kept layer input
    if setup.checkpointing == "selective" and not layout.ring:
        reused += kernel_output(shape, b)  # the kept kernel output is not recomputed
    return total - reused


def mlp_tile_bytes(shape: ModelShape, setup: TrainSetup, layout: Layout) -> int:
    """A tiled MLP's backward holds one tile's activations (``4 b I`` per token of the tile)."""
    tiles = setup.mlp_tiles(layout.local_tokens, shape.hidden_size)
    if tiles == 1:
        return 0
    return mlp_saved(shape, setup.param_bytes) * -(-layout.local_tokens // tiles)
