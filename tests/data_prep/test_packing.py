"""Strategy invariants on synthetic documents whose tokens say where they come from.

Token ``d * BASE + p + 1`` is position ``p`` of document ``d``, so every token of every row can
be traced back, and "every token but a document's first is a target exactly once" is checked
exactly, not statistically.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_prep.packing import (BestFitPacker, PackCounts, RowAssembler, best_fit_decreasing, make_packer,
                               slide_windows)

BASE = 100_000
PAD = 0


def synth_docs(lengths) -> list[np.ndarray]:
    return [np.arange(d * BASE + 1, d * BASE + 1 + n, dtype=np.int32) for d, n in enumerate(lengths)]


def origin(token: int) -> tuple[int, int]:
    return (token - 1) // BASE, (token - 1) % BASE


def pack(strategy, docs, seq_len, stride=None, buffer_tokens=0, batch_tokens=1 << 22):
    rows, counts = [], PackCounts()

    def emit(ids, mask, doc_lens):
        rows.extend((i.copy(), list(d), m.copy()) for i, d, m in zip(ids, doc_lens, mask))

    assembler = RowAssembler(seq_len, PAD, emit, counts, batch_tokens=batch_tokens)
    packer = make_packer(strategy, seq_len, assembler, stride, buffer_tokens)
    for d in docs:
        packer.add(d)
    packer.finish()
    return rows, counts


def trace(rows, seq_len):
    """Per segment: (row, doc, first position, length, first_target); checks the row contract."""
    segs, padding = [], 0
    for r, (ids, lens, mask) in enumerate(rows):
        assert len(ids) == seq_len == len(mask) == sum(lens)
        offset = 0
        for k, n in enumerate(lens):
            t, m = ids[offset:offset + n], mask[offset:offset + n]
            offset += n
            if (t == PAD).all():
                assert k == len(lens) - 1 and not m.any(), "padding must be the last segment, masked"
                padding += n
                continue
            d, p = origin(int(t[0]))
            assert [origin(int(x)) for x in t] == [(d, p + i) for i in range(n)], "a segment mixes documents"
            assert m[0] == 0, "a segment's first token is a target"
            first_target = int(np.argmax(m)) if m.any() else n
            assert not m[:first_target].any() and m[first_target:].all()
            segs.append((r, d, p, n, first_target))
    return segs, padding


def check_common(rows, counts, docs, seq_len):
    segs, padding = trace(rows, seq_len)
    targets = Counter((d, p + i) for _, d, p, n, ft in segs for i in range(ft, n))
    assert max(targets.values()) == 1, "a token is a target twice"
    assert not any(p == 0 for d, p in targets), "a document's first token is a target"
    c = counts.as_dict()
    non_targets = sum(int((m == 0).sum()) for _, _, m in rows)
    assert c["padding_tokens"] == padding and c["rows"] == len(rows)
    assert c["non_target_tokens"] == non_targets == (c["padding_tokens"] + c["document_first_tokens"]
                                                     + c["repeated_context_tokens"] + c["lost_target_tokens"])
    assert c["document_first_tokens"] == len(docs)
    return segs, targets


def all_targets(docs):
    return {(d, p) for d, doc in enumerate(docs) for p in range(1, len(doc))}


LENGTHS = [5, 1, 2, 40, 64, 65, 200, 17, 33, 128, 3, 90, 63, 7, 300, 31, 12, 64, 2, 129]


@pytest.mark.parametrize("seq_len", [2, 3, 16, 64])
def test_concat_invariants(seq_len):
    docs = synth_docs(LENGTHS)
    rows, counts = pack("concat", docs, seq_len)
    segs, targets = check_common(rows, counts, docs, seq_len)
    # Lost targets are exactly the first tokens of the pieces that continue a document at a row start.
    continued = {(d, p) for r, d, p, n, ft in segs if p > 0}
    assert all(rows[r][0][0] == d * BASE + p + 1 for r, d, p, n, ft in segs if p > 0), "continuation not at row start"
    assert len(continued) == counts.lost_target_tokens > 0, "guard: some document must cross a row boundary"
    assert targets.keys() == all_targets(docs) - continued
    # Order is kept and only the last row is padded.
    assert [d for _, d, p, _, _ in segs if p == 0] == list(range(len(docs)))
    assert all((ids != PAD).all() for ids, _, _ in rows[:-1])
    assert any(len(lens) > 1 for _, lens, _ in rows), "guard: some row must hold several segments"


@pytest.mark.parametrize("seq_len,buffer_tokens", [(2, 0), (16, 0), (64, 0), (64, 10_000), (128, 300)])
def test_best_fit_invariants(seq_len, buffer_tokens):
    docs = synth_docs(LENGTHS * 3)
    rows, counts = pack("best-fit", docs, seq_len, buffer_tokens=buffer_tokens)
    segs, targets = check_common(rows, counts, docs, seq_len)
    assert targets.keys() == all_targets(docs), "every token but a document's first is a target exactly once"
    by_doc = {}
    for r, d, p, n, ft in segs:
        by_doc.setdefault(d, []).append((p, n, ft))
    for d, pieces in by_doc.items():
        pieces.sort()
        if len(docs[d]) <= seq_len:
            assert pieces == [(0, len(docs[d]), 1)], f"document {d} ({len(docs[d])} tokens) was split"
        else:  # pieces overlap by one token, in order they give back the document
            assert pieces[0][0] == 0 and pieces[-1][0] + pieces[-1][1] == len(docs[d])
            for (p0, n0, _), (p1, n1, ft1) in zip(pieces, pieces[1:]):
                assert p1 == p0 + n0 - 1 and ft1 == 1
    assert counts.documents_split == sum(len(d) > seq_len for d in docs) > 0, "guard: no long document"
    assert counts.repeated_context_tokens > 0
    if seq_len > 2:  # (at seq_len 2 only 1-token documents could share a row)
        assert max(Counter(r for r, *_ in segs).values()) >= 2, "guard: no row packs several documents"
    # Long documents fill the room short ones leave: under two rows of padding in all.
    assert counts.padding_tokens < 2 * seq_len, counts


def test_best_fit_only_short_documents_packs_tightly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=3000).tolist()
    docs = synth_docs(lengths)
    rows, counts = pack("best-fit", docs, 512, buffer_tokens=50_000)
    segs, targets = check_common(rows, counts, docs, 512)
    assert counts.documents_split == 0 and targets.keys() == all_targets(docs)
    lower_bound = -(-sum(lengths) // 512)
    assert len(rows) <= lower_bound * 1.001 + 1, (len(rows), lower_bound)


@pytest.mark.parametrize("seq_len,stride", [(16, 1), (16, 5), (16, 8), (16, 15), (16, 16), (64, 32), (2, 1), (2, 2)])
def test_slide_window_invariants(seq_len, stride):
    lengths = LENGTHS + [seq_len + 1, 2 * seq_len, 3 * seq_len + 1, seq_len]
    docs = synth_docs(lengths)
    rows, counts = pack("slide-window", docs, seq_len, stride=stride, buffer_tokens=0)
    segs, targets = check_common(rows, counts, docs, seq_len)
    lost = set(all_targets(docs)) - set(targets)
    if stride < seq_len:
        assert not lost, "with overlapping windows every token but the first is a target exactly once"
    assert len(lost) == counts.lost_target_tokens
    by_doc = {}
    for r, d, p, n, ft in segs:
        by_doc.setdefault(d, []).append((p, n, ft, r))
    for d, pieces in by_doc.items():
        n_doc = len(docs[d])
        if n_doc <= seq_len:
            assert [(p, n) for p, n, _, _ in pieces] == [(0, n_doc)], "short documents are never split"
            continue
        pieces.sort()
        assert all(n == seq_len for _, n, _, _ in pieces), "every window is full"
        assert all(len(rows[r][1]) == 1 for *_, r in pieces), "a window is a row of its own"
        starts = [p for p, *_ in pieces]
        expected = list(range(0, n_doc - seq_len, stride)) + [n_doc - seq_len]
        assert starts == sorted(set(expected)), "windows start every stride; the last ends at the document's end"
        for (p0, _, _, _), (p1, _, ft1, _) in zip(pieces, pieces[1:]):
            overlap = p0 + seq_len - p1
            assert ft1 == max(1, overlap)
            if overlap == 0:
                assert (d, p1) in lost
    assert counts.repeated_context_tokens > 0 or stride == seq_len, "guard: no window overlap"
    assert counts.documents_split == sum(n > seq_len for n in lengths) > 0


def test_slide_window_tail_rule():
    # n=23, L=10, stride 4: windows 0, 4, 8 then right-aligned 13 (ends at 23).
    assert slide_windows(23, 10, 4) == [(0, 10, 1), (4, 14, 6), (8, 18, 6), (12, 22, 6), (13, 23, 9)]
    assert slide_windows(20, 10, 10) == [(0, 10, 1), (10, 20, 1)]  # no overlap: first token lost
    assert slide_windows(25, 10, 10) == [(0, 10, 1), (10, 20, 1), (15, 25, 5)]


def _naive_bfd(sizes, capacity):
    bins, rooms = [], []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        fits = [(rooms[b], b) for b in range(len(bins)) if rooms[b] >= sizes[i]]
        if fits:
            _, b = min(fits)
        else:
            bins.append([])
            rooms.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        rooms[b] -= sizes[i]
    return [b for b in bins]


def test_best_fit_decreasing_matches_reference():
    rng = np.random.default_rng(1)
    for _ in range(30):
        capacity = int(rng.integers(2, 60))
        sizes = rng.integers(1, capacity + 1, size=int(rng.integers(1, 80))).tolist()
        bins = best_fit_decreasing(sizes, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in b) <= capacity for b in bins)
        assert bins == _naive_bfd(sizes, capacity)


def test_best_fit_buffer_bounds_memory():
    """The buffer never holds more than buffer_tokens + one document."""
    docs = synth_docs([50] * 400 + [700] * 5)
    rows, counts = [], PackCounts()
    assembler = RowAssembler(128, PAD, lambda i, m, d: rows.extend(d), counts, batch_tokens=128)
    packer = BestFitPacker(128, assembler, buffer_tokens=1000)
    peak = 0
    for d in docs:
        packer.add(d)
        peak = max(peak, packer.size)
    packer.finish()
    assert peak <= 1000 + 700 and len(rows) > 100


def test_row_batches_are_written_in_pieces():
    docs = synth_docs(LENGTHS)
    whole, _ = pack("best-fit", docs, 16)
    pieces, _ = pack("best-fit", docs, 16, batch_tokens=16 * 3)
    assert len(whole) == len(pieces) and all((a[0] == b[0]).all() and a[1] == b[1] for a, b in zip(whole, pieces))
