"""The rows a stage trains on, step by step: its dataset, its row order and its step layout.

Optimizer step ``s`` of a stage reads the stage positions ``[s * R, (s + 1) * R)`` (``R`` rows per
step over all data-parallel ranks), mapped to dataset rows by the stage's seeded order
(``longtrain/data.py``); each rank flattens its rows into packed micro-batches and, with sequence
parallelism, keeps its slice of every row.
"""
from __future__ import annotations

from longtrain.batching import PackedBatch, make_packed_batch
from longtrain.data import PreparedDataset, StageOrder
from longtrain.parallel import ParallelState, shard_batch
from longtrain.stages import ResolvedStage


class StageData:
    def __init__(self, stage: ResolvedStage, dataset: PreparedDataset, seed: int, state: ParallelState):
        self.stage = stage
        self.dataset = dataset
        self.state = state
        self.order = StageOrder(len(dataset), seed, stage.index)

    def micro_batches(self, step_in_stage: int) -> tuple[list[PackedBatch], list[list[int]]]:
        """This rank's micro-batches of a step, and the dataset rows of each (for the samples log)."""
        batches, row_ids = [], []
        for positions in self.stage.layout.positions(step_in_stage, self.state.dp_rank):
            ids = self.order.row_ids(positions)
            row_ids.append(ids)
            batch = make_packed_batch(self.dataset.rows(ids))
            if self.stage.sp_size > 1:
                batch = shard_batch(batch, self.state, self.stage.sp_mode)
            batches.append(batch)
        return batches, row_ids

    def epoch_after(self, steps_done: int) -> int:
        """The epoch of the last row read once ``steps_done`` steps of the stage are done."""
        return self.order.epoch_of(steps_done * self.stage.layout.rows_per_step - 1)
