"""``prepare(config)``: corpora -> a prepared dataset folder (DESIGN.md section 2).

The flow, one document at a time (memory bounded by the packing buffer and the shards):
read (sources.py) -> stop or skip bad documents -> tokenize (encode.py, optionally in worker
processes) -> length filters -> validation split by document (mixture.py) -> per-source
weights on the training documents (mixture.py) -> strategy (packing.py) -> Arrow shards
(writer.py). Everything is written into a hidden temporary folder beside ``--out`` and renamed
into place at the end, so a folder named ``--out`` is always complete.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep import __version__
from data_prep.encode import Encoder
from data_prep.errors import BadDocument, DataPrepError
from data_prep.integrity import FILES_KEY, record_files
from data_prep.mixture import WeightSampler, is_validation
from data_prep.packing import PackCounts, RowAssembler, make_packer
from data_prep.sources import InputSpec, ReadOptions, SourceStats, iter_documents, resolve_source
from data_prep.stats import LengthHistogram, summary_lines, write_stats_png
from data_prep.tokenizer import Tokenizer
from data_prep.writer import SplitWriter

FORMAT_VERSION = 1
STRATEGIES = ("concat", "best-fit", "slide-window")
TAIL_RULE = ("the last window of a document is right-aligned to end at the document's end, so every "
             "window is full; its tokens that an earlier window already trained on have loss_mask 0")


@dataclass
class PrepareConfig:
    """Options of ``longtrain prepare`` (the CLI flags, with ``-`` as ``_``)."""

    inputs: list[InputSpec]
    tokenizer: str
    seq_len: int
    out: str
    strategy: str = "best-fit"
    stride: int | None = None            # slide-window only; default seq_len // 2
    val_fraction: float = 0.0
    seed: int = 0
    num_proc: int = 1
    skip_bad: bool = False
    overwrite: bool = False
    text_field: str = "text"
    id_field: str | None = None
    add_bos: bool | None = None          # None: add BOS when the tokenizer has one
    add_eos: bool = True
    min_tokens: int | None = None
    max_tokens: int | None = None
    truncate_long: bool = False          # with max_tokens: truncate instead of filtering out
    max_doc_bytes: int = 64 << 20
    pack_buffer_tokens: int | None = None  # default max(2**20, 16 * seq_len)
    plot: bool = True
    progress: bool = True
    batch_chars: int = 1 << 20           # characters per tokenization batch

    def __post_init__(self):
        def bad(option: str, why: str):
            raise DataPrepError(f"{option}: {why}")

        if not self.inputs:
            bad("--input", "give at least one input (a file, folder, glob or datasets folder)")
        if self.strategy not in STRATEGIES:
            bad("--strategy", f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            bad("--seq-len", f"{self.seq_len} is too small: a row needs at least 2 tokens (one input, one target)")
        if self.strategy == "slide-window":
            if self.stride is None:
                self.stride = max(1, self.seq_len // 2)
            if not 1 <= self.stride <= self.seq_len:
                bad("--stride", f"{self.stride} must be between 1 and --seq-len ({self.seq_len}); "
                                "windows start every stride tokens")
        elif self.stride is not None:
            bad("--stride", "only applies to --strategy slide-window")
        if not 0.0 <= self.val_fraction < 1.0:
            bad("--val-fraction", f"{self.val_fraction} must be in [0, 1)")
        if self.num_proc < 1:
            bad("--num-proc", f"{self.num_proc} must be at least 1")
        for name in ("min_tokens", "max_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(f"--{name.replace('_', '-')}", f"{v} must be at least 1")
        if self.min_tokens and self.max_tokens and self.min_tokens > self.max_tokens:
            bad("--min-tokens", f"{self.min_tokens} is larger than --max-tokens {self.max_tokens}")
        if self.truncate_long and not self.max_tokens:
            bad("--truncate-long", "needs --max-tokens")
        if self.max_doc_bytes < 1:
            bad("--max-doc-bytes", "must be at least 1")
        if self.pack_buffer_tokens is None:
            self.pack_buffer_tokens = max(1 << 20, 16 * self.seq_len)


# What a prepared dataset folder holds: only a folder made of these is replaced by --overwrite.
_DATASET_ENTRIES = {"meta.json", "stats.png", "train", "validation"}
_SPLIT_FILES = ("data-*.arrow", "cache-*.arrow", "state.json", "dataset_info.json")  # cache-*: datasets' own


def _holds_dataset(folder: Path) -> bool:
    return (folder / "meta.json").exists() or (folder / "train").exists()


def _unexpected_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that ``prepare`` does not write (relative paths, folders with a trailing /)."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.name not in _DATASET_ENTRIES or entry.is_dir() != (entry.name in ("train", "validation")):
            out.append(entry.name + ("/" if entry.is_dir() else ""))
        elif entry.is_dir():
            out += [f"{entry.name}/{f.name}" + ("/" if f.is_dir() else "") for f in sorted(entry.iterdir())
                    if f.is_dir() or not any(f.match(pattern) for pattern in _SPLIT_FILES)]
    return out


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a dataset (unless ``overwrite``) or anything that is not one of ours."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataPrepError(f"--out {out}: exists and is not a folder; choose another --out")
    if _holds_dataset(out):
        if not overwrite:
            raise DataPrepError(f"--out {out}: already holds a prepared dataset; pass --overwrite to replace "
                                "it, or choose another --out")
        unexpected = _unexpected_entries(out)
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
            raise DataPrepError(f"--out {out}: --overwrite replaces only a prepared dataset, but this folder also "
                                f"holds files prepare did not write: {shown}; move them away or choose another --out")
    elif any(out.iterdir()):
        raise DataPrepError(f"--out {out}: exists, is not empty and holds no prepared dataset; choose another "
                            "--out (--overwrite only ever replaces a prepared dataset)")


def _padding(tok: Tokenizer) -> dict:
    if tok.pad_id is not None:
        return {"id": tok.pad_id, "source": "pad"}
    if tok.eos_id is not None:
        return {"id": tok.eos_id, "source": "eos"}
    return {"id": 0, "source": "zero"}  # masked and in its own segment: the value never matters


@dataclass
class _Split:
    """One output split: its writer, row assembler, packer and counts."""

    writer: SplitWriter
    counts: PackCounts
    packer: object

    @classmethod
    def create(cls, folder: Path, cfg: PrepareConfig, pad_id: int) -> "_Split":
        writer, counts = SplitWriter(folder, cfg.seq_len), PackCounts()
        rows = RowAssembler(cfg.seq_len, pad_id, writer.write, counts)
        return cls(writer, counts, make_packer(cfg.strategy, cfg.seq_len, rows, cfg.stride, cfg.pack_buffer_tokens))


def _totals(source_stats: list[SourceStats]) -> dict:
    """The run's counts: sums of the per-source ones (each document is counted once, per source)."""
    def summed(field_name: str) -> int:
        return sum(getattr(s, field_name) for s in source_stats)

    def merged(field_name: str) -> dict:
        total = Counter()
        for s in source_stats:
            total.update(getattr(s, field_name))
        return dict(sorted(total.items()))

    return {
        "documents_read": summed("documents_read"), "blank_lines": summed("blank_lines"),
        "documents_skipped": merged("skipped"), "documents_filtered": merged("filtered"),
        "documents_cut_by_weight": summed("documents_cut_by_weight"),
        "documents_train": summed("documents_train"), "documents_validation": summed("documents_validation"),
        "tokens_read": summed("tokens_train_in") + summed("tokens_validation"),
    }


class _Run:
    def __init__(self, cfg: PrepareConfig, tok: Tokenizer, folder: Path):
        self.cfg, self.tok, self.folder = cfg, tok, folder
        self.add_bos = tok.bos_id is not None if cfg.add_bos is None else cfg.add_bos
        if self.add_bos and tok.bos_id is None:
            raise DataPrepError(f"--add-bos: the tokenizer {tok.file} has no BOS token; pass --no-add-bos")
        if cfg.add_eos and tok.eos_id is None:
            raise DataPrepError(f"--add-eos: the tokenizer {tok.file} has no EOS token; pass --no-add-eos")
        self.n_special = int(self.add_bos) + int(cfg.add_eos)
        self.padding = _padding(tok)
        self.hist = LengthHistogram()
        self.documents_truncated = self.tokens_truncated = 0  # run-wide only (meta.json has no per-source field)
        self.read_opts = ReadOptions(cfg.text_field, cfg.id_field, cfg.max_doc_bytes, tokenizer=tok,
                                     doc_tokens=cfg.seq_len - self.n_special, seed=cfg.seed)
        self.tokens_seen = 0
        self.warnings: list[str] = []

    # -- reading -----------------------------------------------------------------------
    def _skip(self, bad: BadDocument, stats: SourceStats) -> None:
        if not self.cfg.skip_bad:
            raise bad
        stats.skipped[bad.reason] = stats.skipped.get(bad.reason, 0) + 1

    def _batches(self, source, stats: SourceStats, bar):
        """(documents, texts) batches of good documents; bad ones are raised or counted here."""
        docs, texts, size = [], [], 0
        ordinal = 0
        for raw in iter_documents(source, self.read_opts):
            if bar is not None:
                bar.update(raw.nbytes)
            if raw.text is None and raw.bad is None:
                stats.blank_lines += 1
                continue
            stats.documents_read += 1
            ordinal += 1  # the document's key counts bad ones too, so skipping does not move the split
            if raw.bad is not None:
                self._skip(raw.bad, stats)
                continue
            docs.append((ordinal if raw.doc_id is None else raw.doc_id, raw.where))
            texts.append(raw.text)
            size += len(raw.text)
            if size >= self.cfg.batch_chars or len(texts) >= 1024:
                yield docs, texts
                docs, texts, size = [], [], 0
        if texts:
            yield docs, texts

    # -- per document --------------------------------------------------------------------
    def _place(self, key, where: str, tokens, stats: SourceStats, sampler: WeightSampler) -> None:
        cfg = self.cfg
        n = len(tokens)
        if n <= self.n_special:
            self._skip(BadDocument("empty", where, "the document has no tokens", "remove empty documents"), stats)
            return
        if cfg.min_tokens and n < cfg.min_tokens:
            return self._filter("min_tokens", stats)
        if cfg.max_tokens and n > cfg.max_tokens:
            if not cfg.truncate_long:
                return self._filter("max_tokens", stats)
            self.documents_truncated += 1
            self.tokens_truncated += n - cfg.max_tokens
            tokens, n = tokens[:cfg.max_tokens], cfg.max_tokens
        self.hist.add(n)
        if is_validation(cfg.seed, stats.index, key, cfg.val_fraction):
            stats.documents_validation += 1
            stats.tokens_validation += n
            self.splits["validation"].packer.add(tokens)
            return
        stats.documents_train += 1
        for copy in sampler.feed(tokens, key):
            self.splits["train"].packer.add(copy)

    def _filter(self, reason: str, stats: SourceStats) -> None:
        stats.filtered[reason] = stats.filtered.get(reason, 0) + 1

    # -- the whole run ---------------------------------------------------------------------
    def execute(self, sources) -> dict:
        cfg = self.cfg
        encoder = Encoder(self.tok, self.add_bos, cfg.add_eos, cfg.num_proc)  # before any thread starts
        self.splits = {"train": _Split.create(self.folder / "train", cfg, self.padding["id"])}
        if cfg.val_fraction > 0:
            self.splits["validation"] = _Split.create(self.folder / "validation", cfg, self.padding["id"])
        bar = _progress_bar(sum(s.total_bytes for s in sources)) if cfg.progress else None
        start = time.monotonic()
        source_stats = []
        try:
            for source in sources:
                stats = SourceStats(source.index, source.name, source.kind, source.spec.weight,
                                    len(source.files), source.hidden_ignored)
                sampler = WeightSampler(source.spec.weight, cfg.seed, source.index)
                for docs, arrays in encoder.map(self._batches(source, stats, bar)):
                    for (key, where), tokens in zip(docs, arrays):
                        self.tokens_seen += len(tokens)
                        self._place(key, where, tokens, stats, sampler)
                    if bar is not None:
                        rate = self.tokens_seen / max(1e-9, time.monotonic() - start)
                        bar.set_postfix_str(f"{self.tokens_seen:,} tokens, {rate / 1e3:,.0f}k tok/s", refresh=False)
                for copy in sampler.finish():
                    self.splits["train"].packer.add(copy)
                stats.tokens_train_in, stats.tokens_train_out = sampler.tokens_in, sampler.tokens_out
                stats.documents_cut_by_weight = sampler.documents_cut
                source_stats.append(stats)
            for split in self.splits.values():
                split.packer.finish()
        finally:
            encoder.close()
            if bar is not None:
                bar.close()
        self.elapsed = time.monotonic() - start
        return self._meta(source_stats)

    def _meta(self, source_stats) -> dict:
        cfg, totals = self.cfg, _totals(source_stats)
        splits = {}
        for name, split in self.splits.items():
            rows = split.writer.close()
            if rows == 0 and name == "validation":
                shutil.rmtree(self.folder / name)
                self.warnings.append(f"no document went to the validation split (--val-fraction {cfg.val_fraction}"
                                     f" of {totals['documents_read']} documents): no validation/ folder written")
                continue
            splits[name] = split.counts.as_dict()
        if not splits.get("train", {}).get("rows"):
            raise DataPrepError("no training rows: every document was skipped or filtered "
                                f"(skipped {totals['documents_skipped']}, filtered {totals['documents_filtered']}); check the inputs and options")
        sources = []
        for s in source_stats:
            d = asdict(s)
            d["weight_realized"] = round(s.tokens_train_out / s.tokens_train_in, 6) if s.tokens_train_in else None
            sources.append(d)
        return {
            "format_version": FORMAT_VERSION,
            "tool": "longtrain prepare (data_prep)",
            "tool_version": __version__,
            "seq_len": cfg.seq_len,
            "strategy": cfg.strategy,
            "stride": cfg.stride,
            "tail": TAIL_RULE if cfg.strategy == "slide-window" else None,
            "tokenizer": self.tok.identity(),
            "add_bos": self.add_bos,
            "add_eos": cfg.add_eos,
            "padding": self.padding,
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "filters": {"min_tokens": cfg.min_tokens, "max_tokens": cfg.max_tokens,
                        "truncate_long": cfg.truncate_long, "max_doc_bytes": cfg.max_doc_bytes},
            "skip_bad": cfg.skip_bad,
            "sources": sources,
            "counts": {
                "documents_read": totals["documents_read"], "blank_lines": totals["blank_lines"],
                "documents_skipped": totals["documents_skipped"], "documents_filtered": totals["documents_filtered"],
                "documents_truncated": self.documents_truncated, "tokens_truncated": self.tokens_truncated,
                "documents_cut_by_weight": totals["documents_cut_by_weight"],
                "documents_train": totals["documents_train"],
                "documents_validation": totals["documents_validation"], "tokens_read": totals["tokens_read"],
                "rows": {k: v["rows"] for k, v in splits.items()},
                "padding_tokens": {k: v["padding_tokens"] for k, v in splits.items()},
                "non_target_tokens": {k: v["non_target_tokens"] for k, v in splits.items()},
            },
            "splits": splits,
            "doc_length_histogram": self.hist.as_dict(),
            "warnings": self.warnings,
            # Sizes and sha256 of every split file, checked when the dataset is opened (integrity.py).
            FILES_KEY: record_files(self.folder, list(splits)),
        }


def _progress_bar(total_bytes: int):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                mininterval=0.5, smoothing=0.1)


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Run ``longtrain prepare``; returns the meta.json content. Raises :class:`DataPrepError`."""
    out = Path(cfg.out).expanduser()
    check_output(out, cfg.overwrite)
    tok = Tokenizer(cfg.tokenizer)
    sources = [resolve_source(spec, i) for i, spec in enumerate(cfg.inputs)]
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    free = _free_bytes(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise (_disk_error(exc, out, free, 0) or exc) from None
    try:
        run = _Run(cfg, tok, tmp)
        meta = run.execute(sources)
        if cfg.plot:
            write_stats_png(meta, tmp / "stats.png")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")  # written last
        check_output(out, cfg.overwrite)  # again: something may have appeared meanwhile
        _move_into_place(tmp, out)
    except BaseException as exc:
        written = _folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        error = _disk_error(exc, out, free, written) if isinstance(exc, OSError) else None
        if error is not None:
            raise error from None
        raise
    for line in summary_lines(meta):
        log(line)
    tokens = meta["counts"]["tokens_read"]
    log(f"{tokens:,} document tokens in {run.elapsed:.1f} s ({tokens / max(run.elapsed, 1e-9) / 1e3:,.0f}k tok/s); "
        f"wrote {out}")
    return meta


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:,.1f} MiB"


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _disk_error(exc: OSError, out: Path, free: int | None, written: int) -> DataPrepError | None:
    """A write that failed (full or read-only disk, no permission) or an input that could not be read,
    as one line naming the folder and the cause; None for other OSErrors (bugs keep their traceback).
    The partial output is gone by now, so nothing was written to --out."""
    if exc.errno not in _DISK_ERRNOS and not exc.filename:
        return None
    folder = out.parent
    where = Path(exc.filename) if exc.filename else None
    if where is not None and where in folder.parents:  # mkdir of a missing parent failed
        folder = where
    elif where is not None and where != folder and folder not in where.parents:  # not ours: an input
        return DataPrepError(f"{where}: cannot read it ({exc.strerror or exc}); nothing was written to --out {out}")
    untouched = "nothing was written to --out" + (" (the partial output was removed)" if written else "")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataPrepError(f"--out {out}: the disk of {folder} is full (no space left on device; {_mib(free)} "
                             f"were free when prepare started and the output had reached {_mib(written)}); "
                             f"{untouched}. Free space there or choose another --out")
    if exc.errno == errno.EROFS:
        return DataPrepError(f"--out {out}: cannot write in {folder}: read-only file system; {untouched}. "
                             "Choose an --out on a writable disk")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DataPrepError(f"--out {out}: cannot write in {folder}: permission denied; {untouched}. "
                             "Choose an --out you may write to")
    return DataPrepError(f"--out {out}: writing in {folder} failed ({exc.strerror or exc}); {untouched}")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
