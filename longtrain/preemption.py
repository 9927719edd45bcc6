"""SIGTERM / SIGUSR1 (a preemption; Slurm sends SIGUSR1 ahead of time when asked): set a flag that the
training loop reads at the end of every step, so every rank saves a checkpoint and exits 0 together."""
from __future__ import annotations

import signal

import torch

from longtrain.distributed import any_rank


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got a signal (collective: every rank calls it every step)."""
        stop = any_rank(self.signal_name is not None, device)
        if stop and self.signal_name is None:
            self.signal_name = "signal on another rank"
        return stop
