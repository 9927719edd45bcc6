"""Process groups for sequence parallelism (SP) and data parallelism (DP).

Layout (docs/internals.md, "Sequence parallel contract"): the world is split into
``dp_size = world_size // sp_size`` SP groups of *contiguous* ranks
(``[0..sp-1], [sp..2sp-1], ...``), so an SP group stays inside a node whenever
``sp_size`` divides the GPUs per node (the all-to-all / ring traffic is the heavy one).
The DP rank of a process is the index of its SP group: all ranks of one SP group read the
same rows and each keeps its slice of them (``sharding.shard_batch``).

``torch.distributed.new_group`` is collective over the *whole* world: every rank must call it
for every group, in the same order, even for groups it is not in. ``init_parallel_states``
therefore creates the groups of every ``sp_size`` a run uses up front, once, on all ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch.distributed as dist


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sp_size(sp_size: int, world_size: int) -> None:
    """Raise a ValueError naming ``sp_size`` when it cannot split ``world_size`` ranks."""
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"sp_size must be a positive integer, got {sp_size!r}")
    if world_size % sp_size != 0:
        raise ValueError(
            f"sp_size={sp_size} does not divide the world size {world_size}: every sequence-parallel "
            f"group needs sp_size ranks and the data-parallel degree is world_size / sp_size. "
            f"With {world_size} ranks use sp_size in {divisors(world_size)}.")


def _new_sp_group(world_size: int, rank: int, sp_size: int) -> dist.ProcessGroup:
    """Create all ``world_size / sp_size`` SP groups (collective) and return this rank's."""
    if (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
        raise ValueError(f"ParallelState(world_size={world_size}, rank={rank}) does not match torch.distributed "
                         f"(world size {dist.get_world_size()}, rank {dist.get_rank()})")
    mine = None
    for first in range(0, world_size, sp_size):
        group = dist.new_group(list(range(first, first + sp_size)))
        if first <= rank < first + sp_size:
            mine = group
    return mine


@dataclass(frozen=True, eq=False)
class ParallelState:
    """Where this rank sits in the SP x DP grid for one ``sp_size``, with its SP process group.

    **Collective when torch.distributed is initialised and ``sp_size > 1``**: the constructor then
    creates the SP groups (``torch.distributed.new_group`` on every rank), so construct the states
    of every ``sp_size`` of the run up front, on all ranks, in the same order
    (``init_parallel_states`` does exactly that). Without an initialised process group (or with
    ``sp_size == 1``) ``sp_group`` stays ``None``: fine for layout arithmetic and single-process runs.
    """

    world_size: int
    rank: int
    sp_size: int
    sp_group: Optional[dist.ProcessGroup] = None

    def __post_init__(self) -> None:
        check_sp_size(self.sp_size, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside the world of {self.world_size} ranks")
        if self.sp_size > 1 and self.sp_group is None and dist.is_available() and dist.is_initialized():
            object.__setattr__(self, "sp_group", _new_sp_group(self.world_size, self.rank, self.sp_size))

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_ranks(self) -> list[int]:
        """Global ranks of this rank's SP group, in SP-rank order."""
        first = self.dp_rank * self.sp_size
        return list(range(first, first + self.sp_size))

    def sp_global_rank(self, sp_rank: int) -> int:
        """Global rank of the member ``sp_rank`` (mod ``sp_size``) of this rank's SP group."""
        return self.dp_rank * self.sp_size + sp_rank % self.sp_size

    def require_group(self) -> Optional[dist.ProcessGroup]:
        if self.sp_size > 1 and self.sp_group is None:
            raise RuntimeError(
                f"{self!r} has no process group: construct it after torch.distributed is initialised "
                f"(longtrain.parallel.init_parallel_states([...]) on every rank)")
        return self.sp_group

    def __repr__(self) -> str:
        return (f"ParallelState(world_size={self.world_size}, rank={self.rank}, sp_size={self.sp_size}, "
                f"sp_rank={self.sp_rank}, dp_rank={self.dp_rank}, dp_size={self.dp_size})")


def init_parallel_states(sp_sizes: Iterable[int]) -> dict[int, ParallelState]:
    """Create the SP groups of every ``sp_size`` in ``sp_sizes``; returns ``{sp_size: state}``.

    Collective: call it on every rank with the same ``sp_sizes`` (e.g. the ``sp_size`` of every
    stage), after ``torch.distributed`` is initialised. Without an initialised process group
    only ``sp_size == 1`` is possible (a plain single-process run).
    """
    sizes = sorted(set(sp_sizes))  # sorted: the same new_group order on every rank
    if not sizes:
        raise ValueError("init_parallel_states needs at least one sp_size")
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    else:
        world_size, rank = 1, 0
    for sp in sizes:
        check_sp_size(sp, world_size)
    return {sp: ParallelState(world_size, rank, sp) for sp in sizes}
