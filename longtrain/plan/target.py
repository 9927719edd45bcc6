"""Where a plan is for: the device, its memory, the host's memory, peaks and bandwidths.

Also the measured parts: the process's fixed overhead on CPU (the interpreter with torch, transformers
and DeepSpeed loaded, read from ``/proc/self/status``) and the host memory the machine has
(``/proc/meminfo``'s MemTotal: the trainer's default limit, so a CPU run that fits the machine is never
refused because other processes use memory now).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from longtrain.config import ConfigError

GiB = 2**30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# What a CPU process adds after the planner measured it and before the step's peak, beyond the tensors
# the plan counts: the model's module code, the engine's and optimizer's objects, the gloo groups,
# allocator and thread-pool state of the first step (measured: benchmarks/bench_plan.py, 100-125 MiB on
# this machine for models of 3M-30M parameters, 2k-32k tokens).
CPU_ENGINE_OVERHEAD = 110 * 2**20
# Kept free on a GPU besides the allocator's peak: the CUDA context and NCCL's buffers (outside
# torch.cuda.max_memory_allocated), and the caching allocator's rounding and fragmentation.
CUDA_RESERVE_BYTES = 2 * GiB
CUDA_RESERVE_FRACTION = 0.05


def parse_bytes(text: str, what: str) -> int:
    """``80GB`` (decimal, as GPU datasheets count), ``80GiB``, ``1TB``, ``512MiB`` or bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"{what}: cannot read {text!r} as a size; write e.g. 80GB, 80GiB, 1TB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def host_memory_bytes() -> int | None:
    """MemTotal of /proc/meminfo (None where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS), or the peak so far where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def load_trainer_libraries() -> None:
    """Import what a training process holds before its first step: the trainer's modules (torch,
    transformers, DeepSpeed) and the ``datasets`` library its data reader loads (60-70 MiB resident)."""
    import datasets  # noqa: F401  (imported for its memory, as the trainer will)

    import longtrain.trainer  # noqa: F401


def measure_cpu_fixed_overhead() -> int:
    """The trainer's fixed overhead on CPU, measured in this process: the resident size with the
    trainer's libraries loaded, plus what the engine and the first step add (``CPU_ENGINE_OVERHEAD``)."""
    load_trainer_libraries()
    return current_rss_bytes() + CPU_ENGINE_OVERHEAD


@dataclass(frozen=True)
class Target:
    """The machine a plan is for."""

    device: str
    """cpu | cuda"""
    world_size: int
    nodes: int = 1
    device_memory: int | None = None
    """Per device (cuda). On cpu: an optional per-rank limit (host memory is the real one)."""
    host_memory: int | None = None
    """Per node."""
    fixed_overhead: int = 0
    """Per rank, in the measured peak (cpu: the process; cuda: 0, the context is outside the allocator)."""
    peak_flops: float = 989e12
    efficiency: float = 0.5
    """Fraction of the peak the step's FLOPs run at (model + recomputation)."""
    bandwidth: float = 25e9
    """Bytes/s per rank between nodes (ZeRO traffic when nodes > 1)."""
    intra_node_bandwidth: float = 150e9
    """Bytes/s per rank inside a node (sequence parallelism, ZeRO on one node)."""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.world_size < 1 or self.nodes < 1 or self.world_size % self.nodes:
            raise ConfigError(f"--world-size ({self.world_size}) must be a positive multiple of --nodes ({self.nodes})")

    @property
    def on_cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes

    @property
    def usable_device_memory(self) -> int | None:
        """What a rank's peak may reach: device memory less the CUDA reserve; on CPU the per-rank limit."""
        if self.device_memory is None:
            return None
        if not self.on_cuda:
            return self.device_memory
        return int(self.device_memory * (1 - CUDA_RESERVE_FRACTION)) - CUDA_RESERVE_BYTES

    def rank_limit(self) -> int | None:
        """What one rank's peak may reach. CUDA: the device's memory less the reserve. CPU: the ranks of a
        node share its memory, so each rank's share of it (and the per-rank limit, if given)."""
        if self.on_cuda:
            return self.usable_device_memory
        limits = [self.host_memory // self.ranks_per_node] if self.host_memory else []
        limits += [self.device_memory] if self.device_memory else []
        return min(limits) if limits else None

    def zero_bandwidth(self) -> float:
        return self.bandwidth if self.nodes > 1 else self.intra_node_bandwidth

    def sp_bandwidth(self, sp_size: int) -> float:
        return self.intra_node_bandwidth if self.ranks_per_node % sp_size == 0 else self.bandwidth
