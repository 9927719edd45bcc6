"""Faults injected for real into runs and checkpoints (issue 10, "Trustworthy runs"): bytes flipped,
shards truncated, state files cut, two trainers on one folder, a diverging run, a started stage
edited before resuming, a full disk. Each checks the exit code, the message, and that nothing was
lost; a resumed run after a fallback gives the reference run's losses bitwise (fp32, CPU).

The reference run (``baseline_run``: checkpoints at steps 3, 4, 6 and 8) is copied and the copy
damaged. The lock, resume-rule and guard logic have unit tests of their own (test_run_lock.py,
test_resume_rules.py, test_divergence.py)."""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from longtrain import checkpoint
from longtrain.checkpoint_space import DiskFullError, explain_write_errors
from longtrain.run_lock import LOCK_FILE, RunLock
from tests.support import models, runs

STEP = {n: f"step_{n:08d}" for n in (2, 3, 4, 6, 8)}
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _flip(path: Path, offset: int | None = None, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def _cut(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep))


def _copy_run(baseline_run: Path, dest: Path) -> Path:
    shutil.copytree(baseline_run, dest)
    return dest


def _snapshot(run_dir: Path) -> dict[str, int]:
    """Every file of a run folder with its size: what "nothing was changed" is checked against."""
    return {p.relative_to(run_dir).as_posix(): p.stat().st_size for p in run_dir.rglob("*") if p.is_file()}


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "longtrain train: error:" in line]


def _model(tokenizer):
    return {"config": models.tiny_model_config(), "tokenizer": str(tokenizer)}


# ------------------------------------------------------------------------------------ integrity, in process


def _damaged_copy(baseline_run: Path, tmp_path: Path, name: str, damage) -> Path:
    tag_dir = tmp_path / name / STEP[8]
    shutil.copytree(baseline_run / "checkpoints" / STEP[8], tag_dir)
    damage(tag_dir)
    return tag_dir


def test_verification_names_every_kind_of_damage(tmp_path, baseline_run):
    intact = checkpoint.verify(baseline_run / "checkpoints" / STEP[8])
    assert intact.has_manifest and intact.hashes and intact.files == 5
    assert intact.line().startswith(f"verified {STEP[8]}: 5 files, 1.7 MiB, sizes and sha256, in ")

    flipped = _damaged_copy(baseline_run, tmp_path, "flip", lambda d: _flip(d / MODEL_STATES))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.verify(flipped)
    assert str(info.value) == (f"{flipped}: damaged checkpoint: {MODEL_STATES}: sha256 differs from the one recorded "
                               f"at save (its content changed)")
    sizes_only = checkpoint.verify(flipped, hashes=False)  # train.checkpoint_hashes false: sizes only
    assert "sizes only (sha256 not checked)" in sizes_only.line()

    cut = _damaged_copy(baseline_run, tmp_path, "cut", lambda d: _cut(d / OPTIM_SHARD))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{OPTIM_SHARD}: \d+ bytes, \d+ were written \(truncated\)"):
        checkpoint.verify(cut, hashes=False)  # sizes are always checked

    state = _damaged_copy(baseline_run, tmp_path, "state", lambda d: _cut(d / checkpoint.STATE_FILE))
    with pytest.raises(checkpoint.CheckpointError, match=r"longtrain_state.json: \d+ bytes, \d+ were written"):
        checkpoint.verify(state)

    gone = _damaged_copy(baseline_run, tmp_path, "gone", lambda d: (d / "rng_rank0.pt").unlink())
    with pytest.raises(checkpoint.CheckpointError, match="rng_rank0.pt: missing"):
        checkpoint.verify(gone)

    marker = _damaged_copy(baseline_run, tmp_path, "marker", lambda d: _cut(d / checkpoint.COMPLETE_FILE))
    with pytest.raises(checkpoint.CheckpointError, match="COMPLETE: not valid JSON"):
        checkpoint.verify(marker)


def _strip_manifest(tag_dir: Path) -> None:
    record = json.loads((tag_dir / checkpoint.COMPLETE_FILE).read_text())
    del record["manifest"]
    (tag_dir / checkpoint.COMPLETE_FILE).write_text(json.dumps(record))


def test_checkpoints_written_before_manifests_still_resume_unverified(tmp_path, baseline_run):
    legacy = _damaged_copy(baseline_run, tmp_path, "legacy", _strip_manifest)
    checked = checkpoint.verify(legacy)
    assert not checked.has_manifest
    assert checked.line() == (f"note: {legacy} has no file manifest (written before longtrain recorded one): its "
                              f"files cannot be verified")
    _cut(legacy / checkpoint.STATE_FILE)  # what can still be checked is: its state must parse
    with pytest.raises(checkpoint.CheckpointError, match="longtrain_state.json: cannot read the longtrain state"):
        checkpoint.verify(legacy)


def test_file_ownership_decides_which_rank_hashes_and_checks_a_file():
    from longtrain.checkpoint_manifest import checker_of, file_owner

    assert [file_owner(n) for n in ("zero_pp_rank_3_mp_rank_00_optim_states.pt", "rng_rank2.pt",
                                    "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                    "zero_pp_rank_5_mp_rank_00_model_states.pt", MODEL_STATES,
                                    "hf_config/config.json", checkpoint.STATE_FILE)] == [3, 2, 1, 5, 0, 0, 0]
    assert checker_of("zero_pp_rank_3_mp_rank_00_optim_states.pt", 2) == 1  # verified on fewer ranks


def test_choose_resume_walks_back_and_refuses_an_explicit_damaged_path(tmp_path, baseline_run):
    run = _copy_run(baseline_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    _flip(ckpts / STEP[8] / OPTIM_SHARD)
    notes = []
    assert checkpoint.choose_resume("auto", run, True, notes.append) == ckpts / STEP[6]
    assert notes[0].startswith(f"resume auto: not using {ckpts / STEP[8]}: damaged checkpoint: {OPTIM_SHARD}: sha256")
    assert notes[1] == f"resume auto: falling back to {STEP[6]}, the newest intact checkpoint (damaged: {STEP[8]})"
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.choose_resume(str(ckpts / STEP[8]), run, True, notes.append)
    assert str(info.value).startswith(f"--resume: {ckpts / STEP[8]}: damaged checkpoint: {OPTIM_SHARD}: sha256")
    assert "--resume auto to fall back to the newest intact one" in str(info.value)
    for n in (3, 4, 6):
        _cut(ckpts / STEP[n] / "rng_rank0.pt")
    with pytest.raises(checkpoint.CheckpointError, match="every complete checkpoint is damaged .step_00000008, "
                                                         "step_00000006, step_00000004, step_00000003"):
        checkpoint.choose_resume("auto", run, True, notes.append)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_rng_states_load_without_unpickling_code(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = checkpoint._rng_state()
    torch.save(saved, tmp_path / "new.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint._set_rng_state(checkpoint._load_rng_file(tmp_path / "new.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    # The format before this change pickled numpy's state tuple: still read (numpy's array classes allowed).
    np.random.seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    want = np.random.rand()
    checkpoint._set_rng_state(checkpoint._load_rng_file(tmp_path / "old.pt"))
    assert np.random.rand() == want
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"python": _Payload()}, protocol=2))
    with pytest.raises(checkpoint.CheckpointError, match="evil.pt: cannot read the RNG state"):
        checkpoint._load_rng_file(tmp_path / "evil.pt")


# ------------------------------------------------------------------------------------ integrity, real runs


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.multiproc
def test_resume_auto_falls_back_over_damaged_checkpoints_and_matches_bitwise(tmp_path, baseline_run):
    """Step 8's model states have bytes flipped, step 6's longtrain_state.json is cut: --resume auto
    names both, resumes from step 4, and steps 5-8 equal the uninterrupted run bitwise. A lock left by
    a killed run (this host, its pid gone) is taken over."""
    run = _copy_run(baseline_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    _flip(ckpts / STEP[8] / MODEL_STATES)
    _cut(ckpts / STEP[6] / checkpoint.STATE_FILE)
    dead = _dead_pid()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "earlier",
                                             "heartbeat": time.time()}))
    proc = runs.check(runs.run(runs.single_cmd() + runs.train_args(baseline_run.parent / "run.yaml", run, "--resume",
                                                                   "auto"), log=tmp_path / "log.txt"))
    out = proc.stdout
    assert f"taking over a stale run lock: host {socket.gethostname()!r}, pid {dead}" in out
    assert (f"resume auto: not using {ckpts / STEP[8]}: damaged checkpoint: {MODEL_STATES}: sha256 differs from the "
            f"one recorded at save") in out
    assert f"resume auto: not using {ckpts / STEP[6]}: damaged checkpoint: longtrain_state.json: " in out
    assert (f"resume auto: falling back to {STEP[4]}, the newest intact checkpoint (damaged: {STEP[8]}, {STEP[6]})"
            in out)
    assert f"resumed from {ckpts / STEP[4]} (global step 4" in out
    assert runs.losses(run) == runs.losses(baseline_run)  # bitwise, fp32 on CPU
    assert [r["step"] for r in runs.metrics(run)] == list(range(1, 9))
    assert runs.rows_per_step(run) == runs.rows_per_step(baseline_run)
    for n in (6, 8):  # rewritten by the resumed run, and intact
        assert checkpoint.verify(ckpts / STEP[n]).has_manifest
    assert not (run / LOCK_FILE).exists()


@pytest.mark.multiproc
def test_explicit_resume_of_a_truncated_checkpoint_is_refused_before_any_step(tmp_path, baseline_run):
    run = _copy_run(baseline_run, tmp_path / "run")
    _cut(run / "checkpoints" / STEP[8] / OPTIM_SHARD)
    before = _snapshot(run)
    proc = runs.run(runs.single_cmd() + runs.train_args(baseline_run.parent / "run.yaml", run, "--resume",
                                                        str(run / "checkpoints" / STEP[8])), log=tmp_path / "log.txt")
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    (error,) = _errors(proc)
    assert error.startswith(f"longtrain train: error: --resume: {run / 'checkpoints' / STEP[8]}: damaged checkpoint: "
                            f"{OPTIM_SHARD}: ")
    assert "were written (truncated). Not resuming from it: pass an earlier step_XXXXXXXX folder" in error
    assert "model:" not in proc.stdout  # refused before the model was built
    assert _snapshot(run) == before  # nothing written, nothing lost


@pytest.mark.multiproc
def test_resume_with_an_edited_started_stage_is_refused(tmp_path, baseline_run):
    """The checkpoint (step 8) finished stage 0 and is in stage 1: stage 0's steps and stage 1's RoPE may not change."""
    run = _copy_run(baseline_run, tmp_path / "run")
    before = _snapshot(run)
    proc = runs.run(runs.single_cmd() + runs.train_args(
        baseline_run.parent / "run.yaml", run, "--resume", "auto", "--set", "stages.0.steps=5", "--set",
        "stages.1.rope.theta=500000"), log=tmp_path / "log.txt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (error,) = _errors(proc)
    assert f"cannot resume from {run / 'checkpoints' / STEP[8]} with this config: " in error
    assert "stages.0.steps: 4 in the checkpoint, 5 now" in error
    assert ("stages.1.rope: {'type': 'default', 'theta': 1000000} in the checkpoint, {'type': 'default', "
            "'theta': 500000} now") in error
    assert "model:" not in proc.stdout
    assert _snapshot(run) == before


# ------------------------------------------------------------------------------------ divergence


@pytest.mark.multiproc
def test_a_diverging_run_stops_with_exit_code_3_at_the_last_good_checkpoint(tmp_path, stdlib_tokenizer,
                                                                             stdlib_datasets):
    """lr 1e4: after the first update the gradients are inf at every step and DeepSpeed (ZeRO-2, fp32)
    skips each update. The guard counts and logs each such step with its rows, and the third in a
    row stops the run with exit code 3, pointing at the last checkpoint saved before them."""
    stages = runs.two_stage_recipe(stdlib_datasets, s0__lr=1e4, s0__steps=10, s0__decay="constant")
    config = runs.write_config(tmp_path / "run.yaml", stages, _model(stdlib_tokenizer), {"checkpoint_every": 2})
    run = tmp_path / "run"
    proc = runs.run(runs.single_cmd() + runs.train_args(config, run), log=tmp_path / "log.txt")
    assert proc.returncode == 3, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "training done" not in proc.stdout
    records = runs.metrics(run)
    flagged = [r for r in records if r["nonfinite"]]
    last = records[-1]
    assert [r["nonfinite_streak"] for r in records[-3:]] == [1, 2, 3] and flagged == records[-3:]
    assert all(r["update_skipped"] and len(r["rows"]) == 4 for r in flagged)  # 4 rows per step, all logged
    assert not any(r["nonfinite"] or "rows" in r for r in records[:-3])
    assert [r["step"] for r in records] == list(range(1, last["step"] + 1))  # every step recorded
    good = checkpoint.latest_complete(run / "checkpoints")
    assert good is not None and int(good.name[5:]) < flagged[0]["step"]  # none saved in the non-finite streak
    checkpoint.verify(good)
    (error,) = _errors(proc)
    first, step = flagged[0]["step"], last["step"]
    assert error.startswith(f"longtrain train: error: training diverged at global step {step} (stage 0 "
                            f"'s64_base10k', step {step} of 10): 3 consecutive non-finite steps (steps {first}-{step}; "
                            f"train.max_nonfinite_steps is 3; this step: loss ")
    assert "grad_norm inf, update skipped by DeepSpeed); dataset rows of this step: " in error
    assert ", ".join(map(str, last["rows"])) in error
    assert f"last good checkpoint: {good} (resume from it with a lower stages.0.lr" in error
    assert proc.stdout.count("warning: non-finite step at global step") == 3


# ------------------------------------------------------------------------------------ two trainers


@pytest.mark.multiproc
def test_a_second_trainer_on_a_run_folder_is_refused_and_a_killed_ones_lock_is_stale(tmp_path, stdlib_tokenizer,
                                                                                    stdlib_datasets):
    stages = runs.two_stage_recipe(stdlib_datasets, s0__steps=400)
    config = runs.write_config(tmp_path / "run.yaml", stages, _model(stdlib_tokenizer))
    run = tmp_path / "run"
    first = runs.start(runs.single_cmd() + runs.train_args(config, run), tmp_path / "first.log")
    try:
        runs.wait_for_step(run, 1, first)
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = runs.run(runs.single_cmd() + runs.train_args(config, run, "--resume", "auto"),
                          log=tmp_path / "second.log")
        assert first.poll() is None, "the first run must still be running"
    finally:
        if first.poll() is None:
            runs.kill_group(first)  # SIGKILL: its lock file stays behind
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    (error,) = _errors(second)
    named = f"host {holder['host']!r}, pid {first.pid}, started {holder['started']}, heartbeat "
    assert re.fullmatch(re.escape(f"longtrain train: error: run folder {run} is in use by another `longtrain train` "
                                  f"({named}") + r"\d+" + re.escape(" s ago; it holds the lock); wait for it to "
                                                                   "finish, stop it, or use another --run-dir"), error)
    assert "model:" not in second.stdout
    steps = [r["step"] for r in runs.metrics(run)]
    assert steps == list(range(1, len(steps) + 1))  # only the first run's steps, each once
    # The killed run's lock names a pid that is gone: the next run on this host takes it over.
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid
    notes = []
    lock = RunLock(run, log=notes.append)
    lock.acquire()
    assert len(notes) == 1 and re.fullmatch(re.escape(f"taking over a stale run lock: {named}") + r"\d+"
                                            + re.escape(" s ago; that process is gone"), notes[0])
    lock.release()


# ------------------------------------------------------------------------------------ full disk


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size_bytes) -> folder``: a small tmpfs (skipped where mounting is not permitted)."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_failed_write_on_a_full_disk_is_one_line(tmpfs):
    """torch.save on a full file system raises `RuntimeError: ... unexpected pos N vs M`: said as a full disk."""
    root = tmpfs(64 << 10)
    (root / "step_00000001").mkdir()
    with pytest.raises(DiskFullError) as info:
        with explain_write_errors(root, "step_00000001", None, None):
            torch.save(torch.zeros(1 << 18), root / "step_00000001" / "x.pt")
    assert isinstance(info.value.__context__, RuntimeError) and "unexpected pos" in str(info.value.__context__)
    assert str(info.value).startswith(f"disk full while saving checkpoint step_00000001 in {root}: 6")
    assert " KiB were free when the save began, 0 B now; no earlier checkpoint of this run is affected; " in str(info.value)
    with pytest.raises(PermissionError):  # anything else passes through
        with explain_write_errors(root, "step_00000001", None, None):
            raise PermissionError("not a full disk")


@pytest.mark.multiproc
def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, tmpfs, baseline_run, stdlib_tokenizer,
                                                                   stdlib_datasets):
    """The run folder on a tmpfs that holds one checkpoint and a half: the step-2 save fits, the step-4
    save is refused before anything is written; step 2 stays intact."""
    ckpt = checkpoint.read_complete(baseline_run / "checkpoints" / STEP[3])["manifest"]
    ckpt_bytes = sum(entry["size"] for entry in ckpt["files"].values())
    tokenizer_bytes = sum(p.stat().st_size for p in (baseline_run / "tokenizer").iterdir())
    root = tmpfs(tokenizer_bytes + ckpt_bytes * 3 // 2 + (256 << 10))
    run = root / "run"
    config = runs.write_config(tmp_path / "run.yaml", runs.two_stage_recipe(stdlib_datasets, s0__steps=4),
                               _model(stdlib_tokenizer), {"checkpoint_every": 2})
    proc = runs.run(runs.single_cmd() + runs.train_args(config, run), log=tmp_path / "log.txt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (error,) = _errors(proc)
    assert error.startswith(f"longtrain train: error: disk full: not saving checkpoint {STEP[4]} in {run / 'checkpoints'}: ")
    assert (" free, a checkpoint of this run takes 1.7 MiB; the previous checkpoint step_00000002 is intact and "
            "resumable. Free space (or lower train.keep_checkpoints) and resume with --resume auto") in error
    assert checkpoint.verify(run / "checkpoints" / STEP[2]).hashes  # intact, every sha256 as saved
    assert not (run / "checkpoints" / STEP[4]).exists()  # nothing half-written
    assert [r["step"] for r in runs.metrics(run)] == [1, 2, 3, 4]
