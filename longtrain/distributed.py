"""Process-group set-up for every launcher (deepspeed, torchrun, srun, a plain process), and small
collectives the training loop needs."""
from __future__ import annotations

import os
import socket
import warnings

import deepspeed
import torch
import torch.distributed as dist

# Slurm (srun, one task per device) sets SLURM_* but not the torch variables.
SLURM_VARS = (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"), ("LOCAL_RANK", "SLURM_LOCALID"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> torch.device:
    """Start the process group (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    # DeepSpeed 0.19 calls torch's deprecated all_gather_into_tensor name every step; nothing for
    # users to act on, so keep it out of the training log.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    for torch_var, slurm_var in SLURM_VARS:
        if torch_var not in os.environ and slurm_var in os.environ:
            os.environ[torch_var] = os.environ[slurm_var]
    if "RANK" not in os.environ:  # a plain `python -m longtrain ...`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False)
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (collective).

    Collective inputs live on the training device: NCCL has no CPU tensors (gloo: the device is the CPU)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def teardown() -> None:
    """Explicit teardown (DESIGN.md section 3: rare aborts at interpreter exit otherwise)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
