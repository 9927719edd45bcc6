"""The run folder's lock (``longtrain/run_lock.py``) on real files and processes: a live holder is
refused by name, a dead one's lock is taken over, another host's by its heartbeat, a requeued Slurm
job's always. Two real trainers on one folder: tests/longtrain/test_faults.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from longtrain import run_lock
from longtrain.run_lock import LOCK_FILE, RunLock, RunLockedError


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_holder(run_dir, **info):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00",
              "heartbeat": time.time(), "slurm_job": None, **info}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    return holder


def test_a_held_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunLockedError) as info:
        RunLock(tmp_path / "run").acquire()  # its own open file: flock conflicts as with another process
    message = str(info.value)
    assert f"run folder {tmp_path / 'run'} is in use by another `longtrain train`" in message
    assert f"host {socket.gethostname()!r}, pid {os.getpid()}, started {holder['started']}" in message
    assert "--break-lock" not in message  # a live process on this host is never taken over
    with pytest.raises(RunLockedError):
        RunLock(tmp_path / "run", break_lock=True).acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    second = RunLock(tmp_path / "run")
    second.acquire()  # free again
    second.release()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    dead = _dead_pid()
    _write_holder(tmp_path, pid=dead)
    notes = []
    lock = RunLock(tmp_path, log=notes.append)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert notes and f"taking over a stale run lock: host {socket.gethostname()!r}, pid {dead}" in notes[0]
    lock.release()


def test_another_hosts_lock_is_judged_by_its_heartbeat(tmp_path):
    _write_holder(tmp_path, host="node-b", pid=4242, heartbeat=time.time() - 30)
    with pytest.raises(RunLockedError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert "host 'node-b', pid 4242" in message and "(stale after 600 s)" in message
    assert "if that run is gone, pass --break-lock" in message
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-b"  # untouched

    notes = []
    lock = RunLock(tmp_path, break_lock=True, log=notes.append)
    lock.acquire()
    assert "(--break-lock)" in notes[0] and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()

    _write_holder(tmp_path, host="node-b", pid=4242, heartbeat=time.time() - run_lock.STALE_AFTER_S - 5)
    notes.clear()
    lock = RunLock(tmp_path, log=notes.append)
    lock.acquire()
    assert "no heartbeat for 60" in notes[0]
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_earlier_incarnation(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    _write_holder(tmp_path, host="node-c", pid=99, slurm_job="777")  # fresh heartbeat, other host
    notes = []
    lock = RunLock(tmp_path, log=notes.append)
    lock.acquire()
    assert "earlier incarnation of Slurm job 777" in notes[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_job"] == "777"
    lock.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads((tmp_path / LOCK_FILE).read_text() or "{}").get("heartbeat", first) == first:
        assert time.time() < deadline, "no heartbeat"
        time.sleep(0.05)
    lock.release()
