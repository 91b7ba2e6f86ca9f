"""Storage errors as one line, and small files written atomically.

Every file the trainer, the sampler, the loader and the experiment runner write goes through
:func:`storage_errors` (or is written by :func:`write_atomically`), so that an operating
system error (disk full, read-only mount, quota, a missing or foreign path) becomes one
:class:`StorageError` whose message names the file, what was being done and the OS reason.
The command-line tools print it as one ``error:`` line (:func:`error_line` also formats any
stray :class:`OSError` the same way).

Small files (``config.json``, ``done.json``, ...) are written to a temporary name in the same
folder, flushed with ``fsync`` and renamed over the target, so a reader sees either the old or
the new content, never a truncated one (the temporary file is removed when writing fails).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

FIX_HINT = "free space, fix the mount or permissions, or use another folder"


class StorageError(RuntimeError):
    """A file or folder could not be read or written. The message names it, what was being
    done, and the operating system's reason."""

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno


def os_reason(err: OSError) -> str:
    """``"No space left on device (errno 28)"``: the OS reason of ``err``, without its path."""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason} (errno {err.errno})" if err.errno is not None else reason


def error_line(err: OSError, action: str = "access") -> str:
    """``"cannot write /run/metrics.jsonl: No space left on device (errno 28)"``."""
    path = err.filename if err.filename is not None else "a file"
    text = f"cannot {action} {path}: {os_reason(err)}"
    if err.filename2 is not None:
        text = f"cannot {action} {path} -> {err.filename2}: {os_reason(err)}"
    return text


@contextlib.contextmanager
def storage_errors(path: str, action: str = "write", hint: str = FIX_HINT) -> Iterator[None]:
    """Turn an :class:`OSError` inside into one :class:`StorageError` naming ``path``.

    Args:
      path: the file or folder being worked on (named when the OS error names none).
      action: what was being done, as a verb phrase (``"write"``, ``"create the folder"``).
      hint: what the user can do, appended after a semicolon.
    """
    try:
        yield
    except OSError as err:
        where = err.filename if err.filename is not None else path
        raise StorageError(
            f"cannot {action} {where}: {os_reason(err)}; {hint}.", path=str(where), errno=err.errno
        ) from err


def write_atomically(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file, ``fsync`` and a rename.

    Raises:
      StorageError: naming ``path`` and the OS reason (the temporary file is removed).
    """
    body = data.encode("utf-8") if isinstance(data, str) else data
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with storage_errors(path):
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        _fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_json_atomically(
    path: str, payload: Any, *, indent: int | None = 2, default: Any = None
) -> None:
    """:func:`write_atomically` of ``payload`` as JSON (with a final newline); ``default``
    as in :func:`json.dumps` (e.g. ``str`` for values JSON has no type for)."""
    write_atomically(path, json.dumps(payload, indent=indent, default=default) + "\n")


def _fsync_folder(folder: str) -> None:
    """Make a rename durable (best effort: some file systems cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_figure_atomically(figure: Any, path: str, **savefig_kwargs: Any) -> None:
    """Render a matplotlib ``figure`` in memory (format from ``path``'s suffix) and
    :func:`write_atomically` it, so a crash or a full disk never leaves a cut image."""
    buffer = io.BytesIO()
    suffix = os.path.splitext(path)[1].lstrip(".") or "png"
    figure.savefig(buffer, format=suffix, **savefig_kwargs)
    write_atomically(path, buffer.getvalue())


def short_error(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (TensorStore errors span dozens of lines)."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(err).__name__}: {first}"
