"""One training run per run folder: ``RUN_DIR/train.lock``, held by rank 0 for the run's life.

The lock file names its holder: ``{"host", "pid", "started", "heartbeat", "slurm_job"}``. Who may take it:
- Nobody while the holder's kernel lock is held: the file is ``flock``ed for the holder's life, so
  on one host a second run is refused, and a holder that died (even by SIGKILL) left no kernel lock
  behind; the next run takes the file over atomically (the kernel arbitrates, ``RunLock.acquire``).
- A holder on another host (``flock`` is not reliable across nodes on every network file system):
  its heartbeat, refreshed every ``HEARTBEAT_S`` seconds, decides. Older than ``STALE_AFTER_S``: the
  holder is gone and the lock is taken over; fresher: refused. ``--break-lock`` takes it over anyway
  (for when you know that run is gone), except from a live process on this very host.
- The same Slurm job (``SLURM_JOB_ID``) after a requeue: Slurm ended the earlier incarnation, so its
  lock is stale whatever host it names.
On a file system without ``flock`` at all (rare; the lock then says so when it refuses), the record
alone decides, and two runs started in the same instant could both start.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from longtrain.errors import UserError

LOCK_FILE = "train.lock"
_RECORD_BYTES = 1024  # the holder record, padded: written in one piece
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
"""A heartbeat older than this on another host means its run is gone: 20 missed refreshes, far more
than any file-system stall we know of, and enough for clocks that NTP keeps within seconds."""


class RunLockedError(UserError, RuntimeError):
    """Another run holds the run folder; the message names it (host, pid, start time)."""


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "a holder that has not written its record yet"
    text = f"host {info.get('host')!r}, pid {info.get('pid')}, started {info.get('started')}"
    if info.get("slurm_job"):
        text += f", Slurm job {info['slurm_job']}"
    beat = info.get("heartbeat")
    if isinstance(beat, (int, float)):
        text += f", heartbeat {max(0.0, time.time() - beat):.0f} s ago"
    return text


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _my_info() -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            "heartbeat": now, "slurm_job": os.environ.get("SLURM_JOB_ID")}


class RunLock:
    """``acquire()`` / ``release()`` on one process (rank 0); ``log`` gets the takeover notes."""

    def __init__(self, run_dir: Path, break_lock: bool = False, log: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_FILE
        self.break_lock = break_lock
        self.log = log
        self.info: dict[str, Any] | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------- taking it
    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # again only when the file was replaced under us (a release, --break-lock)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                kernel_lock = self._flock(fd)
                holder = self._read(fd)
                if kernel_lock is None:  # held by a live process
                    holder = holder or {}
                    if not (self.break_lock and holder.get("host") != socket.gethostname()):
                        raise RunLockedError(self._refusal(holder, "it holds the lock"))
                    self._move_aside(holder)
                    os.close(fd)
                    continue
                if not self._same_file(fd):
                    os.close(fd)
                    continue
                self._judge(holder, kernel_lock)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.info = fd, _my_info()
            self._write()
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunLockedError(f"{self.path}: the lock file keeps being replaced; is another run starting here?")

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: we hold the kernel lock; None: a live process holds it; False: the file system has no
        flock (the recorded holder decides alone)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise

    def _move_aside(self, holder: dict[str, Any]) -> None:
        """--break-lock over a lock held from another host: its file moves aside, a fresh one is taken."""
        aside = self.path.with_name(f"{LOCK_FILE}.broken-{time.time_ns()}")
        os.replace(self.path, aside)
        self.log(f"--break-lock: taking the run folder over from {_holder_text(holder)} (its lock file moved to "
                 f"{aside.name})")

    def _same_file(self, fd: int) -> bool:
        """The file we locked is still the one at the path (a releasing holder unlinks it)."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _judge(self, holder: dict[str, Any] | None, kernel_lock: bool) -> None:
        """Whether the recorded holder (if any) may be replaced; raises RunLockedError if not."""
        if not holder:
            if kernel_lock or self.break_lock or holder == {} and not self.path.stat().st_size:
                return  # nobody holds the kernel lock (or no flock here and the file is new and empty)
            raise RunLockedError(f"{self.path}: names no readable holder and this file system has no flock; if no "
                                 f"run uses {self.path.parent}, pass --break-lock")
        here = holder.get("host") == socket.gethostname()
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            self.log(f"taking over the run lock of an earlier incarnation of Slurm job {job} ({_holder_text(holder)})")
        elif here and (kernel_lock or not _pid_alive(holder.get("pid"))):
            self.log(f"taking over a stale run lock: {_holder_text(holder)}; that process is gone")
        elif not here:
            age = time.time() - float(holder.get("heartbeat") or 0)
            if age < STALE_AFTER_S and not self.break_lock:
                raise RunLockedError(self._refusal(holder, f"its heartbeat is {age:.0f} s old (stale after "
                                                           f"{STALE_AFTER_S:.0f} s)"))
            why = "--break-lock" if age < STALE_AFTER_S else f"no heartbeat for {age:.0f} s"
            self.log(f"taking over the run lock of {_holder_text(holder)} ({why})")
        else:
            raise RunLockedError(self._refusal(holder, "that process is running"))

    def _refusal(self, holder: dict[str, Any], why: str) -> str:
        return (f"run folder {self.path.parent} is in use by another `longtrain train` ({_holder_text(holder)}; "
                f"{why}); wait for it to finish, stop it, or use another --run-dir"
                + ("" if holder.get("host") == socket.gethostname() else
                   "; if that run is gone, pass --break-lock"))

    # ------------------------------------------------------------------------- holding it
    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        """The recorded holder: {} for an empty file, None for one that does not parse."""
        try:
            data = os.pread(fd, _RECORD_BYTES, 0)
            if not data.strip():
                return {}
            value = json.loads(data.decode("utf-8"))
            return value if isinstance(value, dict) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def _write(self) -> None:
        """One fixed-size write at offset 0: a reader sees the old record or the new one, never a mix
        (the file never shrinks, so no truncation is needed)."""
        assert self._fd is not None and self.info is not None
        data = json.dumps(self.info).encode("utf-8")
        os.pwrite(self._fd, data + b" " * (_RECORD_BYTES - 1 - len(data)) + b"\n", 0)
        os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.info["heartbeat"] = time.time()
                self._write()
            except OSError:
                pass  # a full or flaky disk must not kill the run; the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat, remove the file (ours: still locked by us), unlock."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._same_file(self._fd):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def lock_run_dir(run_dir: Path, break_lock: bool, log: Callable[[str], None]) -> RunLock | None:
    """Rank 0 takes the run folder's lock; every rank learns the outcome (collective) and, when it was
    refused, raises the same ``RunLockedError`` (exit 2 on every rank). Returns rank 0's lock."""
    lock, error = None, None
    if dist.get_rank() == 0:
        lock = RunLock(run_dir, break_lock, log)
        try:
            lock.acquire()
        except RunLockedError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{Path(run_dir) / LOCK_FILE}: cannot take the run lock ({exc.strerror or exc})"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise RunLockedError(box[0])
    return lock
