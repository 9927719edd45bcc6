"""Learning-rate schedule and the deterministic, resumable row order."""
from __future__ import annotations

import math

import pytest

from longtrain.config import StageConfig
from longtrain.data import StageOrder, StepLayout
from longtrain.stages import learning_rate, stage_steps


def stage(**kw):
    base = dict(seq_len=64, rope={"type": "default", "theta": 1e4}, data="x", lr=1e-3, steps=10)
    base.update(kw)
    return StageConfig(**base)


def test_warmup_then_cosine_reaches_min_lr_at_last_step():
    s = stage(warmup_steps=3, min_lr=1e-4)
    lrs = [learning_rate(s, i, 10) for i in range(10)]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert lrs[3] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # monotone decay


def test_linear_and_constant_decay():
    lin = [learning_rate(stage(decay="linear"), i, 5) for i in range(5)]
    assert lin == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert {learning_rate(stage(decay="constant"), i, 5) for i in range(5)} == {1e-3}


def test_token_budget_rounds_steps_up():
    s = stage(steps=None, tokens=1000)
    assert stage_steps(s, rows_per_step=4) == math.ceil(1000 / (4 * 64))


def test_step_layout_covers_every_position_once_across_ranks_and_micro_batches():
    layout = StepLayout(dp_size=3, micro_batch_size=2, grad_accum=2)
    seen = []
    for step in range(4):
        for rank in range(3):
            for micro in layout.positions(step, rank):
                seen.extend(micro)
    assert sorted(seen) == list(range(4 * layout.rows_per_step))


def test_stage_order_is_a_permutation_per_epoch_and_reproducible():
    order = StageOrder(num_rows=7, seed=3, stage_index=1)
    first = order.row_ids(list(range(7)))
    second = order.row_ids(list(range(7, 14)))
    assert sorted(first) == list(range(7)) and sorted(second) == list(range(7))
    assert first != second  # a new shuffle per epoch
    again = StageOrder(num_rows=7, seed=3, stage_index=1)
    assert again.row_ids([10, 2, 5]) == [second[3], first[2], first[5]]
    assert StageOrder(7, seed=3, stage_index=2).row_ids(list(range(7))) != first


def test_dataset_checks_name_stage_and_mismatch(tmp_path):
    import json

    import datasets

    from longtrain.config import ConfigError
    from longtrain.data import PreparedDataset, check_stage_dataset

    ident = {"path": "a.model", "kind": "sentencepiece", "sha256": "aa" * 32, "vocab_size": 512, "bos_id": 1,
             "eos_id": 2, "pad_id": 3}
    (tmp_path / "meta.json").write_text(json.dumps({"seq_len": 64, "tokenizer": ident}))
    datasets.Dataset.from_dict({"input_ids": [[1] * 64], "doc_lens": [[64]], "loss_mask": [[1] * 64]}) \
        .save_to_disk(str(tmp_path / "train"))
    ds = PreparedDataset(tmp_path)
    check_stage_dataset(ds, stage(seq_len=64), "stages.0", ident, vocab_size=512)
    with pytest.raises(ConfigError, match=r"stages\.2\.seq_len is 128 .* seq_len 64"):
        check_stage_dataset(ds, stage(seq_len=128), "stages.2", ident, vocab_size=512)
    with pytest.raises(ConfigError, match="exceeds the model's embedding size 300"):
        check_stage_dataset(ds, stage(seq_len=64), "stages.0", ident, vocab_size=300)
    with pytest.raises(ConfigError, match="sha256"):
        check_stage_dataset(ds, stage(seq_len=64), "stages.0", dict(ident, sha256="bb" * 32), vocab_size=512)
    # Another kind of file (tokenizer.json converted from the .model): compared by vocab and special ids.
    check_stage_dataset(ds, stage(seq_len=64), "stages.0", dict(ident, kind="hf", sha256="cc" * 32), 512)
    with pytest.raises(ConfigError, match="bos_id 1 vs 0"):
        check_stage_dataset(ds, stage(seq_len=64), "stages.0", dict(ident, kind="hf", bos_id=0), 512)
