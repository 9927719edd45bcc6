"""Strategies that turn token sequences into rows of exactly ``seq_len`` tokens.

A row is a list of segments ``(tokens, first_target)``: ``loss_mask`` is 1 from index
``first_target`` of the segment on, 0 before it. ``first_target >= 1`` always: a segment's
first token has no context in its row (positions restart per segment, DESIGN.md section 2), so
nothing predicts it. A row shorter than ``seq_len`` gets one trailing padding segment with
``loss_mask`` 0.

Every token that is not a target is counted under one cause (the tests check the sum):
``padding_tokens``, ``document_first_tokens`` (a document's first token, never a target),
``repeated_context_tokens`` (a token an earlier piece or window already trained on, repeated
as context) and ``lost_target_tokens`` (a document token that is never a target: the first
token of a concat piece that starts a row, or of a slide-window window when stride == seq_len).
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

Segment = tuple[np.ndarray, int]  # (tokens (n,), first_target)


@dataclass
class PackCounts:
    rows: int = 0
    segments: int = 0                 # document pieces (padding not included)
    document_tokens: int = 0          # tokens of document pieces placed in rows (overlaps counted again)
    padding_tokens: int = 0
    target_tokens: int = 0
    document_first_tokens: int = 0
    repeated_context_tokens: int = 0
    lost_target_tokens: int = 0
    documents_split: int = 0          # documents cut into more than one piece / window

    def as_dict(self) -> dict:
        d = asdict(self)
        d["non_target_tokens"] = self.padding_tokens + self.document_tokens - self.target_tokens
        return d


class RowAssembler:
    """Writes segments into (rows, seq_len) arrays and hands full batches to ``emit``.

    ``emit(input_ids (R, L) int32, loss_mask (R, L) uint8, doc_lens: list[list[int]])``.
    """

    def __init__(self, seq_len: int, pad_id: int, emit: Callable, counts: PackCounts, batch_tokens: int = 1 << 22):
        self.seq_len, self.pad_id, self.emit, self.counts = seq_len, pad_id, emit, counts
        self.batch_rows = max(1, batch_tokens // seq_len)
        self._new_batch()

    def _new_batch(self) -> None:
        self.ids = np.empty((self.batch_rows, self.seq_len), dtype=np.int32)
        self.mask = np.empty((self.batch_rows, self.seq_len), dtype=np.uint8)
        self.doc_lens: list[list[int]] = []

    def add_row(self, segments: list[Segment]) -> None:
        r, c = len(self.doc_lens), self.counts
        ids, mask, lens, offset = self.ids[r], self.mask[r], [], 0
        for tokens, first_target in segments:
            n = len(tokens)
            assert 1 <= first_target <= n and offset + n <= self.seq_len, (first_target, n, offset)
            ids[offset:offset + n] = tokens
            mask[offset:offset + first_target] = 0
            mask[offset + first_target:offset + n] = 1
            lens.append(n)
            c.segments += 1
            c.document_tokens += n
            c.target_tokens += n - first_target
            offset += n
        if offset < self.seq_len:  # trailing padding: its own segment, never a target
            ids[offset:] = self.pad_id
            mask[offset:] = 0
            lens.append(self.seq_len - offset)
            c.padding_tokens += self.seq_len - offset
        c.rows += 1
        self.doc_lens.append(lens)
        if len(self.doc_lens) == self.batch_rows:
            self.flush()

    def flush(self) -> None:
        r = len(self.doc_lens)
        if r:
            self.emit(self.ids[:r], self.mask[:r], self.doc_lens)
            self._new_batch()


class ConcatPacker:
    """Documents one after another, cut into rows; each piece keeps its own segment.

    A piece that continues a document at the start of a row loses the target of its first
    token (no context in the row): counted in ``lost_target_tokens``. The last row is padded.
    """

    def __init__(self, seq_len: int, rows: RowAssembler):
        self.seq_len, self.rows, self.counts = seq_len, rows, rows.counts
        self.current: list[Segment] = []
        self.fill = 0

    def add(self, tokens: np.ndarray) -> None:
        n, start = len(tokens), 0
        self.counts.document_first_tokens += 1
        self.counts.documents_split += n > self.seq_len - self.fill
        while start < n:
            take = min(n - start, self.seq_len - self.fill)
            self.counts.lost_target_tokens += start > 0
            self.current.append((tokens[start:start + take], 1))
            self.fill += take
            start += take
            if self.fill == self.seq_len:
                self.rows.add_row(self.current)
                self.current, self.fill = [], 0

    def finish(self) -> None:
        if self.current:
            self.rows.add_row(self.current)
            self.current, self.fill = [], 0
        self.rows.flush()


def slide_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target) of the windows over a document of ``n > seq_len`` tokens.

    Windows start at 0, stride, 2*stride, ...; the last window is right-aligned to end at the
    document's end (so it is full). In each window the tokens an earlier window already
    trained on are context only (``first_target`` = end of the previous window - start).
    With ``stride == seq_len`` consecutive windows do not overlap and the first token of a
    later window cannot be a target (``first_target`` is then 1 and that token is lost).
    """
    windows, prev_end, start = [(0, seq_len, 1)], seq_len, 0
    while prev_end < n:
        start = min(start + stride, n - seq_len)
        windows.append((start, start + seq_len, max(1, prev_end - start)))
        prev_end = start + seq_len
    return windows


class BestFitPacker:
    """Best-fit-decreasing packing (Ding et al. 2024, "Fewer Truncations Improve Language
    Modeling", arXiv:2404.10830) within a bounded buffer of documents.

    A document of up to ``seq_len`` tokens is never split. When the buffer holds
    ``buffer_tokens`` tokens, its short documents are packed best-fit-decreasing (longest
    first, each into the fullest row it fits). Documents longer than ``seq_len`` must be cut
    anyway, so they are cut to measure: their pieces first fill the room left in those rows,
    then fill rows of their own; consecutive pieces of a document overlap by one token (the
    piece's first token, context only), so every token but the document's first is a target
    exactly once. Rows still short by more than ``slack`` tokens go back to the buffer (at most
    half the buffer is carried) to be packed again with the next documents, so padding (only
    ever at the end of a row, as its own segment) is left for the end of the stream.
    """

    def __init__(self, seq_len: int, rows: RowAssembler, buffer_tokens: int, slack: int | None = None):
        self.seq_len, self.rows, self.counts = seq_len, rows, rows.counts
        self.buffer_tokens = max(buffer_tokens, 2 * seq_len)
        self.slack = max(1, seq_len // 1024) if slack is None else slack
        self.items: list[Segment] = []            # unsplittable: documents of <= seq_len tokens
        self.long: deque[list] = deque()  # [tokens, next start, started]: documents > seq_len
        self.size = 0

    def add(self, tokens: np.ndarray) -> None:
        self.counts.document_first_tokens += 1
        if len(tokens) <= self.seq_len:
            self.items.append((tokens, 1))
        else:
            self.counts.documents_split += 1
            self.long.append([tokens, 0, False])
        self.size += len(tokens)
        if self.size >= self.buffer_tokens:
            self._pack(final=False)

    def _long_remaining(self) -> int:
        return sum(len(t) - start for t, start, _ in self.long)

    def _fill(self, row: list[Segment], room: int) -> int:
        """Append pieces of long documents to ``row`` while at least 2 tokens of room are left
        (a piece needs a context token and a target); returns the room left."""
        while room >= 2 and self.long:
            doc = self.long[0]
            tokens, start, started = doc
            end = min(len(tokens), start + room)
            row.append((tokens[start:end], 1))
            # A piece after the first starts with the previous piece's last token (a target there).
            self.counts.repeated_context_tokens += start > 0 or started
            room -= end - start
            if end == len(tokens):
                self.long.popleft()
            else:
                doc[1] = end - 1  # the next piece starts with this piece's last token
        return room

    def _pack(self, final: bool) -> None:
        bins = [[self.items[i] for i in b] for b in best_fit_decreasing([len(t) for t, _ in self.items], self.seq_len)]
        rooms = [self._fill(b, self.seq_len - sum(len(t) for t, _ in b)) for b in bins]
        while self.long and (final or self._long_remaining() >= self.seq_len):
            bins.append([])
            rooms.append(self._fill(bins[-1], self.seq_len))
        # Short rows, emptiest first, go back to the buffer while the budget lasts.
        budget, carried = (0 if final else self.buffer_tokens // 2), set()
        for k in sorted(range(len(bins)), key=lambda k: (-rooms[k], k)):
            fill = self.seq_len - rooms[k]
            if rooms[k] <= self.slack or fill > budget:
                break
            carried.add(k)
            budget -= fill
        kept: list[Segment] = []
        for k, b in enumerate(bins):
            if k in carried:
                kept += b
            else:
                self.rows.add_row(b)
        if self.long and self.long[0][1]:  # keep only the rest of a cut document, not all of it
            tokens, start, _ = self.long[0]
            self.long[0] = [tokens[start:].copy(), 0, True]
        self.items = kept
        self.size = sum(len(t) for t, _ in kept) + self._long_remaining()

    def finish(self) -> None:
        if self.items or self.long:
            self._pack(final=True)
        self.rows.flush()


def best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped into bins of ``capacity``: items longest first (ties by
    index, for determinism), each into the bin with the least room that still fits it.

    Open bins are kept in a list sorted by (room, bin), so finding the best fit is a bisect.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        size = sizes[i]
        assert 0 < size <= capacity, (size, capacity)
        j = bisect.bisect_left(rooms, (size, -1))
        if j < len(rooms):
            room, b = rooms.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 0:
            bisect.insort(rooms, (room - size, b))
    return bins


class SlideWindowPacker:
    """Long documents become full windows (:func:`slide_windows`); documents of up to
    ``seq_len`` tokens are packed best-fit-decreasing (never split)."""

    def __init__(self, seq_len: int, stride: int, rows: RowAssembler, buffer_tokens: int):
        self.seq_len, self.stride, self.rows, self.counts = seq_len, stride, rows, rows.counts
        self.short = BestFitPacker(seq_len, rows, buffer_tokens)

    def add(self, tokens: np.ndarray) -> None:
        if len(tokens) <= self.seq_len:
            self.short.add(tokens)
            return
        c = self.counts
        c.document_first_tokens += 1
        c.documents_split += 1
        prev_end = 0
        for start, end, first_target in slide_windows(len(tokens), self.seq_len, self.stride):
            if start > 0:
                overlap = prev_end - start  # tokens already trained on (the window's first among them)
                c.repeated_context_tokens += overlap
                c.lost_target_tokens += overlap == 0
            self.rows.add_row([(tokens[start:end], first_target)])
            prev_end = end

    def finish(self) -> None:
        self.short.finish()


def make_packer(strategy: str, seq_len: int, rows: RowAssembler, stride: int | None, buffer_tokens: int):
    if strategy == "concat":
        return ConcatPacker(seq_len, rows)
    if strategy == "best-fit":
        return BestFitPacker(seq_len, rows, buffer_tokens)
    if strategy == "slide-window":
        return SlideWindowPacker(seq_len, stride, rows, buffer_tokens)
    raise ValueError(f"unknown strategy {strategy!r}")
