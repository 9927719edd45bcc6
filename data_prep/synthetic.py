"""Synthetic long-dependency documents: ``longtrain prepare --input 'synthetic:KIND?key=value&...'``.

Each document has a later part that can only be predicted from an earlier part a controlled number
of tokens back, so a model trained on them learns to use its context (Qwen2.5-1M and ProLong mix
such data into their long stages). Two kinds:

- ``copy``: a passage drawn from a real corpus (whole lines), filler lines from elsewhere in the
  corpus, then the same passage again, starting ``distance`` tokens after the first one
  (start-to-start); ``repeats`` copies in all after the first. With ``passage=words`` the passage is
  one line of random corpus words instead, so nothing in a repeat is predictable except by copying.
  A distance below the passage length is raised to it (copies never overlap), so ``max_distance=1``
  gives back-to-back repeats (a curriculum's first, easiest step: induction heads form much sooner on
  such documents).
- ``kv`` (RULER's multi-key needle, Hsieh et al. 2024): ``keys`` lines ``KEY = VALUE`` scattered
  through filler lines, KEY a word of :data:`KEY_WORDS`, VALUE ``value_digits`` random digits; the
  last line repeats one of them, so its VALUE is retrieved from ``distance`` tokens back (from the
  start of that needle line to the start of the last line). The other keys are distractors.

Options (``&``-separated after ``?``; lengths and distances are in tokens of ``--tokenizer``):

| option | default | meaning |
|---|---|---|
| ``docs`` | required | documents to generate |
| ``source`` | required | corpus of passages and filler: a file, folder or glob (read as ``--input`` reads it) |
| ``length`` | ``--seq-len`` minus BOS/EOS | most tokens per document (shorter documents are packed together) |
| ``min_distance``, ``max_distance`` | widest that fits | range of the dependency distance, drawn uniformly per document |
| ``min_passage``, ``max_passage`` | 8, ``length // 4`` | copy: passage length range |
| ``passage`` | ``lines`` | copy: ``lines`` (a corpus passage) or ``words`` (random corpus words) |
| ``repeats`` | 1 | copy: copies after the first, each ``distance`` after the previous (0: as many as fit) |
| ``keys`` | 4 | kv: key/value lines per document (one asked, the others distractors) |
| ``value_digits`` | 4 | kv: digits per value |
| ``seed`` | ``--seed`` | generator seed; document ``i`` depends only on (seed, the spec, i) |

A drawn distance that does not fit a document's other choices is clipped; with whole lines of filler
the realised distance is the closest a run of lines allows (within half a line of the draw).

Tokenizer safety: documents are made of whole lines, and every dependent part (the passage, a needle
line) starts after a newline, so it has the same ids each time it occurs, as long as the tokenizer
splits at newlines (``longtrain tokenizer``'s models do: ``\\n`` is a piece of its own). Every
document is checked: the ids of its text must equal the concatenation of its lines' ids, which makes
the repeated part token-identical to the original. A document that fails is drawn again (the next
attempt of the same seed); a tokenizer that keeps failing is refused with an error.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields
from typing import Callable, Iterator
from urllib.parse import parse_qsl

import numpy as np

from data_prep.errors import DataPrepError

PREFIX = "synthetic:"
KINDS = ("copy", "kv")
PASSAGE_MODES = ("lines", "words")
# Keys of the kv task: common English words (a document's keys are distinct).
KEY_WORDS = tuple("""
apple river stone cloud tiger garden window silver orange planet forest candle mirror rocket
pepper violin island castle dragon meadow ladder falcon button rabbit anchor circus copper
desert engine feather glacier hammer jacket kettle lemon magnet needle oyster parrot pillow
puzzle quartz saddle shadow spider tomato tunnel turtle velvet walnut wizard yellow zebra badger
bamboo barrel beacon blanket bridge bucket cactus camera carpet cherry cobalt cookie crystal
dolphin eagle ember fabric fossil galaxy ginger goblin harbor helmet hollow honey jungle kitten
lantern marble meteor monkey nectar nickel orchid otter paddle pebble pigeon pirate radish
raven ribbon saffron salmon sponge sultan thunder timber trumpet tulip umbrella valley wagon
""".split())
KV_LINE = "{key} = {value}"  # a needle line (without its newline); the document's last line asks one again
ATTEMPTS = 100  # draws of one document (tight lengths reject many) before giving up

EncodeBatch = Callable[[list[str]], list]  # texts -> ids of each (no BOS/EOS)


@dataclass(frozen=True)
class SyntheticSpec:
    """A parsed ``synthetic:KIND?...`` input (every option is in the module docstring)."""

    kind: str
    docs: int
    source: str
    length: int | None = None
    min_distance: int | None = None
    max_distance: int | None = None
    min_passage: int = 8
    max_passage: int | None = None
    passage: str = "lines"
    repeats: int = 1
    keys: int = 4
    value_digits: int = 4
    seed: int | None = None


def is_synthetic(path: str) -> bool:
    return path.startswith(PREFIX)


def parse_spec(text: str) -> SyntheticSpec:
    """``synthetic:copy?docs=100&source=DIR&max_distance=96`` -> :class:`SyntheticSpec`."""
    where = f"--input {text}"
    kind, _, query = text[len(PREFIX):].partition("?")
    if kind not in KINDS:
        raise DataPrepError(f"{where}: unknown synthetic kind {kind!r}; use one of {', '.join(KINDS)}, e.g. "
                            "'synthetic:copy?docs=1000&source=corpus/'")
    known = [f.name for f in fields(SyntheticSpec) if f.name != "kind"]
    values: dict = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise DataPrepError(f"{where}: options must be key=value pairs joined by '&'") from None
    for key, value in pairs:
        if key not in known:
            raise DataPrepError(f"{where}: unknown option {key!r}; options: {', '.join(known)}")
        if key in values:
            raise DataPrepError(f"{where}: option {key!r} given twice")
        if key in ("source", "passage"):
            values[key] = value
            continue
        try:
            values[key] = int(value)
        except ValueError:
            raise DataPrepError(f"{where}: {key}={value!r} must be an integer") from None
    for required in ("docs", "source"):
        if required not in values:
            raise DataPrepError(f"{where}: give {required}=... (docs: how many documents; source: the corpus of "
                                "passages and filler, a file, folder or glob)")
    spec = SyntheticSpec(kind=kind, **values)
    _check(spec, where)
    return spec


def _check(spec: SyntheticSpec, where: str) -> None:
    def bad(why: str):
        raise DataPrepError(f"{where}: {why}")

    if spec.docs < 1:
        bad(f"docs={spec.docs} must be at least 1")
    if spec.passage not in PASSAGE_MODES:
        bad(f"passage={spec.passage!r} must be one of {', '.join(PASSAGE_MODES)}")
    for name in ("length", "min_distance", "max_distance", "max_passage", "min_passage"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            bad(f"{name}={value} must be at least 1")
    if spec.max_passage is not None and spec.max_passage < spec.min_passage:
        bad(f"max_passage={spec.max_passage} is below min_passage={spec.min_passage}")
    if spec.min_distance and spec.max_distance and spec.min_distance > spec.max_distance:
        bad(f"min_distance={spec.min_distance} is above max_distance={spec.max_distance}")
    if spec.repeats < 0:
        bad(f"repeats={spec.repeats} must be 0 (as many as fit) or more")
    if not 1 <= spec.keys <= len(KEY_WORDS):
        bad(f"keys={spec.keys} must be between 1 and {len(KEY_WORDS)}")
    if not 1 <= spec.value_digits <= 12:
        bad(f"value_digits={spec.value_digits} must be between 1 and 12")


# ------------------------------------------------------------------------------------------- tokens
def line_ids(encode_batch: EncodeBatch, lines: list[str]) -> list[list[int]]:
    """Ids of each line as it tokenizes after a newline (ids of ``"\\n" + line`` minus those of
    ``"\\n"``): its ids inside a document, where only the first line gets the dummy prefix."""
    head = [int(i) for i in encode_batch(["\n"])[0]]
    out = []
    for line, ids in zip(lines, encode_batch(["\n" + line for line in lines])):
        ids = [int(i) for i in ids]
        if ids[:len(head)] != head:
            raise DataPrepError(f"synthetic data: the tokenizer does not split at newlines (the ids of '\\n' + "
                                f"{line[:40]!r} do not start with those of '\\n'); synthetic documents need a "
                                "tokenizer whose newline is a piece of its own (longtrain tokenizer's are)")
        out.append(ids[len(head):])
    return out


class Corpus:
    """A source's lines (each ending in a newline) with their ids after a newline, and its words."""

    def __init__(self, texts: list[str], encode_batch: EncodeBatch, where: str):
        self.encode_batch = encode_batch
        self.lines = [line + "\n" for text in texts for line in text.split("\n")]
        if len(self.lines) < 100:
            raise DataPrepError(f"{where}: the source has {len(self.lines)} lines; synthetic documents need a "
                                "corpus of at least a few hundred lines")
        self.ids = line_ids(encode_batch, self.lines)
        self.lens = np.array([len(i) for i in self.ids], dtype=np.int64)
        self.words = sorted({w for t in texts for w in re.findall(r"\b[A-Za-z_][A-Za-z_0-9]{2,15}\b", t)})
        self.newline = line_ids(encode_batch, ["\n"])[0]  # ids of an empty line: the newline
        # The shortest line with text: a document's first line when its random lead came out empty.
        self.short_line = min((i for i, line in enumerate(self.lines) if line.strip()), key=lambda i: self.lens[i])


def read_corpus(source_path: str, encode_batch: EncodeBatch, where: str) -> Corpus:
    from data_prep.sources import InputSpec, ReadOptions, iter_documents, resolve_source

    try:
        source = resolve_source(InputSpec(source_path), 0)
    except DataPrepError as exc:
        raise DataPrepError(f"{where}: source={source_path}: {exc}") from None
    texts = [raw.text for raw in iter_documents(source, ReadOptions()) if raw.text is not None and raw.bad is None]
    if not texts:
        raise DataPrepError(f"{where}: source={source_path} holds no readable text document")
    return Corpus(texts, encode_batch, where)


# ------------------------------------------------------------------------------------------- documents
@dataclass
class SyntheticDoc:
    """A document's text and, in the ids of that text (no BOS), the span ``(start, end)`` of the
    part depended on and of the dependent part (copy: the passage and its repeat; kv: the asked
    needle line and the last line that asks it again)."""

    text: str
    source_span: tuple[int, int]
    dependent_span: tuple[int, int]
    answer_span: tuple[int, int]  # the ids only the dependency predicts (copy: the repeat; kv: the value)

    @property
    def distance(self) -> int:
        return self.dependent_span[0] - self.source_span[0]


@dataclass
class _Draft:
    segments: list[str]        # texts, each a run of whole lines
    ids: list[list[int]]       # ids of each segment after a newline
    source: int                # index of the segment depended on
    dependent: int             # index of the dependent segment
    answer_tokens: int
    copies: list[int] | None = None  # copy: every copy's segment (all must have the same ids)


class Generator:
    """Documents of one spec over one corpus; ``doc(i)`` depends only on (seed, spec, i)."""

    def __init__(self, spec: SyntheticSpec, corpus: Corpus, doc_tokens: int, seed: int, where: str = "synthetic"):
        length = spec.length or doc_tokens
        if length > doc_tokens:
            raise DataPrepError(f"{where}: length={length} exceeds --seq-len minus BOS/EOS ({doc_tokens}): documents "
                                "would be split across rows and lose their dependency; lower length")
        if length < 16:
            raise DataPrepError(f"{where}: length={length} is too short for a synthetic document (at least 16)")
        self.spec, self.corpus, self.length = spec, corpus, length
        seed = spec.seed if spec.seed is not None else seed
        digest = hashlib.blake2b(repr(spec).encode(), digest_size=8).digest()
        self.key = [seed, int.from_bytes(digest, "big")]

    # -- pieces ------------------------------------------------------------------------------
    def _filler(self, rng, tokens: int, at_most: bool = False) -> list[int]:
        """Consecutive corpus lines from a random place whose ids number closest to ``tokens``
        (``at_most``: not more than ``tokens``)."""
        lens, out, total = self.corpus.lens, [], 0
        i = int(rng.integers(0, len(lens)))
        while total < tokens:
            n = int(lens[i])
            over = total + n - tokens
            if over > 0 and (at_most or over > tokens - total):  # overshoots more than stopping undershoots
                break
            out.append(i)
            total += n
            i = (i + 1) % len(lens)
        return out

    def _lines(self, idx: list[int]) -> tuple[list[str], list[list[int]]]:
        return [self.corpus.lines[i] for i in idx], [self.corpus.ids[i] for i in idx]

    def _lines_passage(self, rng, lo: int, hi: int):
        """Consecutive lines holding lo..hi ids, at least half of them not blank."""
        lens, lines = self.corpus.lens, self.corpus.lines
        for _ in range(100):
            i = int(rng.integers(0, len(lens)))
            idx, total = [], 0
            while total < lo and i < len(lens) and total + lens[i] <= hi:
                idx.append(i)
                total += int(lens[i])
                i += 1
            if lo <= total <= hi and 2 * sum(lines[j] != "\n" for j in idx) >= len(idx):
                texts, ids = self._lines(idx)
                return "".join(texts), [t for part in ids for t in part]
        return None

    def _word_ids(self, word: str, first: bool) -> list[int]:
        """Ids of ``word`` at the start of a line or, after a space, inside one (cached; the
        document check confirms that words tokenize independently of their neighbours)."""
        cache = self.__dict__.setdefault("_word_cache", {})
        if (word, first) not in cache:
            enc = self.corpus.encode_batch
            if first:
                cache[word, first] = line_ids(enc, [word])[0]
            else:
                x, xw = line_ids(enc, ["x", "x " + word])
                cache[word, first] = xw[len(x):] if xw[:len(x)] == x else xw
        return cache[word, first]

    def _words_passage(self, rng, lo: int, hi: int):
        """One line of random corpus words holding lo..hi ids (the newline included)."""
        words, newline = self.corpus.words, self.corpus.newline
        target = int(rng.integers(lo, hi + 1))
        picked, ids = [], []
        while len(ids) + len(newline) < target:
            w = words[int(rng.integers(0, len(words)))]
            more = self._word_ids(w, first=not picked)
            if len(ids) + len(more) + len(newline) > hi:
                break
            picked.append(w)
            ids += more
        if not picked or len(ids) + len(newline) < lo:
            return None
        return " ".join(picked) + "\n", ids + newline

    # -- kinds -------------------------------------------------------------------------------
    def _copy(self, rng) -> _Draft | None:
        spec, length = self.spec, self.length
        hi_p = min(spec.max_passage or length // 4, length // 3)
        lo_p = min(spec.min_passage, hi_p)
        made = (self._words_passage if spec.passage == "words" else self._lines_passage)(rng, lo_p, hi_p)
        if made is None:
            return None
        text, ids = made
        p = len(ids)
        lead_min = 1  # a line before the passage: the document's first line tokenizes differently (dummy prefix)
        room = length - p - lead_min  # for the copies after the first, each `distance` after the previous
        cap = room // max(spec.repeats, 1)
        if cap < p:
            return None
        hi_d = min(max(spec.max_distance or length, p), cap)  # raised to p: copies never overlap
        lo_d = min(max(spec.min_distance or p, p), hi_d)
        distance = int(rng.integers(lo_d, hi_d + 1))
        repeats = spec.repeats or room // distance
        segments, ids_list, copies = [], [], []
        for r in range(repeats + 1):
            if r:
                gap_t, gap_i = self._lines(self._filler(rng, distance - p))
                segments += gap_t
                ids_list += gap_i
            copies.append(len(segments))
            segments.append(text)
            ids_list.append(ids)
        used = sum(map(len, ids_list))
        if used + lead_min > length:
            return None
        lead = self._filler(rng, int(rng.integers(lead_min, length - used + 1)), at_most=True)
        lead_t, lead_i = self._lines(lead or [self.corpus.short_line])
        copies = [len(lead_t) + c for c in copies]
        return _Draft(lead_t + segments, lead_i + ids_list, copies[0], copies[1], 0, copies)

    def _kv(self, rng) -> _Draft | None:
        spec, length, corpus = self.spec, self.length, self.corpus
        keys = [KEY_WORDS[int(k)] for k in rng.choice(len(KEY_WORDS), spec.keys, replace=False)]
        values = ["".join(str(int(d)) for d in rng.integers(0, 10, spec.value_digits)) for _ in keys]
        needles = [KV_LINE.format(key=k, value=v) + "\n" for k, v in zip(keys, values)]
        needle_ids = line_ids(corpus.encode_batch, needles)
        # The value's ids: what follows the ids of the line cut just before the value.
        asked = line_ids(corpus.encode_batch, [KV_LINE.format(key=keys[0], value="")])[0]
        if needle_ids[0][:len(asked)] != asked:
            return None
        answer = len(needle_ids[0]) - len(corpus.newline) - len(asked)
        inside = [j for j in range(1, spec.keys) if rng.random() < 0.5]  # distractors between needle and question
        outside = [j for j in range(1, spec.keys) if j not in inside]
        n_q = len(needle_ids[0])
        t_in = sum(len(needle_ids[j]) for j in inside)
        t_out = sum(len(needle_ids[j]) for j in outside)
        lead_min = 1  # a filler line first: the document's first line tokenizes differently (dummy prefix)
        hi_d = min(spec.max_distance or length, length - n_q - lead_min - t_out)
        lo_d = min(max(spec.min_distance or 0, n_q + t_in), hi_d)
        if hi_d < n_q + t_in:
            return None
        distance = int(rng.integers(lo_d, hi_d + 1))
        gap_t, gap_i = self._lines(self._filler(rng, distance - n_q - t_in))
        lead = self._filler(rng, int(rng.integers(lead_min, max(lead_min, length - n_q - distance - t_out) + 1)),
                            at_most=True)
        lead_t, lead_i = self._lines(lead or [corpus.short_line])
        for j in range(1, spec.keys):  # each distractor at a random line boundary of its part
            t_list, i_list, lo = (gap_t, gap_i, 0) if j in inside else (lead_t, lead_i, 1)
            at = int(rng.integers(lo, len(t_list) + 1))
            t_list.insert(at, needles[j])
            i_list.insert(at, needle_ids[j])
        segments = lead_t + [needles[0]] + gap_t + [needles[0]]
        ids = lead_i + [needle_ids[0]] + gap_i + [needle_ids[0]]
        return _Draft(segments, ids, len(lead_t), len(segments) - 1, answer)

    # -- documents ---------------------------------------------------------------------------
    def doc(self, i: int) -> SyntheticDoc:
        """Document ``i``: drawn, checked against the tokenizer, drawn again if the check fails."""
        make = self._copy if self.spec.kind == "copy" else self._kv
        for attempt in range(ATTEMPTS):
            rng = np.random.default_rng(self.key + [i, attempt])
            draft = make(rng)
            if draft is None:
                continue
            doc = self._checked(draft)
            if doc is not None:
                return doc
        raise DataPrepError(f"synthetic:{self.spec.kind}: document {i} failed {ATTEMPTS} draws: either the "
                            "tokenizer does not give lines the same ids inside a document as alone (it must split "
                            "at newlines), or length / distances / passage sizes leave no room; widen them")

    def _checked(self, d: _Draft) -> SyntheticDoc | None:
        """The document if it fits ``length`` and its text's ids are its segments' ids (the first
        segment, one filler line, with the dummy prefix); else None (drawn again)."""
        if d.segments[0].count("\n") != 1:
            return None
        text = "".join(d.segments)
        head = [int(t) for t in self.corpus.encode_batch([d.segments[0]])[0]]  # with the dummy prefix
        expected = head + [t for seg in d.ids[1:] for t in seg]
        got = [int(t) for t in self.corpus.encode_batch([text])[0]]
        if got != expected or len(got) > self.length:
            return None
        starts = np.cumsum([0, len(head)] + [len(s) for s in d.ids[1:]])
        src = (int(starts[d.source]), int(starts[d.source + 1]))
        dep = (int(starts[d.dependent]), int(starts[d.dependent + 1]))
        for seg in d.copies or [d.dependent]:
            if got[starts[seg]:starts[seg + 1]] != got[src[0]:src[1]]:
                return None
        if d.answer_tokens:  # kv: the value's ids, just before the line's newline
            end = dep[1] - len(self.corpus.newline)
            answer = (end - d.answer_tokens, end)
        else:
            answer = dep
        return SyntheticDoc(text, src, dep, answer)

    def __iter__(self) -> Iterator[SyntheticDoc]:
        return (self.doc(i) for i in range(self.spec.docs))


def generator(spec: SyntheticSpec, encode_batch: EncodeBatch, doc_tokens: int, seed: int, where: str) -> Generator:
    """The generator of one ``--input synthetic:...``, for documents of at most ``doc_tokens`` ids
    (``--seq-len`` minus BOS/EOS); reads and tokenizes the spec's source corpus."""
    return Generator(spec, read_corpus(spec.source, encode_batch, where), doc_tokens, seed, where)


def iter_synthetic(path: str, opts) -> Iterator:
    """The documents of ``--input synthetic:...`` as :class:`data_prep.sources.RawDoc` (for prepare)."""
    from data_prep.sources import RawDoc

    where = f"--input {path}"
    if opts.tokenizer is None or opts.doc_tokens is None:
        raise DataPrepError(f"{where}: synthetic inputs are measured in tokens; use them with longtrain prepare "
                            "(not to train a tokenizer)")
    tok = opts.tokenizer
    gen = generator(parse_spec(path), lambda texts: tok.encode_batch(texts, False, False), opts.doc_tokens,
                    opts.seed, where)
    for i, doc in enumerate(gen):
        yield RawDoc(doc.text, f"{path} document {i}", None, len(doc.text))
