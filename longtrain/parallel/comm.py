"""The collectives sequence parallelism uses, with byte counting.

Why our own thin wrappers rather than ``torch.distributed.nn.functional.all_to_all_single`` or
DeepSpeed's ``_SeqAllToAll``: (1) every byte a rank sends goes through ``_record``, so the
benchmark measures the real traffic of forward *and* backward (``CommCounter``); (2) they take
an explicit process group and touch no global SP state, so groups of several ``sp_size``
coexist (stages may change ``sp_size``); (3) they only use ops DESIGN.md section 3 verified on
gloo (``all_to_all_single``, ``isend``/``irecv``) and work unchanged on NCCL.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_COUNTERS: list["CommCounter"] = []


class CommCounter:
    """Bytes this rank sent, by kind (``"all_to_all"``, ``"ring"``), and the number of calls."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Count the bytes this rank sends inside the block: ``with count_comm() as c: ...``."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(kind: str, nbytes: int) -> None:
    for counter in _COUNTERS:
        counter.bytes[kind] += int(nbytes)
        counter.calls[kind] += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _all_to_all_dim0(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(P, ...) -> (P, ...): block i goes to rank i, block j of the result came from rank j."""
    world = dist.get_world_size(group)
    if x.shape[0] != world:
        raise ValueError(f"all_to_all expects dim 0 == group size {world}, got shape {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    _record("all_to_all", _nbytes(x) * (world - 1) // world)  # the block kept locally is not sent
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all over dim 0; its gradient is the same exchange reversed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all_dim0(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # all-to-all over dim 0 is its own inverse permutation of blocks
        return _all_to_all_dim0(grad, ctx.group), None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Autograd-aware all-to-all over dim 0 of ``x`` (shape (P, ...)) within ``group``."""
    return _AllToAll.apply(x, group)


class RingExchange:
    """Send tensors to the next rank of the ring and receive the previous rank's, asynchronously.

    ``start`` posts the sends and receives and returns at once, so the caller computes on the
    current block while the next one travels (the overlap of ring attention, Liu et al. 2023,
    "Ring Attention with Blockwise Transformers"); ``wait`` returns the received tensors.
    """

    def __init__(self, group: dist.ProcessGroup, next_rank: int, prev_rank: int, tag: int = 0) -> None:
        # ``tag`` keeps two exchanges in flight at once (K/V and dK/dV in the backward) apart
        self.group, self.next_rank, self.prev_rank, self.tag = group, next_rank, prev_rank, tag
        self._works: list = []
        self._recv: Optional[list[torch.Tensor]] = None
        self._keep: list[torch.Tensor] = []

    def start(self, tensors: list[torch.Tensor]) -> "RingExchange":
        if self._works:
            raise RuntimeError("RingExchange.start called twice without wait")
        self._keep = [t.contiguous() for t in tensors]  # must stay alive until the send completes
        self._recv = [torch.empty_like(t) for t in self._keep]
        for send, recv in zip(self._keep, self._recv):
            # send and receive posted together: every rank both sends and receives, no deadlock
            self._works.append(dist.isend(send, dst=self.next_rank, group=self.group, tag=self.tag))
            self._works.append(dist.irecv(recv, src=self.prev_rank, group=self.group, tag=self.tag))
            _record("ring", _nbytes(send))
        return self

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._keep = [], []
        recv, self._recv = self._recv, None
        return recv
