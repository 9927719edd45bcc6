"""The divergence guard: non-finite steps and loss spikes, counted and logged per step; past a limit,
the run stops with exit code 3 (``EXIT_DIVERGED``) instead of training on garbage.

What DeepSpeed 0.19.8 does with a non-finite gradient (its source, and runs at lr 1e4 on CPU):
- ZeRO-1/2 (``zero/stage_1_and_2.py``, ``step``), fp32 and bf16: the global gradient norm is inf/NaN,
  so ``overflow`` is set, the gradients are dropped and the weights stay as they were
  (``[deepspeed] OVERFLOW! Skipping step``); ``get_global_grad_norm()`` returns inf and
  ``was_step_applied()`` False. With ``bf16: {check_grad_overflow: false}`` passed through, bf16
  skips that check and applies the NaN update; the norm it reports is then NaN.
- ZeRO-3 (``zero/stage3.py``): the same skip, norm inf.
- bf16 with ZeRO-1 (``bf16_optimizer.py``, ``BF16_Optimizer.step``: ``is_invalid_grad_norm``) and bf16
  without ZeRO (``fp16/fused_optimizer.py`` in bf16): the same skip, norm inf.
- No ZeRO, fp32 (torch AdamW through ``engine._take_model_step``): no check at all. Clipping by an
  infinite norm turns the gradients into NaN, AdamW applies them and every later loss is NaN; the
  engine reports no norm, so ``TrainModule.optim_step`` computes it (the guard sees the step itself).
- fp16: the loss scaler skips an overflowing step and lowers the scale by design (normal in the first
  steps); such a step with a finite loss is logged as skipped, not counted. DeepSpeed itself stops
  a run whose scale reaches its minimum.
Hence a step is *non-finite* when its loss or its gradient norm is not finite, or DeepSpeed skipped
its update (fp16 with a finite loss excepted). Loss spikes follow Megatron's spiky-loss check (a
factor over recent losses), here over the median of the stage's recent finite losses.

All inputs are global (the loss and norm are reduced over ranks, DeepSpeed agrees on the skip), so
every rank decides the same without a collective.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from longtrain.errors import EXIT_DIVERGED, UserError

MIN_SPIKE_HISTORY = 5  # finite losses of the stage needed before a median means something


class DivergenceError(UserError):
    """Training diverged: exit code 3; the message names the step, stage, rows and last good checkpoint."""

    exit_code = EXIT_DIVERGED


@dataclass
class StepHealth:
    nonfinite: bool
    """The loss or the gradient norm was not finite, or DeepSpeed skipped the update."""
    update_skipped: bool
    """DeepSpeed did not apply the update (``was_step_applied()`` False)."""
    streak: int
    """Consecutive non-finite steps up to and including this one."""
    spike_ratio: float | None = None
    """loss / median of the recent losses, when this step is a spike."""
    stop: str | None = None
    """Why the run stops here (None: it goes on)."""

    @property
    def flagged(self) -> bool:
        return self.nonfinite or self.update_skipped or self.spike_ratio is not None


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def describe_step(loss: float, grad_norm: float | None, update_skipped: bool) -> str:
    norm = "not reported" if grad_norm is None else f"{grad_norm:g}"
    return f"loss {loss:g}, grad_norm {norm}" + (", update skipped by DeepSpeed" if update_skipped else "")


class DivergenceGuard:
    """``observe`` once per optimizer step; ``begin_stage`` at every stage start (a new stage's loss
    level differs, so the spike median restarts)."""

    def __init__(self, max_nonfinite_steps: int, spike_factor: float | None = None, spike_window: int = 50,
                 stop_on_spike: bool = False, fp16: bool = False):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.spike_factor = spike_factor
        self.stop_on_spike = stop_on_spike
        self.fp16 = fp16
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.streak = 0
        self.streak_start: int | None = None
        self.total_nonfinite = 0

    def begin_stage(self) -> None:
        self.recent.clear()

    @property
    def healthy(self) -> bool:
        """No non-finite step pending: the weights may be saved."""
        return self.streak == 0

    def observe(self, global_step: int, loss: float, grad_norm: float | None, update_applied: bool) -> StepHealth:
        skipped = not update_applied
        counted_skip = skipped and not (self.fp16 and math.isfinite(loss))
        nonfinite = not math.isfinite(loss) or (not _finite(grad_norm) and not self.fp16) or counted_skip
        if nonfinite:
            self.total_nonfinite += 1
            self.streak += 1
            self.streak_start = global_step if self.streak == 1 else self.streak_start
        else:
            self.streak, self.streak_start = 0, None
        health = StepHealth(nonfinite, skipped, self.streak)
        if self.max_nonfinite_steps and self.streak >= self.max_nonfinite_steps:
            steps = (f"steps {self.streak_start}-{global_step}" if self.streak > 1 else f"step {global_step}")
            health.stop = (f"{self.streak} consecutive non-finite steps ({steps}; train.max_nonfinite_steps is "
                           f"{self.max_nonfinite_steps}; this step: {describe_step(loss, grad_norm, skipped)})")
        if not nonfinite:
            self._check_spike(loss, health)
        return health

    def _check_spike(self, loss: float, health: StepHealth) -> None:
        if self.spike_factor is not None and len(self.recent) >= MIN_SPIKE_HISTORY:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.spike_factor * median:
                health.spike_ratio = loss / median
                if self.stop_on_spike:
                    health.stop = (f"loss spike: loss {loss:g} is {health.spike_ratio:.2f}x the median {median:g} of "
                                   f"the stage's last {len(self.recent)} losses (train.loss_spike_factor "
                                   f"{self.spike_factor:g}, train.stop_on_loss_spike true)")
                return  # a spike does not enter the history it is judged against
        self.recent.append(loss)


def diverged_message(health: StepHealth, where: str, rows: list[int], metrics_file: str,
                     last_good: str | None, lr_key: str) -> str:
    """The one line a diverged run ends with (``where``: "global step 6 (stage 0 'name', step 6 of 8)")."""
    shown = ", ".join(map(str, rows[:8])) + (f", ... ({len(rows)} rows)" if len(rows) > 8 else "")
    resume = (f"last good checkpoint: {last_good} (resume from it with a lower {lr_key}: --set {lr_key}=... "
              f"--resume auto)" if last_good else
              f"no checkpoint was saved before it: start again with a lower {lr_key}")
    return (f"training diverged at {where}: {health.stop}; dataset rows of this step: {shown}; every flagged step "
            f"and its rows are in {metrics_file}; {resume}")
