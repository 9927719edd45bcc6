"""``prepare`` onto a full disk (a real 2 MiB tmpfs) or a read-only one (a real read-only bind mount):
one line naming the folder and the cause, exit 2, nothing complete-looking left behind, and a
dataset that was already there stays intact. Skipped where mounting is not permitted."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from data_prep.cli import prepare_main
from data_prep.integrity import check_dataset_files


def mount(target: Path, *args: str) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting is not permitted here (mount {' '.join(args)}: {proc.stderr.strip()})")
    return target


@pytest.fixture
def mounts(tmp_path):
    mounted = []

    def make(name: str, *args: str) -> Path:
        mounted.append(mount(tmp_path / name, *args))
        return mounted[-1]

    yield make
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def prepare(capsys, out: Path, inputs, tokenizer, *extra) -> tuple[int, str]:
    argv = [a for i in inputs for a in ("--input", str(i))]
    code = prepare_main(argv + ["--tokenizer", str(tokenizer), "--seq-len", "64", "--out", str(out),
                                "--no-progress", "--no-plot", *extra])
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_full_disk(capsys, mounts, corpus, tiny_tokenizer):
    disk = mounts("small", "-t", "tmpfs", "-o", "size=2m", "tmpfs")
    out = disk / "data"
    assert prepare(capsys, out, [corpus["jsonl"]], tiny_tokenizer)[0] == 0  # a small dataset fits
    before = snapshot(out)
    tokens = json.loads((out / "meta.json").read_text())["counts"]["tokens_read"]
    big = f"{corpus['jsonl']}:{(3 << 20) // (5 * tokens) + 1}"  # 5 bytes a token: rows of ~3 MiB
    for target, extra in ((out, ["--overwrite"]), (disk / "other", [])):
        code, err = prepare(capsys, target, [big], tiny_tokenizer, "--strategy", "concat", *extra)
        assert code == 2, err
        assert f"--out {target}: the disk of {disk} is full (no space left on device; " in err, err
        assert "MiB were free when prepare started and the output had reached" in err
        assert "nothing was written to --out (the partial output was removed)" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in disk.iterdir()) == ["data"], "no partial folder left behind"
    assert snapshot(out) == before, "the dataset that was there is untouched"
    assert check_dataset_files(out, full=True) is None


def test_read_only_disk(capsys, tmp_path, mounts, corpus, tiny_tokenizer):
    src = tmp_path / "src"
    assert prepare(capsys, src / "data", [corpus["jsonl"]], tiny_tokenizer)[0] == 0
    before = snapshot(src)
    ro = mounts("ro", "--bind", "-o", "ro", str(src))
    for target, extra in ((ro / "new", []), (ro / "data", ["--overwrite"]), (ro / "a" / "b" / "new", [])):
        code, err = prepare(capsys, target, [corpus["jsonl"]], tiny_tokenizer, *extra)
        assert code == 2, err
        folder = ro / "a" if target.parent.name == "b" else ro
        assert f"--out {target}: cannot write in {folder}: read-only file system; nothing was written to --out" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert snapshot(src) == before and json.loads((src / "data" / "meta.json").read_text())["seq_len"] == 64
