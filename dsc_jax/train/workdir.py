"""The run folder: an exclusive lock, a writability probe, and setting a run aside.

* :class:`WorkdirLock`: ``fcntl.flock`` on ``WORKDIR`` itself and on ``WORKDIR/.lock``
  (process 0 of a run; see :class:`FolderLock`). The kernel drops the locks when the process
  ends, however it ends (``kill -9`` included), so a lock is never stale; a second run on the
  same folder fails at once with :class:`WorkdirLockedError` naming the holder (host, pid,
  start time), also when ``.lock`` was removed or replaced meanwhile.
* :func:`check_writable`: create, fsync and remove a probe file in a folder, so that a
  read-only mount or a full disk is reported before any compute rather than at the first save.
* :func:`earlier_record`: what an earlier run left besides checkpoints (a new start must not
  overwrite it); :func:`abandon`: move a previous run's outputs into
  ``WORKDIR/abandoned-<UTC time>/``, never deleting them.
* :func:`read_saved_config` / :func:`write_config`: ``WORKDIR/config.json`` (written
  atomically).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any

from absl import logging

from dsc_jax._storage import storage_errors, write_json_atomically
from dsc_jax.run_folder import CHECKPOINT_DIR, CONFIG_FILE

LOCK_FILE = ".lock"
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


class WorkdirLockLostError(WorkdirError):
    """The run can no longer prove that it alone uses its folder (the folder was moved or
    replaced, or its lock file was, where the folder itself cannot be locked)."""


def ensure_folder(path: str, what: str = "workdir") -> str:
    """``path`` made absolute and created if absent (with its parents).

    Raises:
      WorkdirError: ``path`` is a symbolic link to nothing, or not a folder.
      StorageError: it cannot be created (read-only parent, disk full, permissions).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.islink(path) and not os.path.exists(path):
        raise WorkdirError(
            f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
            "create the folder it points to, remove the link, or use another folder."
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise WorkdirError(f"{what} {path} exists and is not a folder; use another folder.")
    with storage_errors(path, f"create the {what}"):
        os.makedirs(path, exist_ok=True)
    return path


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class FolderLock:
    """An exclusive lock on a folder for one live process; the lock is the folder's identity,
    not a file name.

    Two ``flock`` locks, both dropped by the kernel when the process ends however it ends
    (``kill -9`` included, so never stale): one on the folder itself, which no removal or
    replacement of a file inside can take away, and one on ``<folder>/<lock_name>``, which
    records the holder (host, pid, start time) for the refusal message and also locks where
    a folder cannot be locked (e.g. NFS). :meth:`verify` (the trainer calls it every step)
    re-checks both identities: a removed or replaced lock file is re-created while the folder
    lock holds; without a folder lock, or when the folder itself was moved or replaced, it
    raises :class:`WorkdirLockLostError`.

    Args:
      folder: the folder to lock (created if absent).
      lock_name: the lock file's name inside it.
      what: the folder's role in messages (``"workdir"``).
      holder: who holds it, in messages (``"run"``).
      hint: what to do when it is held (``"... or use another --workdir"``).
    """

    def __init__(
        self,
        folder: str,
        *,
        lock_name: str = LOCK_FILE,
        what: str = "workdir",
        holder: str = "run",
        hint: str = "wait for it to finish, stop it, or use another --workdir",
    ) -> None:
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.path = os.path.join(self.folder, lock_name)
        self.what, self.holder, self.hint = what, holder, hint
        self._fd: int | None = None
        self._folder_fd: int | None = None
        self.folder_locked = False  # whether the folder itself is locked (not just the file)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def _locked_error(self) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"{self.what} {self.folder} is in use by another {self.holder} "
            f"({describe_holder(self.path)}); {self.hint}."
        )

    def acquire(self) -> None:
        """Take the lock, or raise :class:`WorkdirLockedError` naming the holder at once.

        Raises:
          WorkdirLockedError: another live process holds it.
          WorkdirError / StorageError: the folder cannot be created or the lock file written.
        """
        ensure_folder(self.folder, self.what)
        with storage_errors(self.folder, f"open the {self.what}"):
            folder_fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            try:
                fcntl.flock(folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.folder_locked = True
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked_error() from None
                self.folder_locked = False  # this file system cannot lock a folder
            self._fd = self._lock_file()
            self._folder_fd = folder_fd
        except BaseException:
            os.close(folder_fd)  # drops the folder lock too
            self.folder_locked = False
            raise

    def _lock_file(self) -> int:
        """Open, lock and fill the lock file; its descriptor."""
        with storage_errors(self.path, "create the lock file"):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise self._locked_error() from None
            holder = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            with storage_errors(self.path, "write the lock file"):
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def verify(self) -> None:
        """Check that this process still holds the folder (a no-op when not held).

        A lock file that was removed or replaced is re-created (one warning) while the folder
        itself is locked: no other run could have taken the folder meanwhile.

        Raises:
          WorkdirLockLostError: the folder was moved or replaced, or the lock file was and
            the folder itself is not locked.
        """
        if self._fd is None or self._folder_fd is None:
            return
        try:
            folder_now = os.stat(self.folder)
        except OSError:
            folder_now = None
        if folder_now is None or not _same_file(folder_now, os.fstat(self._folder_fd)):
            raise WorkdirLockLostError(
                f"{self.what} {self.folder} was moved, removed or replaced while this "
                f"{self.holder} held it: its files would now go to another folder. Stopping "
                "without writing anything more there; put the folder back (or use it as "
                "--workdir) and run the same command again."
            )
        try:
            lock_now = os.stat(self.path)
        except OSError:
            lock_now = None
        if lock_now is not None and _same_file(lock_now, os.fstat(self._fd)):
            return
        change = "removed" if lock_now is None else "replaced"
        if not self.folder_locked:
            raise WorkdirLockLostError(
                f"the lock file {self.path} was {change} while this {self.holder} held it, "
                "and this file system cannot lock the folder itself: another "
                f"{self.holder} may now be using {self.folder}. Stopping without writing "
                f"anything more; make sure no other {self.holder} uses it, then run the same "
                "command again."
            )
        old_fd = self._fd
        with contextlib.suppress(OSError):
            if lock_now is not None:
                os.remove(self.path)
        self._fd = self._lock_file()
        os.close(old_fd)
        logging.warning(
            "the lock file %s was %s while this %s held %s; the %s still holds the folder "
            "itself, so no other %s can use it, and the lock file was written again",
            self.path,
            change,
            self.holder,
            self.folder,
            self.holder,
            self.holder,
        )

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._folder_fd is not None:
            os.close(self._folder_fd)
            self._folder_fd = None
        self.folder_locked = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class WorkdirLock(FolderLock):
    """The run folder's lock (:class:`FolderLock` on ``WORKDIR`` and ``WORKDIR/.lock``).

    Use as a context manager; :meth:`acquire` raises :class:`WorkdirLockedError` when another
    process holds the lock.
    """

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)


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
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(probe)
    except OSError as err:
        raise WorkdirError(
            f"cannot write to {folder}: {err.strerror or err} (errno {err.errno}); free space, "
            "fix the mount or permissions, or use another --workdir."
        ) from None


def earlier_record(workdir: str) -> list[str]:
    """The names of an earlier run's record in ``workdir`` besides its checkpoints:
    ``metrics.jsonl``, ``config.json``, a non-empty ``tensorboard/`` or ``checkpoints.corrupt/``.
    """
    found = []
    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if name == CHECKPOINT_DIR or not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                if not os.listdir(path):
                    continue
        found.append(name)
    return found


def abandon(workdir: str) -> str | None:
    """Move the run outputs of ``workdir`` into ``workdir/abandoned-<UTC time>/``.

    Returns:
      The folder they were moved to, or ``None`` when there was nothing to move.

    Raises:
      StorageError: a move failed (naming the file; what was moved already stays moved).
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
    with storage_errors(target, "set the previous run aside in"):
        os.makedirs(target)
        for name in present:
            os.replace(os.path.join(workdir, name), os.path.join(target, name))
    logging.warning("moved %s of the previous run to %s", ", ".join(present), target)
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
    """Atomically write ``WORKDIR/config.json`` (temporary file, fsync, rename).

    Raises:
      StorageError: naming the file and the OS reason.
    """
    write_json_atomically(os.path.join(workdir, CONFIG_FILE), payload)
