"""The study corpus: what is trained on and what is held out (whole documents, never trained on).

Prose: the four novels of ../shared/data/corpora and 48 WikiText-2 articles for training, 12 other
articles held out. Code: the interpreter's top-level standard-library modules (``Lib/*.py``), split
by file name. Source code repeats identifiers and idioms hundreds of tokens apart, so it shows what a
longer context buys where a model this small gains nothing from prose (DESIGN.md 3b, trap d).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from benchmarks.study.recipe import REPO
from longtrain.errors import UserError

# ../shared/data beside the checkout (DESIGN.md); LONGTRAIN_SHARED_DATA overrides it.
SHARED_DATA = Path(os.environ.get("LONGTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
TRAIN_BOOKS = ("pride_and_prejudice.txt", "frankenstein.txt", "tinyshakespeare.txt", "botchan.txt")
WIKITEXT = "wikitext2_valid.jsonl"
HELDOUT_SETS = ("code", "prose")  # the folders of corpus/heldout, each evaluated and reported apart


def heldout_code(name: str) -> bool:
    """A stdlib module is held out when sha256(file name) % 8 == 0: stable across Python versions
    for the files they share (~15 of the ~170 top-level modules, ~100k tokens)."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 8 == 0


def heldout_article(index: int) -> bool:
    """WikiText-2 validation articles 0, 5, 10, ... (12 of 60, ~68k tokens) are held out."""
    return index % 5 == 0


def build_corpus(out: Path, shared: Path, quick: bool) -> dict:
    """Copy the study corpus into ``out/{train,heldout}/{prose,code}``; return the manifest.

    ``quick`` keeps a few small documents of each, for a plumbing check. Written to a sibling
    folder and renamed into place, so an interrupted build is never taken for a finished one.
    """
    corpora = shared / "corpora"
    missing = [n for n in (*TRAIN_BOOKS, WIKITEXT) if not (corpora / n).is_file()]
    if missing:
        raise UserError(f"study corpus not found: {', '.join(str(corpora / n) for n in missing)} "
                         "(pass --shared-data or set LONGTRAIN_SHARED_DATA)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dirs = {k: tmp / k for k in ("train/prose", "train/code", "heldout/prose", "heldout/code")}
    for d in dirs.values():
        d.mkdir(parents=True)
    books, lines, train_lines = _copy_prose(corpora, dirs, quick)
    stdlib, split = _copy_code(dirs, quick)
    manifest = {"python": sys.version.split()[0], "stdlib": str(stdlib), "quick": quick,
                "prose_train": list(books) + [f"{WIKITEXT}: {len(train_lines)} articles"],
                "prose_heldout": [f"{WIKITEXT}: articles {[i for i in range(len(lines)) if heldout_article(i)]}"],
                "code_train": split["train"], "code_heldout": split["heldout"]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def _copy_prose(corpora: Path, dirs: dict[str, Path], quick: bool) -> tuple[tuple[str, ...], list[str], list[str]]:
    """The novels (training only) and the WikiText articles split by index; returns (books, every
    article, training articles). One JSON line per article in the shared file."""
    books = TRAIN_BOOKS[3:] if quick else TRAIN_BOOKS  # botchan alone in quick mode
    for name in books:
        shutil.copy(corpora / name, dirs["train/prose"] / name)
    lines = [line for line in (corpora / WIKITEXT).read_text(encoding="utf-8").splitlines() if line.strip()]
    if quick:
        lines = lines[:10]
    train_lines = [line for i, line in enumerate(lines) if not heldout_article(i)]
    held_lines = [line for i, line in enumerate(lines) if heldout_article(i)]
    (dirs["train/prose"] / "wikitext_train.jsonl").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    (dirs["heldout/prose"] / "wikitext_heldout.jsonl").write_text("\n".join(held_lines) + "\n", encoding="utf-8")
    return books, lines, train_lines


def _copy_code(dirs: dict[str, Path], quick: bool) -> tuple[Path, dict[str, list[str]]]:
    """The running interpreter's top-level stdlib modules split by name; returns (stdlib, split)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(stdlib.glob("*.py"))
    if quick:
        modules = [m for m in modules if m.stat().st_size < 40_000][:40]
    split: dict[str, list[str]] = {"train": [], "heldout": []}
    for path in modules:
        kind = "heldout" if heldout_code(path.name) else "train"
        shutil.copy(path, dirs[f"{kind}/code"] / path.name)
        split[kind].append(path.name)
    return stdlib, split
