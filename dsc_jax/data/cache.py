"""Token cache: tokenised corpora as memory-mapped ``.npy`` files, keyed by what made them.

Layout: ``<cache_dir>/<key>/{train.npy, validation.npy, meta.json}``. ``key`` is a SHA-256 of
the JSON of everything that determines the tokens (source identity, tokeniser, pipeline and
its options, cache format version), so a changed option never reuses a stale entry. Every file
is written to a temporary name and moved into place with ``os.replace``; ``meta.json`` is
written last and marks a complete entry, so concurrent writers (several processes of one job)
and interrupted runs are safe. An entry damaged afterwards (an empty or truncated file, a
disk that filled) is detected on load, named in a warning, and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
PARTS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype: ``uint16`` when every id fits (vocab <= 65536), else ``int32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def cache_key(spec: dict[str, Any]) -> str:
    """Hex SHA-256 (first 32 digits) of ``spec`` as canonical JSON."""
    blob = json.dumps(
        {"cache_format": CACHE_FORMAT_VERSION, **spec}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _atomic_write(path: str, write: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class TokenCache:
    """Read/write tokenised corpora under ``cache_dir`` (``None`` or ``""``: disabled)."""

    def __init__(self, cache_dir: str | None) -> None:
        self.root = os.path.expanduser(cache_dir) if cache_dir else None

    @property
    def enabled(self) -> bool:
        """Whether a folder is configured."""
        return self.root is not None

    def entry_dir(self, key: str) -> str:
        """Folder of one entry."""
        if self.root is None:
            raise ValueError("token cache is disabled (data.cache_dir is empty)")
        return os.path.join(self.root, key)

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """Memory-mapped ``{"train": [N_t], "validation": [N_v]}``, or ``None`` on a miss.

        A damaged entry (an unreadable ``meta.json``, a missing, empty, truncated or foreign
        ``.npy`` file, or one whose length or dtype differs from what ``meta.json`` recorded)
        is also a miss, with one warning naming the file: the caller rebuilds it.
        """
        if self.root is None:
            return None
        folder = self.entry_dir(key)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            return None  # never written, or still being written (meta.json comes last)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            return self._damaged(meta_path, f"{type(err).__name__}: {err}")
        arrays = {}
        for part in PARTS:
            path = os.path.join(folder, f"{part}.npy")
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as err:  # EOFError: an empty file
                return self._damaged(path, f"{type(err).__name__}: {err}")
            expected = (meta.get("num_tokens") or {}).get(part)
            dtype = meta.get("dtype")
            if (
                arr.ndim != 1
                or arr.size == 0
                or (expected is not None and arr.size != expected)
                or (dtype is not None and arr.dtype.name != dtype)
            ):
                return self._damaged(
                    path,
                    f"holds {arr.shape} {arr.dtype.name}; meta.json records {expected} tokens "
                    f"of {dtype}",
                )
            arrays[part] = arr
        return arrays

    @staticmethod
    def _damaged(path: str, reason: str) -> None:
        logger.warning("token cache file %s is damaged (%s); rebuilding its entry", path, reason)
        return None

    def save(
        self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """Write ``arrays`` (1-D, non-empty) and ``meta`` atomically; return them memory-mapped.

        With the cache disabled, returns ``arrays`` unchanged.
        """
        if self.root is None:
            return arrays
        folder = self.entry_dir(key)
        os.makedirs(folder, exist_ok=True)
        for part in PARTS:
            arr = np.ascontiguousarray(arrays[part])
            _atomic_write(
                os.path.join(folder, f"{part}.npy"), lambda f, a=arr: np.save(f, a, False)
            )
        body = json.dumps(meta, indent=1, sort_keys=True).encode("utf-8")
        _atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(body))
        loaded = self.load(key)
        if loaded is None:
            raise OSError(f"token cache: could not read back the entry just written in {folder}")
        return loaded
