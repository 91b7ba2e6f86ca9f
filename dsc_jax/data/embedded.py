"""The default offline corpus: the running Python's standard-library ``*.py`` files.

Files are listed under ``sysconfig.get_paths()["stdlib"]`` in sorted relative-path order,
skipping ``site-packages``/``dist-packages``, test folders and caches. A file is a validation
file when the first 32 bits of ``sha1(relative path)``, read as a fraction of ``2**32``, fall
below ``validation_fraction`` -- a split that depends only on the path, not on the machine's
file order or on the other files. Train and validation files are then taken in sorted order
until their byte budgets (``(1 - f) * max_bytes`` and ``f * max_bytes``) are reached. Files
that are not valid UTF-8 are skipped. Each file's text ends with ``"\\n"`` in the corpus.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from typing import Any

from dsc_jax.data.text_io import take_chars

SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
)


def stdlib_root() -> str:
    """The running interpreter's standard-library folder."""
    return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: str | None = None) -> list[tuple[str, int, int]]:
    """``(relative posix path, size, mtime_ns)`` of the stdlib's ``*.py`` files, sorted by path."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                out.append((rel, st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def is_validation_file(rel_path: str, validation_fraction: float) -> bool:
    """Stable split: ``sha1(rel_path)``'s first 32 bits / 2**32 < ``validation_fraction``."""
    h = int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:8], 16)
    return h / 2**32 < validation_fraction


class EmbeddedSource:
    """Standard-library Python files as a text corpus (train/validation split by path hash)."""

    has_validation_split = True

    def __init__(self, max_bytes: int, validation_fraction: float, root: str | None = None):
        self.root = root or stdlib_root()
        files = list_stdlib_files(self.root)
        if not files:
            raise ValueError(
                f"data.source='embedded': no *.py files under {self.root!r}; "
                "use source 'text_files' instead."
            )
        budgets = {
            "train": max_bytes * (1.0 - validation_fraction),
            "validation": max_bytes * validation_fraction,
        }
        self.files: dict[str, list[tuple[str, int, int]]] = {"train": [], "validation": []}
        used = {"train": 0, "validation": 0}
        for entry in files:
            part = "validation" if is_validation_file(entry[0], validation_fraction) else "train"
            if used[part] < budgets[part]:
                self.files[part].append(entry)
                used[part] += entry[1]

    def identity(self) -> dict[str, Any]:
        """What the token cache key hashes: interpreter, folder, chosen files' sizes and mtimes."""
        listing = repr(sorted(self.files.items())).encode()
        return {
            "kind": "embedded",
            "python": sys.version,
            "root": self.root,
            "files_sha1": hashlib.sha1(listing).hexdigest(),
        }

    def _texts(self, entries: list[tuple[str, int, int]]) -> list[str]:
        texts = []
        for rel, _, _ in entries:
            with open(os.path.join(self.root, rel), "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            texts.append(text if text.endswith("\n") else text + "\n")
        return texts

    def read(self, part: str, max_chars: int | None) -> str:
        """Text of ``part`` ("train", "validation" or "all": both, in path order)."""
        if part == "all":
            entries = sorted(self.files["train"] + self.files["validation"])
        else:
            entries = self.files[part]
        return take_chars(self._texts(entries), max_chars)
