"""Packed micro-batches: shifted labels never cross a segment, positions restart, clear errors on bad rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longtrain.batching import IGNORE_INDEX, PackedBatch, make_packed_batch, segment_ids
from tests.support.paths import shared_file

X = IGNORE_INDEX
ROWS = [
    # two documents then a padding segment (pad id 0, loss_mask 0)
    {"input_ids": [11, 12, 13, 21, 22, 23, 0, 0], "doc_lens": [3, 3, 2], "loss_mask": [1, 1, 1, 1, 1, 1, 0, 0]},
    # a sliding window: the first segment continues a document whose first 2 tokens an earlier window trained
    {"input_ids": [31, 32, 33, 34, 35, 41, 42, 43], "doc_lens": [5, 3], "loss_mask": [0, 0, 1, 1, 1, 1, 1, 1]},
    # a row without any target
    {"input_ids": [51, 52, 53, 54, 0, 0, 0, 0], "doc_lens": [4, 4], "loss_mask": [0, 0, 0, 0, 0, 0, 0, 0]},
]


def test_hand_made_rows():
    b = make_packed_batch(ROWS)
    assert isinstance(b, PackedBatch)
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22, 23, 0, 0, 31, 32, 33, 34, 35, 41, 42, 43,
                                     51, 52, 53, 54, 0, 0, 0, 0]]
    assert b.labels.tolist() == [[12, 13, X, 22, 23, X, X, X,  # no target is 21 (next doc) or padding
                                  X, 33, 34, 35, X, 42, 43, X,  # 32 was trained by the earlier window
                                  X, X, X, X, X, X, X, X]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert b.cu_seqlens.tolist() == [0, 3, 6, 8, 13, 16, 20, 24]
    assert b.cu_seqlens.dtype == torch.int32
    assert b.input_ids.dtype == b.labels.dtype == b.position_ids.dtype == torch.long
    assert b.input_ids.shape == b.labels.shape == b.position_ids.shape == (1, 24)
    assert b.max_seqlen == 5 and isinstance(b.max_seqlen, int)
    assert b.num_targets == 9 == int((b.labels != X).sum())


def test_numpy_rows_equal_list_rows():
    as_numpy = [{"input_ids": np.asarray(r["input_ids"], dtype=np.int32),
                 "doc_lens": np.asarray(r["doc_lens"], dtype=np.int32),
                 "loss_mask": np.asarray(r["loss_mask"], dtype=np.uint8)} for r in ROWS]
    a, b = make_packed_batch(ROWS), make_packed_batch(as_numpy)
    for name in ("input_ids", "position_ids", "labels", "cu_seqlens"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.max_seqlen, a.num_targets) == (b.max_seqlen, b.num_targets)


def test_zero_target_batch():
    b = make_packed_batch([ROWS[2]])
    assert b.num_targets == 0 and (b.labels == X).all()


def test_segment_ids():
    b = make_packed_batch(ROWS[:2])
    assert segment_ids(b.cu_seqlens, 16).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4]
    with pytest.raises(ValueError, match="end at T=17"):
        segment_ids(b.cu_seqlens, 17)
    with pytest.raises(ValueError, match="strictly increasing"):
        segment_ids(torch.tensor([0, 3, 3, 5]), 5)


def _reference_labels(rows):
    """Token-by-token reference: walk each document and its loss mask."""
    labels = []
    for row in rows:
        start = 0
        for n in row["doc_lens"]:
            seg_ids = list(row["input_ids"][start:start + n])
            seg_mask = list(row["loss_mask"][start:start + n])
            labels += [seg_ids[t + 1] if seg_mask[t + 1] else X for t in range(n - 1)] + [X]
            start += n
    return labels


def test_real_text_rows_match_token_by_token_reference():
    """Rows cut from real tokenized text at random document boundaries, masks and padding."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(shared_file("tokenizers", "spm_botchan_test_model.model")))
    text = shared_file("corpora", "botchan.txt").read_text(encoding="utf-8")
    ids = sp.encode(text[:200_000])
    rng = np.random.default_rng(0)
    seq_len, rows, pos = 256, [], 0
    for _ in range(12):
        lens, row_mask = [], []
        while sum(lens) < seq_len:
            n = int(min(rng.integers(1, 120), seq_len - sum(lens)))
            lens.append(n)
            row_mask += [0] * n if rng.random() < 0.2 else list(rng.integers(0, 2, n) | (rng.random() < 0.7))
        rows.append({"input_ids": ids[pos:pos + seq_len], "doc_lens": lens, "loss_mask": row_mask})
        pos += seq_len
    b = make_packed_batch(rows)
    expected = _reference_labels(rows)
    assert b.labels[0].tolist() == expected
    n_docs = sum(len(r["doc_lens"]) for r in rows)
    assert n_docs > 40 and 500 < b.num_targets < 12 * seq_len  # guard: many boundaries, masks really used
    seg = segment_ids(b.cu_seqlens, 12 * seq_len)
    targets = (b.labels[0] != X).nonzero().squeeze(1)
    assert (seg[targets] == seg[targets + 1]).all()  # every target stays inside its segment
    assert torch.equal(b.labels[0, targets], b.input_ids[0, targets + 1])
    assert (b.position_ids[0][b.cu_seqlens[:-1].long()] == 0).all()


@pytest.mark.parametrize("row, match", [
    ({"input_ids": [1, 2], "doc_lens": [2]}, r"row 0 lacks column\(s\) \['loss_mask'\]"),
    ({"input_ids": [1, 2, 3], "doc_lens": [2], "loss_mask": [1, 1, 1]}, r"sum\(doc_lens\) = 2 but the row has 3"),
    ({"input_ids": [1, 2, 3], "doc_lens": [3], "loss_mask": [1, 1]}, r"loss_mask has 2 items but input_ids has 3"),
    ({"input_ids": [1, 2, 3], "doc_lens": [3, 0], "loss_mask": [1, 1, 1]}, r"doc_lens must all be >= 1"),
    ({"input_ids": [1, 2, 3], "doc_lens": [3], "loss_mask": [1, 2, 1]}, r"loss_mask must hold only 0 and 1"),
    ({"input_ids": [1.0, 2.0], "doc_lens": [2], "loss_mask": [1, 1]}, r"input_ids must be a non-empty 1-D list"),
    ({"input_ids": [], "doc_lens": [], "loss_mask": []}, r"input_ids must be a non-empty 1-D list"),
    ({"input_ids": [1, -2], "doc_lens": [2], "loss_mask": [1, 1]}, r"negative id"),
])
def test_bad_rows_are_clear_errors(row, match):
    with pytest.raises(ValueError, match=match):
        make_packed_batch([row])


def test_error_names_the_row_and_empty_batch():
    bad = {"input_ids": [1, 2, 3], "doc_lens": [1, 1], "loss_mask": [1, 1, 1]}
    with pytest.raises(ValueError, match="micro-batch row 1: sum"):
        make_packed_batch([ROWS[0], bad])
    with pytest.raises(ValueError, match="at least one row"):
        make_packed_batch([])
