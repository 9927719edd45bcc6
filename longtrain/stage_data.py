"""The rows a stage trains on, step by step: its dataset(s), its row order and its step layout.

Optimizer step ``s`` of a stage reads the stage positions ``[s * R, (s + 1) * R)`` (``R`` rows per
step over all data-parallel ranks), mapped to (source, dataset row) by the stage's seeded order
(``longtrain/data.py``: ``MixtureOrder``, a single dataset being the one-source case); each rank
flattens its rows into packed micro-batches and, with sequence parallelism, keeps its slice of
every row. The tokens of each source in a step follow from the order alone (no communication).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longtrain.batching import PackedBatch, make_packed_batch
from longtrain.data import MixtureOrder, PreparedDataset
from longtrain.parallel import ParallelState, shard_batch
from longtrain.stages import ResolvedStage


@dataclass
class StepRows:
    """This rank's part of one optimizer step."""

    batches: list[PackedBatch]
    row_ids: list[list]
    """Per micro-batch, the rows read (the samples log): dataset row ids, or ``[source, row]`` pairs in a
    mixture."""
    source_targets: list[int] | None
    """A mixture's target tokens per source in this rank's rows (0 on sequence-parallel ranks > 0, which
    read the same rows: summed over ranks it counts each row once); None for a single dataset."""


def row_targets(row: dict) -> int:
    """Target tokens of one dataset row as ``make_packed_batch`` counts them (a row starts a segment, so
    a micro-batch's targets are the sum over its rows): ``t >= 1`` with ``loss_mask[t]`` 1 and ``t`` not
    a segment start."""
    mask = np.asarray(row["loss_mask"]) == 1  # (seq_len,)
    starts = np.zeros(len(mask), dtype=bool)
    starts[np.cumsum(np.asarray(row["doc_lens"]))[:-1]] = True
    starts[0] = True
    return int((mask & ~starts).sum())


class StageData:
    def __init__(self, stage: ResolvedStage, datasets: list[PreparedDataset], seed: int, state: ParallelState):
        self.stage = stage
        self.datasets = list(datasets)
        self.state = state
        self.names = [s.name for s in stage.config.sources()]
        self.order = MixtureOrder([len(d) for d in self.datasets], [s.weight for s in stage.config.sources()],
                                  seed, stage.index)

    @property
    def mixed(self) -> bool:
        return len(self.datasets) > 1

    def micro_batches(self, step_in_stage: int) -> StepRows:
        """This rank's micro-batches of a step, the rows of each (for the samples log) and, in a mixture,
        its target tokens per source."""
        batches, row_ids = [], []
        source_targets = [0] * len(self.datasets) if self.mixed else None
        for positions in self.stage.layout.positions(step_in_stage, self.state.dp_rank):
            located = self.order.locate(positions)
            rows = self._read(located)
            row_ids.append([[k, r] for k, r in located] if self.mixed else [r for _, r in located])
            if source_targets is not None and self.state.sp_rank == 0:
                for (k, _), row in zip(located, rows):
                    source_targets[k] += row_targets(row)
            batch = make_packed_batch(rows)
            if self.stage.sp_size > 1:
                batch = shard_batch(batch, self.state, self.stage.sp_mode)
            batches.append(batch)
        return StepRows(batches, row_ids, source_targets)

    def describe(self) -> str:
        """One line on a mixture's sources: name, share of the stage's rows, rows in the dataset."""
        shares = self.order.quotas / self.order.period
        return (f"stage {self.stage.index} data: a mixture of {len(self.datasets)} sources, " + ", ".join(
            f"{name} {share:.2%} ({len(d):,} rows)" for name, share, d in zip(self.names, shares, self.datasets)))

    def rows_of(self, positions: list[int]) -> list:
        """The rows at global stage positions as the samples log names them: dataset row ids, or
        ``[source, row]`` pairs in a mixture."""
        located = self.order.locate(positions)
        return [[k, r] for k, r in located] if self.mixed else [r for _, r in located]

    def _read(self, located: list[tuple[int, int]]) -> list[dict]:
        """Rows in position order, read with one ``rows`` call per source (one call for a single dataset)."""
        rows: list[dict | None] = [None] * len(located)
        for k, dataset in enumerate(self.datasets):
            slots = [i for i, (source, _) in enumerate(located) if source == k]
            for slot, row in zip(slots, dataset.rows([located[i][1] for i in slots])):
                rows[slot] = row
        return rows  # type: ignore[return-value]

    def by_source(self, values) -> dict[str, int]:
        """``{source name: value}`` for per-source values in source order."""
        return {name: int(v) for name, v in zip(self.names, values)}

    def step_tokens(self, step_in_stage: int) -> dict[str, int]:
        """Tokens of each source in optimizer step ``step_in_stage`` over all ranks (rows x seq_len)."""
        rows = self.stage.layout.rows_per_step
        start, end = step_in_stage * rows, (step_in_stage + 1) * rows
        return self.by_source((self.order.rows_before(end) - self.order.rows_before(start)) * self.stage.seq_len)

    def epochs_after(self, steps_done: int) -> dict[str, int]:
        """Each source's epoch of its last row read once ``steps_done`` steps of the stage are done."""
        return self.by_source(self.order.epochs_after(steps_done * self.stage.layout.rows_per_step))

    def epoch_after(self, steps_done: int) -> int:
        """The epoch of the last row read once ``steps_done`` steps are done (a mixture: the largest over
        its sources, i.e. how often the most repeated source has been read again)."""
        return max(self.epochs_after(steps_done).values())
