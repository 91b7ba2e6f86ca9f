"""The run folder: an exclusive lock, a writability probe, and setting a run aside.

* :class:`WorkdirLock`: ``fcntl.flock`` on ``WORKDIR/.lock`` (process 0 of a run). The
  kernel drops the lock when the process ends, however it ends (``kill -9`` included), so a
  lock is never stale; a second run on the same folder fails at once with
  :class:`WorkdirLockedError` naming the holder (host, pid, start time).
* :func:`check_writable`: create, fsync and remove a probe file in a folder, so that a
  read-only mount or a full disk is reported before any compute rather than at the first save.
* :func:`abandon`: move a previous run's outputs into ``WORKDIR/abandoned-<UTC time>/``
  (``config.start_over``), never deleting them.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"  # WORKDIR/checkpoints/<step>/ (orbax)
# Everything a run writes into its workdir (what start_over moves aside).
RUN_OUTPUTS = (
    CHECKPOINT_DIR,
    f"{CHECKPOINT_DIR}.corrupt",
    "metrics.jsonl",
    "tensorboard",
    CONFIG_FILE,
)


class WorkdirError(RuntimeError):
    """The run folder cannot be used (locked by another run, unwritable); the message says
    which folder and what to do."""


class WorkdirLockedError(WorkdirError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """Exclusive, non-blocking ``flock`` on ``WORKDIR/.lock``; the file records the holder.

    Use as a context manager; :meth:`acquire` raises :class:`WorkdirLockedError` when another
    process holds the lock.
    """

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise WorkdirLockedError(
                f"workdir {os.path.dirname(self.path)} is in use by another run "
                f"({describe_holder(self.path)}); wait for it to finish, stop it, or use "
                "another --workdir."
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe_holder(lock_path: str) -> str:
    """``"host H, pid P, since T"`` from a lock file (best effort)."""
    try:
        with open(lock_path) as f:
            holder = json.loads(f.read() or "{}")
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def check_writable(folder: str) -> None:
    """Create, fsync and remove a probe file in ``folder`` (created if absent).

    Raises:
      WorkdirError: naming the folder and the operating system's reason.
    """
    probe = os.path.join(folder, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        raise WorkdirError(
            f"cannot write to {folder}: {err.strerror or err} (errno {err.errno}); free space, "
            "fix the mount or permissions, or use another --workdir."
        ) from None


def has_outputs(workdir: str) -> bool:
    """Whether ``workdir`` holds anything a run writes."""
    return any(os.path.exists(os.path.join(workdir, name)) for name in RUN_OUTPUTS)


def abandon(workdir: str) -> str | None:
    """Move the run outputs of ``workdir`` into ``workdir/abandoned-<UTC time>/``.

    Returns:
      The folder they were moved to, or ``None`` when there was nothing to move.
    """
    present = [n for n in RUN_OUTPUTS if os.path.lexists(os.path.join(workdir, n))]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = os.path.join(workdir, f"abandoned-{stamp}")
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(workdir, f"abandoned-{stamp}-{suffix}")
    os.makedirs(target)
    for name in present:
        os.replace(os.path.join(workdir, name), os.path.join(target, name))
    logging.warning("start_over: moved %s of the previous run to %s", ", ".join(present), target)
    return target


def read_saved_config(workdir: str) -> dict[str, Any] | None:
    """The ``config`` section of ``WORKDIR/config.json``, or ``None`` when absent."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WorkdirError(
            f"{path} is unreadable ({type(err).__name__}: {err}); it records the settings of "
            "the run in this folder. Restore it, or pass --config.start_over=True to set the "
            "old run aside."
        ) from None


def write_config(workdir: str, payload: dict[str, Any]) -> None:
    """Atomically write ``WORKDIR/config.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp-{os.getpid()}-{int(time.time())}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
