"""Launched by torchrun (or as one plain process): the first step's loss and every parameter's full
gradient, through the real trainer and DeepSpeed, for each (sp_size, sp_mode, zero_stage) asked.

    python sp_grad_probe.py CONFIG OUT_DIR SP:MODE:ZERO [SP:MODE:ZERO ...]

Writes OUT_DIR/<sp>_<mode>_z<zero>.pt on rank 0: {"loss", "targets", "grads": {name: tensor}}.
Gradients are read after ``forward_backward`` (reduced, not yet applied) with DeepSpeed's
``safe_get_full_grad``, which gathers ZeRO-1/2/3 partitions (collective: every rank calls it).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from longtrain.config import load_config
from longtrain.trainer import Trainer


def probe(config: str, out_dir: Path, sp: int, mode: str, zero: int) -> None:
    cfg = load_config(config, [f"stages.0.sp_size={sp}", f"stages.0.sp_mode={mode}", f"train.zero_stage={zero}"])
    trainer = Trainer(cfg, out_dir / f"run_{sp}_{mode}_z{zero}")
    trainer.setup()
    state = trainer.module.begin_stage(trainer.stages[0])
    batches = trainer.data[0].micro_batches(0).batches
    stats = trainer.module.forward_backward(batches, count_docs=state.sp_rank == 0)  # reduced, not applied
    out = {"loss": stats.loss, "targets": stats.targets}
    grads = {}
    for name, param in trainer.module.engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        grads[name] = grad.detach().clone().cpu() if grad is not None else None
    if dist.get_rank() == 0:
        torch.save({"loss": out["loss"], "targets": out["targets"], "grads": grads},
                   out_dir / f"{sp}_{mode}_z{zero}.pt")
    dist.barrier()


def main() -> None:
    config, out_dir = sys.argv[1], Path(sys.argv[2])
    for combo in sys.argv[3:]:
        sp, mode, zero = combo.split(":")
        probe(config, out_dir, int(sp), mode, int(zero))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
