"""Run a function on N gloo ranks (spawned processes on 127.0.0.1) and collect their results.

Each rank's ``fn(rank, world_size, *args)`` returns a JSON-serialisable value; a failing rank
raises in the parent with its traceback. Collectives get a 120 s timeout so a deadlock fails
the test instead of hanging CI.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support.env import free_port


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, out_dir, *args) -> list:
    """Start ``world_size`` ranks running ``fn``; returns the list of per-rank results.

    Forked, not spawned, where the OS allows it: the ranks inherit the parent's imports
    (torch + transformers take ~5 s per process, ~20 s for 4 processes on 2 cores), and the
    parent has no process group or CUDA context that a fork could break.
    """
    forkable = "fork" in mp.get_all_start_methods() and not (dist.is_available() and dist.is_initialized())
    method = "fork" if forkable else "spawn"  # a process group left by another test must not be inherited
    mp.start_processes(_entry, args=(world_size, free_port(), str(out_dir), fn, args), nprocs=world_size,
                       join=True, start_method=method)
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]
