"""Reading text: strict UTF-8 with the failing byte offset, path/glob expansion, char caps."""

from __future__ import annotations

import codecs
import glob
import os
import re
from collections.abc import Iterable, Iterator
from typing import BinaryIO

_BLOCK = 1 << 20
_ENV_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _utf8_error(name: str, offset: int, err: UnicodeDecodeError) -> ValueError:
    bad = err.object[err.start : err.end]
    return ValueError(
        f"{name}: invalid UTF-8 at byte offset {offset + err.start} ({err.reason}; bytes {bad!r}). "
        "Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
    )


def iter_utf8(stream: BinaryIO, name: str, block: int = _BLOCK) -> Iterator[str]:
    """Decode a binary stream strictly as UTF-8, block by block (newlines untouched).

    Raises:
      ValueError: naming ``name`` and the absolute byte offset of the first invalid byte.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    while True:
        data = stream.read(block)
        final = not data
        try:
            text = decoder.decode(data, final=final)
        except UnicodeDecodeError as err:
            pending = len(decoder.getstate()[0])  # bytes buffered from the previous block
            raise _utf8_error(name, offset - pending, err) from None
        if text:
            yield text
        if final:
            return
        offset += len(data)


def decode_utf8(data: bytes, name: str) -> str:
    """``data`` as text; invalid UTF-8 raises ``ValueError`` naming ``name`` and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(name, 0, err) from None


def take_chars(pieces: Iterable[str], max_chars: int | None) -> str:
    """Concatenate ``pieces`` and keep the first ``max_chars`` characters (``None``/0: all)."""
    if not max_chars:
        return "".join(pieces)
    out: list[str] = []
    have = 0
    for piece in pieces:
        out.append(piece[: max_chars - have])
        have += len(out[-1])
        if have >= max_chars:
            break
    return "".join(out)


def read_text(path: str, max_chars: int | None = None) -> str:
    """Read a UTF-8 file exactly (no newline translation), at most ``max_chars`` characters.

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: the file is not valid UTF-8 (message names file and byte offset).
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"data file {path!r} is a directory; expected a file.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist (or is not a file).")
    with open(path, "rb") as f:
        return take_chars(iter_utf8(f, path), max_chars)


def _expand(pattern: str) -> str:
    """``pattern`` with ``~`` and ``$VAR`` / ``${VAR}`` expanded.

    Raises:
      FileNotFoundError: naming an environment variable the pattern uses that is not set.
    """
    expanded = os.path.expandvars(os.path.expanduser(pattern))
    unset = sorted({m.group(1) or m.group(2) for m in _ENV_VAR.finditer(expanded)})
    if unset:
        raise FileNotFoundError(
            f"data.paths: {pattern!r} names the environment variable(s) {unset}, which are "
            "not set; set them to the data folder (or give the paths themselves)."
        )
    return expanded


def expand_paths(patterns: Iterable[str]) -> list[str]:
    """Expand ``~``, environment variables (``$VAR``) and globs; each glob's matches are
    sorted, explicit files keep their order.

    Raises:
      FileNotFoundError: a pattern matches no file, or names an environment variable that is
        not set (the message names the pattern).
    """
    files: list[str] = []
    for pattern in patterns:
        expanded = _expand(pattern)
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"data.paths: the glob {pattern!r} matches no file.")
            files.extend(matches)
        elif os.path.isfile(expanded):
            files.append(expanded)
        elif os.path.isdir(expanded):
            raise IsADirectoryError(
                f"data.paths: {pattern!r} is a directory; expected a file (or a glob such as "
                f"{os.path.join(pattern, '*.txt')!r})."
            )
        else:
            raise FileNotFoundError(f"data.paths: the file {pattern!r} does not exist.")
    seen: set[str] = set()
    unique = []
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append(key)
    return unique


def file_identity(path: str) -> dict[str, int | str]:
    """Path, size and mtime (ns) of a file: what the token cache key hashes."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
