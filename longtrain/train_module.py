"""The model side of a training step: the DeepSpeed engine, the stage's RoPE and attention, and one
optimizer step split into ``forward_backward`` and ``optim_step`` (OLMo-core's TrainModule idea: the
loop in ``trainer.py`` knows no model internals)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longtrain.batching import PackedBatch
from longtrain.parallel import ParallelState, parallelize_attention
from longtrain.rope import apply_rope
from longtrain.stages import ResolvedStage


@dataclass
class StepStats:
    """What one optimizer step measured, summed over every rank."""

    loss: float
    """Global loss sum / global targets: the loss of the step's whole global batch."""
    targets: int
    sum_sq_doc_lens: int
    """Sum of squared document lengths (attention FLOPs, counted once per sequence-parallel group)."""
    grad_norm: float | None = None
    targets_by_source: list[int] | None = None
    """A mixture's targets per source (summed in the same all-reduce as ``targets``)."""


class TrainModule:
    def __init__(self, engine, hf_model: torch.nn.Module, device: torch.device,
                 parallel: dict[int, ParallelState]):
        self.engine = engine
        self.hf_model = hf_model
        self.device = device
        self.parallel = parallel
        self.world_size = dist.get_world_size()

    def begin_stage(self, stage: ResolvedStage) -> ParallelState:
        """Apply the stage's RoPE, attention and accumulation; returns its parallel state."""
        # Applied after deepspeed.initialize (which may have cast buffers to bf16): apply_rope
        # recomputes inv_freq in fp32 with transformers' own init function.
        apply_rope(self.hf_model, stage.rope_params, stage.max_position_embeddings)
        state = self.parallel[stage.sp_size]
        parallelize_attention(self.hf_model, state, stage.sp_mode)
        # DeepSpeed sees every rank run `grad_accum` micro-batches of one packed sequence (ds_config.py);
        # the resolved accumulation, derived from the global batch where the stage gives one.
        self.engine.set_train_batch_size(stage.layout.grad_accum * self.world_size)
        # DeepSpeed finds the accumulation boundary from a running count, (micro_steps + 1) % accumulation;
        # a stage starts on a boundary, so the count restarts with the stage's accumulation (otherwise 3 steps
        # x 2 micro-batches followed by an accumulation of 4 would step the optimizer after 2 of them).
        self.engine.micro_steps = 0
        if hasattr(self.engine.optimizer, "gradient_accumulation_steps"):
            # ZeRO-1/2/3 keep their own copy from initialize (ZeRO-1/2 CPU offload's gradient norm reads it).
            self.engine.optimizer.gradient_accumulation_steps = stage.layout.grad_accum
        return state

    def forward_backward(self, batches: list[PackedBatch], count_docs: bool,
                         source_targets: list[int] | None = None) -> StepStats:
        """Forward and backward of every micro-batch of one optimizer step: afterwards the gradients
        are reduced but not applied (``optim_step`` applies them). ``count_docs``: this rank counts the
        documents' lengths (every SP rank sees the row's global ``cu_seqlens``: one rank per SP group).
        ``source_targets``: this rank's targets per mixture source, summed over ranks alongside."""
        engine, dev = self.engine, self.device
        # Collective inputs live on the training device: NCCL has no CPU tensors (gloo: the device is the CPU).
        counts = torch.tensor([float(sum(b.num_targets for b in batches))] + [float(t) for t in source_targets or []],
                              dtype=torch.float64, device=dev)  # (1 + sources,)
        dist.all_reduce(counts)
        global_targets = counts[0].item()
        # engine.backward divides by grad_accum and ZeRO averages over all ranks: undo both so the
        # gradient is d(global loss sum / global targets) exactly (docs/internals.md, "Loss contract").
        scale = self.world_size * len(batches) / max(global_targets, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device: no sync per micro-batch
        sum_sq = 0
        for i, batch in enumerate(batches):
            # The boundary is said explicitly: DeepSpeed's own rule, (micro_steps + 1) % grad_accum == 0,
            # counts micro-steps from the process start (a resume starts again at 0, the count is not in
            # its checkpoint) across stages whose grad_accum differs, so after a resume or a stage of an
            # odd step count it would step after the first micro-batch of a step and skip the real one.
            engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            local = engine(batch.input_ids.to(dev), batch.position_ids.to(dev), batch.labels.to(dev),
                           batch.cu_seqlens.to(dev), batch.max_seqlen)
            engine.backward(local * scale)
            if i < len(batches) - 1:
                engine.step()  # not an accumulation boundary: DeepSpeed only advances its micro-step
            loss_sum += local.detach().double()
            if count_docs:
                lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
                sum_sq += int((lens * lens).sum())
        totals = torch.stack([loss_sum, torch.tensor(float(sum_sq), dtype=torch.float64, device=dev)])
        dist.all_reduce(totals)
        by_source = [int(c) for c in counts[1:].tolist()] if source_targets is not None else None
        return StepStats(loss=totals[0].item() / max(global_targets, 1.0), targets=int(global_targets),
                         sum_sq_doc_lens=int(totals[1].item()), targets_by_source=by_source)

    def optim_step(self, lr: float) -> tuple[float | None, bool]:
        """Apply the reduced gradients at ``lr`` (the accumulation boundary); returns the global gradient
        norm and whether DeepSpeed applied the update (it skips one whose gradients are not finite)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        own_norm = self._unreported_grad_norm()
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = own_norm
        return (float(grad_norm) if grad_norm is not None else None), bool(self.engine.was_step_applied())

    def _unreported_grad_norm(self) -> float | None:
        """The gradient norm where DeepSpeed reports none (no ZeRO, fp32: torch's optimizer, which also
        applies a non-finite update unchecked; ``longtrain/divergence.py``). Gradients are reduced
        already; averaging the norm over ranks is one tiny collective that keeps every rank's verdict equal."""
        if hasattr(self.engine.optimizer, "_global_grad_norm") or self.engine.zero_optimization_stage() > 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0).double().reshape(1).to(self.device)
        dist.all_reduce(norm)
        return float(norm.item() / self.world_size)
