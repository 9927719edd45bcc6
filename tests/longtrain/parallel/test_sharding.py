"""Process groups' layout, sequence sharding and the head/degree checks (no processes needed)."""
from __future__ import annotations

import pytest
import torch

from longtrain.batching import make_packed_batch
from longtrain.parallel import (ParallelState, check_sp_for_model, check_ulysses_heads, init_parallel_states,
                                kv_repeat, local_token_index, padded_length, shard_batch, ulysses_degrees)
from tests.support.text import real_rows


def test_state_layout_contiguous_groups():
    states = [ParallelState(8, r, 4) for r in range(8)]
    assert [s.sp_rank for s in states] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [s.dp_rank for s in states] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert states[5].sp_ranks == [4, 5, 6, 7] and states[5].dp_size == 2
    assert states[7].sp_global_rank(states[7].sp_rank + 1) == 4  # the ring wraps inside the group


def test_state_errors():
    with pytest.raises(ValueError, match=r"sp_size=3 does not divide the world size 4.*\[1, 2, 4\]"):
        ParallelState(4, 0, 3)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelState(4, 0, 0)
    with pytest.raises(RuntimeError, match="no process group"):
        ParallelState(4, 0, 2).require_group()  # torch.distributed not initialised here
    assert init_parallel_states([1])[1].sp_group is None
    with pytest.raises(ValueError, match="sp_size=2 does not divide the world size 1"):
        init_parallel_states([1, 2])


def test_ulysses_degrees_and_errors():
    assert ulysses_degrees(28, 4) == [1, 2, 4, 7, 14, 28]  # Qwen2-7B
    assert ulysses_degrees(32, 8) == [1, 2, 4, 8, 16, 32]  # Llama-3-8B
    assert [kv_repeat(28, 4, p) for p in (1, 2, 4, 7, 14, 28)] == [1, 1, 1, 7, 7, 7]
    assert kv_repeat(8, 2, 4) == 2 and kv_repeat(6, 3, 2) == 2 and kv_repeat(4, 1, 4) == 4
    for heads, kv in ((28, 4), (32, 8), (6, 3), (12, 2)):
        for p in ulysses_degrees(heads, kv):
            f = kv_repeat(heads, kv, p)
            assert (kv * f) % p == 0 and heads % (kv * f) == 0  # whole kv heads, same q->kv map
    with pytest.raises(ValueError, match=r"sp_size=8 does not divide num_attention_heads=28.*\[1, 2, 4, 7, 14, 28\]"):
        check_ulysses_heads(28, 4, 8)

    class Config:
        num_attention_heads, num_key_value_heads = 6, 6

    with pytest.raises(ValueError, match=r"sp_size in \[1, 2, 3, 6\] with mode 'ulysses'"):
        check_sp_for_model(Config(), 4, "ulysses")
    check_sp_for_model(Config(), 4, "ring")  # ring has no head constraint
    with pytest.raises(ValueError, match="mode must be one of"):
        check_sp_for_model(Config(), 2, "zigzag")


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
@pytest.mark.parametrize("sp", [2, 3, 4])
def test_shard_batch_partitions_the_padded_row(mode, sp):
    rows = real_rows(37, 5)  # T = 185: not divisible by sp nor 2*sp -> padding
    batch = make_packed_batch(rows)
    total = padded_length(185, sp, mode)
    assert total > 185, "guard: this layout must need padding"
    shards = [shard_batch(batch, ParallelState(sp, r, sp), mode) for r in range(sp)]
    index = torch.cat([local_token_index(total, sp, r, mode) for r in range(sp)])
    assert sorted(index.tolist()) == list(range(total))  # every token on exactly one rank
    for name in ("input_ids", "position_ids", "labels"):
        full = torch.empty(total, dtype=torch.long)
        full[index] = torch.cat([getattr(s, name)[0] for s in shards])
        assert torch.equal(full[:185], getattr(batch, name)[0]), name  # slices reassemble the batch
    pad = slice(185, total)
    assert (full[pad] == -100).all()  # padding is never a target
    for s in shards:
        assert s.input_ids.shape == (1, total // sp)
        assert s.cu_seqlens.tolist() == batch.cu_seqlens.tolist() + [total]  # global layout + padding segment
        assert s.num_targets == int((s.labels != -100).sum())
    assert sum(s.num_targets for s in shards) == batch.num_targets  # no target lost or duplicated


def test_target_at_slice_boundary_is_kept():
    """Labels are shifted before slicing: the last token of slice 0 still predicts the first of slice 1."""
    batch = make_packed_batch(real_rows(64, 1))
    s0 = shard_batch(batch, ParallelState(2, 0, 2), "ulysses")
    s1 = shard_batch(batch, ParallelState(2, 1, 2), "ulysses")
    assert batch.cu_seqlens.tolist() == [0, 64] or 32 not in batch.cu_seqlens.tolist()  # a document crosses
    assert s0.labels[0, -1] == s1.input_ids[0, 0] != -100


def test_sp1_is_identity_and_bad_input():
    batch = make_packed_batch(real_rows(61, 2))
    assert shard_batch(batch, ParallelState(1, 0, 1), "ring") is batch
    with pytest.raises(ValueError, match="mode must be one of"):
        shard_batch(batch, ParallelState(2, 0, 2), "context")
