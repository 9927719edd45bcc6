"""Input sources: parse ``PATH[:WEIGHT]``, find the files, and stream documents out of them.

Kinds, detected from the path:
- ``*.jsonl`` / ``*.ndjson``: one JSON object per line, text in ``--text-field``;
- ``*.parquet``: one row per document, text in the ``--text-field`` column;
- a folder written by ``datasets``' ``save_to_disk`` (it holds ``state.json``): one row per document;
- any other file: plain text, the whole file is one document (read as Python's ``open()`` reads
  text: UTF-8, a byte order mark dropped, ``\r\n`` and ``\r`` line endings turned into ``\n``);
- JSONL and text files may be compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``; data_prep/compression.py):
  the kind is that of the name without the compression suffix, and they stream decompressed;
- a folder, or a path with a glob (``DIR/**/*.py``): every matching file, each read by its own
  kind above; a plain folder means ``DIR/**/*``. Hidden files and folders (name starting with
  ``.``) are left out and counted. Files are read in sorted order, so the output is deterministic;
- ``synthetic:KIND?options``: generated long-dependency documents (``data_prep/synthetic.py``).

Readers never raise on a bad document: they yield a :class:`RawDoc` carrying a
:class:`BadDocument`, and the caller stops or skips (``--skip-bad``) and counts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_prep.compression import (CHECKSUM_SCOPE, DECODE_ERRORS, SUPPORTED_TEXT, InputStream, NotCompressedAsNamed,
                                   UnsupportedCompression, split_suffix)
from data_prep.errors import REASONS, BadDocument, DataPrepError

_GLOB_CHARS = set("*?[")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")  # after any compression suffix is taken off
_BINARY_PROBE = 8192  # bytes looked at for a NUL byte (what git and grep do to call a file binary)


@dataclass(frozen=True)
class InputSpec:
    path: str
    weight: float = 1.0


def parse_input_spec(spec: str, option: str = "--input") -> InputSpec:
    """``PATH`` or ``PATH:WEIGHT`` (WEIGHT a positive number). A path that itself exists wins,
    so a file whose name ends in ``:2`` can still be read. ``option`` names the flag in errors."""
    if ":" in spec and not Path(spec).exists():
        path, tail = spec.rsplit(":", 1)
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        if weight is None:
            if Path(path).expanduser().exists() or _split_glob(path) is not None:
                raise DataPrepError(f"{option} {spec}: the weight {tail!r} after the last ':' is not a number; "
                                    f"write PATH:WEIGHT with a positive number, e.g. {path}:0.5")
            return InputSpec(spec, 1.0)  # neither reading exists: resolve_source says so
        if not (math.isfinite(weight) and weight > 0):
            raise DataPrepError(f"{option} {spec}: the weight must be a positive number (2.0 = every "
                                "document twice, 0.5 = half of the tokens)")
        return InputSpec(path, weight)
    return InputSpec(spec, 1.0)


@dataclass
class Source:
    """One ``--input``: what it is, which files it covers, and how many bytes (for the ETA)."""

    index: int
    spec: InputSpec
    kind: str  # "jsonl", "parquet", "text" (one file), "datasets" (a save_to_disk folder), "glob", "synthetic"
    files: list[Path]
    total_bytes: int
    hidden_ignored: int = 0

    @property
    def name(self) -> str:
        return self.spec.path


@dataclass
class RawDoc:
    text: str | None
    where: str          # "file:line" / "file row N" / "file", for messages
    doc_id: str | None  # from --id-field when given
    nbytes: int         # input bytes this document accounts for (progress bar)
    bad: BadDocument | None = None


@dataclass
class ReadOptions:
    text_field: str = "text"
    id_field: str | None = None
    max_doc_bytes: int = 64 << 20
    # Synthetic inputs only (set by prepare): documents are measured in the tokenizer's ids.
    tokenizer: object | None = None  # data_prep.tokenizer.Tokenizer
    doc_tokens: int | None = None    # --seq-len minus the BOS/EOS prepare adds
    seed: int = 0


def _split_glob(path: str) -> tuple[Path, str] | None:
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return Path(*parts[:i]) if i else Path("."), "/".join(parts[i:])
    return None


def _is_datasets_folder(p: Path) -> bool:
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def resolve_source(spec: InputSpec, index: int, option: str = "--input") -> Source:
    """Find the files of one input, or raise a :class:`DataPrepError` saying what is missing
    (``option``: the flag the path came from, as the messages name it)."""
    where = f"{option} {spec.path}"
    if spec.path.startswith("synthetic:"):
        from data_prep.synthetic import parse_spec  # here: synthetic imports this module (a cycle)

        parsed = parse_spec(spec.path)  # errors name the option; the corpus is read when generating
        return Source(index, spec, "synthetic", [], parsed.docs * 256)  # bytes: a rough figure for the ETA
    split = _split_glob(spec.path)
    p = Path(spec.path).expanduser()
    if split is None and p.is_file():
        return Source(index, spec, _file_kind(p), [p], p.stat().st_size)
    if split is None and p.is_dir():
        if _is_datasets_folder(p):
            files = sorted(p.glob("*.arrow"))
            return Source(index, spec, "datasets", [p], sum(f.stat().st_size for f in files))
        if (p / "dataset_dict.json").is_file():
            splits = sorted(d.name for d in p.iterdir() if d.is_dir() and _is_datasets_folder(d))
            raise DataPrepError(f"{where}: this is a datasets DatasetDict with splits {splits}; "
                                f"pass one split's folder, e.g. {option} {p / (splits[0] if splits else 'train')}")
        split = (p, "**/*")
    if split is None:
        weight_hint = " (a weight after ':' must be a number)" if ":" in Path(spec.path).name else ""
        raise DataPrepError(f"{where}: no such file or folder{weight_hint}; check the path (globs: quote "
                            f"them, e.g. {option} 'src/**/*.py')")
    root, pattern = split
    root = root.expanduser()
    if not root.is_dir():
        raise DataPrepError(f"{where}: folder {root} does not exist")
    files, hidden = [], 0
    for f in sorted(root.glob(pattern)):
        if not f.is_file():
            continue
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            hidden += 1
            continue
        files.append(f)
    if not files:
        raise DataPrepError(f"{where}: the glob '{pattern}' under {root} matches no file"
                            + (f" ({hidden} hidden files left out)" if hidden else "")
                            + "; check the pattern (e.g. 'src/**/*.py' for every .py file below src/)")
    return Source(index, spec, "glob", files, sum(f.stat().st_size for f in files), hidden)


def _bad(reason: str, where: str, detail: str, nbytes: int = 0) -> RawDoc:
    return RawDoc(None, where, None, nbytes, BadDocument(reason, where, detail, REASONS[reason]))


def _check_text(text, where: str, nbytes: int, doc_id, opts: ReadOptions) -> RawDoc:
    if text is None:
        return _bad("missing_text_field", where, f"the field '{opts.text_field}' is missing or null", nbytes)
    if not isinstance(text, str):
        return _bad("text_not_string", where, f"the field '{opts.text_field}' holds a {type(text).__name__}", nbytes)
    if not text.strip():
        return _bad("empty", where, "empty document (no text, or only whitespace)", nbytes)
    if len(text) > opts.max_doc_bytes:
        return _bad("too_large", where, f"document of {len(text)} characters exceeds --max-doc-bytes "
                    f"{opts.max_doc_bytes}", nbytes)
    return RawDoc(text, where, None if doc_id is None else str(doc_id), nbytes)


def _open_input(path: Path, must_be_text: bool) -> InputStream | RawDoc:
    """The decompressed stream of ``path``, or a bad document saying why it cannot be read."""
    try:
        return InputStream(path, sniff_unsupported=must_be_text)
    except UnsupportedCompression as exc:
        return _bad("unsupported_compression", str(path), f"compressed with {exc.name}, which prepare cannot "
                    f"read (supported: {SUPPORTED_TEXT})", path.stat().st_size)
    except NotCompressedAsNamed as exc:
        return _bad("damaged_input", str(path), str(exc), path.stat().st_size)


def _damaged(stream: InputStream, exc: BaseException, where: str, kept: str, consumed: int) -> RawDoc:
    """The rest of a stream that fails to decode, as one bad document (what was read before it is kept)."""
    return _bad("damaged_input", where, f"{stream.describe(exc)}; {kept}", stream.size - consumed)


def _read_jsonl(path: Path, opts: ReadOptions) -> Iterator[RawDoc]:
    stream = _open_input(path, must_be_text=True)
    if isinstance(stream, RawDoc):
        yield stream
        return
    limit = opts.max_doc_bytes
    lineno = offset = consumed = 0  # lines and decompressed bytes of whole lines; file bytes reported
    with stream:
        f = stream.file
        try:
            while line := f.readline(limit + 1):  # bounded: a huge line never lands in memory whole
                lineno += 1
                where = f"{path}:{lineno}"
                size, too_large = len(line), len(line) > limit and not line.endswith(b"\n")
                if too_large:
                    while chunk := f.readline(1 << 20):  # skip the rest of the line
                        size += len(chunk)
                        if chunk.endswith(b"\n"):
                            break
                offset += size
                nbytes, consumed = stream.progress() - consumed, stream.progress()
                if too_large:
                    yield _bad("too_large", where, f"line of {size} bytes exceeds --max-doc-bytes {limit}", nbytes)
                else:
                    yield _parse_jsonl_line(line, where, lineno, opts, nbytes)
        except DECODE_ERRORS as exc:
            kept = (f"the {lineno:,} whole lines before it (up to decompressed byte {offset:,}) are read, the rest "
                    "of the file is not")
            if stream.format and not isinstance(exc, EOFError):  # found at the next checksum, not where it is
                kept += (f"; lines decoded after the damage and before its checksum ({stream.format} checks "
                         f"{CHECKSUM_SCOPE[stream.format]}) may be garbled, so replace the file "
                         "rather than skip")
            yield _damaged(stream, exc, f"{path}:{lineno + 1}", kept, consumed)


def _parse_jsonl_line(line: bytes, where: str, lineno: int, opts: ReadOptions, nbytes: int) -> RawDoc:
    if not line.strip():
        return RawDoc(None, where, None, nbytes)  # blank line: not a document (counted by the caller)
    try:
        decoded = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return _bad("not_utf8", where, f"invalid UTF-8 byte at column {exc.start + 1}", nbytes)
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return _bad("invalid_json", where, f"invalid JSON ({exc.msg} at column {exc.colno})", nbytes)
    if not isinstance(obj, dict):
        return _bad("not_an_object", where, f"the line holds a JSON {type(obj).__name__}, not an object", nbytes)
    if opts.text_field not in obj:
        keys = ", ".join(sorted(obj)[:10])
        return _bad("missing_text_field", where, f"no field '{opts.text_field}' (fields: {keys})", nbytes)
    text = obj[opts.text_field]
    if isinstance(text, str) and b"\\ud" in line.lower():
        try:  # JSON may escape lone UTF-16 surrogates that no UTF-8 text can hold
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _bad("not_utf8", where, "the text holds a lone surrogate escape (\\udXXX)", nbytes)
    return _check_text(text, where, nbytes, obj.get(opts.id_field) if opts.id_field else None, opts)


def _read_text_file(path: Path, opts: ReadOptions) -> Iterator[RawDoc]:
    where = str(path)
    size = path.stat().st_size
    stream = _open_input(path, must_be_text=False)
    if isinstance(stream, RawDoc):
        yield stream
        return
    with stream:
        if stream.format is None and size > opts.max_doc_bytes:
            yield _bad("too_large", where, f"file of {size} bytes exceeds --max-doc-bytes {opts.max_doc_bytes}", size)
            return
        try:
            data = stream.file.read(opts.max_doc_bytes + 1)
        except DECODE_ERRORS as exc:  # a text file is one document: all of it is lost
            yield _damaged(stream, exc, where, "the file is one document, so none of it is read", 0)
            return
    if len(data) > opts.max_doc_bytes:
        yield _bad("too_large", where, f"file exceeds --max-doc-bytes {opts.max_doc_bytes}", size)
        return
    if b"\x00" in data[:_BINARY_PROBE]:
        yield _bad("binary_file", where, "binary file (NUL byte in its first 8 KiB)", size)
        return
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte order mark is not text
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        yield _bad("not_utf8", f"{where}:{line}", f"invalid UTF-8 byte at byte offset {exc.start}", size)
        return
    # Line endings as Python's open() reads text (universal newlines), as HF's text loader does.
    yield _check_text(text.replace("\r\n", "\n").replace("\r", "\n"), where, size, None, opts)


def _check_columns(names: list[str], where: str, opts: ReadOptions) -> list[str]:
    wanted = [opts.text_field] + ([opts.id_field] if opts.id_field else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataPrepError(f"{where}: no column {missing[0]!r} (columns: {', '.join(names[:20])}); "
                            "choose it with --text-field / --id-field")
    return wanted


def _rows(batches, where: str, opts: ReadOptions, bytes_per_row: float) -> Iterator[RawDoc]:
    row = 0
    for batch in batches:  # batch: {column: list}
        texts = batch[opts.text_field]
        ids = batch[opts.id_field] if opts.id_field else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            yield _check_text(text, f"{where} row {row}", round(bytes_per_row), doc_id, opts)
            row += 1


def _read_parquet(path: Path, opts: ReadOptions) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataPrepError(f"{path}: not a readable Parquet file ({exc})") from None
    columns = _check_columns(pf.schema_arrow.names, str(path), opts)
    per_row = path.stat().st_size / max(1, pf.metadata.num_rows)
    batches = (b.to_pydict() for b in pf.iter_batches(batch_size=1024, columns=columns))
    yield from _rows(batches, str(path), opts, per_row)


def _read_datasets_folder(path: Path, opts: ReadOptions) -> Iterator[RawDoc]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    columns = _check_columns(list(ds.column_names), str(path), opts)
    size = sum(f.stat().st_size for f in path.glob("*.arrow"))
    ds = ds.select_columns(columns)
    yield from _rows(ds.iter(batch_size=1024), str(path), opts, size / max(1, len(ds)))


def _file_kind(path: Path) -> str:
    name, compressed = split_suffix(path.name.lower())
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") and not compressed else "text"


def _read_file(path: Path, opts: ReadOptions) -> Iterator[RawDoc]:
    kind = _file_kind(path)
    if kind == "jsonl":
        return _read_jsonl(path, opts)
    return _read_parquet(path, opts) if kind == "parquet" else _read_text_file(path, opts)


def iter_documents(source: Source, opts: ReadOptions) -> Iterator[RawDoc]:
    """Every document of ``source`` in a fixed order (bad ones carry ``.bad``; blank JSONL lines
    come back with ``text=None`` and ``bad=None``)."""
    if source.kind == "synthetic":
        from data_prep.synthetic import iter_synthetic  # here: synthetic imports this module (a cycle)

        yield from iter_synthetic(source.spec.path, opts)
        return
    if source.kind == "datasets":
        yield from _read_datasets_folder(source.files[0], opts)
        return
    for path in source.files:
        yield from _read_file(path, opts)


def good_documents(source: Source, opts: ReadOptions, skip_bad: bool, skipped: dict) -> Iterator[RawDoc]:
    """The readable documents of ``source``, in order, with the bad-document rule of every command
    that reads text (``longtrain tokenizer`` and ``eval``; ``prepare`` keeps its own loop, which also
    numbers documents for its split): a bad one raises its :class:`BadDocument` (file, line, reason,
    what to do), or with ``skip_bad`` is counted in ``skipped[reason]`` and left out. Blank JSONL
    lines are no documents and are left out silently."""
    for raw in iter_documents(source, opts):
        if raw.bad is not None:
            if not skip_bad:
                raise raw.bad
            skipped[raw.bad.reason] = skipped.get(raw.bad.reason, 0) + 1
        elif raw.text is not None:
            yield raw


@dataclass
class SourceStats:
    """Per-source counts for meta.json."""

    index: int
    path: str
    kind: str
    weight: float
    files: int
    hidden_files_ignored: int
    documents_read: int = 0
    blank_lines: int = 0
    skipped: dict = field(default_factory=dict)
    filtered: dict = field(default_factory=dict)
    documents_train: int = 0
    documents_validation: int = 0
    tokens_train_in: int = 0    # tokens of this source's training documents, before weighting
    tokens_train_out: int = 0   # tokens it contributed to training rows after weighting
    tokens_validation: int = 0
    documents_cut_by_weight: int = 0  # emitted as a prefix to hit the weight exactly (mixture.py)
