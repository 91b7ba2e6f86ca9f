"""Tokenisers: UTF-8 bytes (vocab 256) and GPT-2 BPE through tiktoken (vocab 50257 -> 50304).

Both map ``str`` to a 1-D ``np.uint16`` array ``[N]`` and back. The model's vocabulary is the
tokeniser's padded to a multiple of 64 (``vocab_size``); ids at or above ``raw_vocab_size`` never
occur in the data and decode to nothing.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

# sha256 of GPT-2's files (the same hashes tiktoken pins for its "gpt2" encoding).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_EOT_ID = 50256
GPT2_RAW_VOCAB = 50257
VOCAB_MULTIPLE = 64

# Chunk boundaries where GPT-2's pre-tokeniser always splits: before an ASCII space or newline
# that follows a printable ASCII non-space character. No pre-token crosses such a point and no
# lookahead sees past it, so encoding chunk by chunk equals encoding the whole text.
_SAFE_BOUNDARY = re.compile(r"(?<=[!-~])[ \n]")
_CHUNK_CHARS = 1 << 20


def pad_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (50257 -> 50304, 256 -> 256)."""
    return -(-n // multiple) * multiple


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokeniser."""

    name: str
    raw_vocab_size: int
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> ``[N]`` uint16 token ids."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids -> text (invalid UTF-8 shown as U+FFFD)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256)."""

    name = "byte"
    raw_vocab_size = 256
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> ``[len(text.encode())]`` uint16 byte values."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Byte ids -> text; ids >= 256 are dropped."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        return bytes(arr[(arr >= 0) & (arr < 256)].astype(np.uint8)).decode("utf-8", "replace")


def split_safe_chunks(text: str, chunk_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` characters at BPE-safe boundaries."""
    pieces = []
    start = 0
    while len(text) - start > chunk_chars:
        match = _SAFE_BOUNDARY.search(text, start + chunk_chars)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


class Gpt2Tokenizer:
    """GPT-2 BPE (tiktoken), ``<|endoftext|>`` = 50256, vocab padded to 50304."""

    name = "gpt2"
    raw_vocab_size = GPT2_RAW_VOCAB
    vocab_size = pad_vocab(GPT2_RAW_VOCAB)
    eot_id = GPT2_EOT_ID

    def __init__(self, encoding: Any) -> None:
        self._enc = encoding

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> ``[N]`` uint16 ids; special-token text is encoded as ordinary text.

        Long texts are encoded in BPE-safe chunks on a few threads (same ids as one call).
        """
        pieces = split_safe_chunks(text)
        threads = max(1, min(8, os.cpu_count() or 1))
        out = []
        for i in range(0, len(pieces), threads):
            batch = self._enc.encode_ordinary_batch(pieces[i : i + threads], num_threads=threads)
            out.extend(np.asarray(ids, dtype=np.uint16) for ids in batch)
        return np.concatenate(out) if out else np.zeros((0,), np.uint16)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; padding ids (>= 50257) are dropped."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        keep = arr[(arr >= 0) & (arr < GPT2_RAW_VOCAB)].tolist()
        return self._enc.decode_bytes(keep).decode("utf-8", "replace")


@functools.lru_cache(maxsize=4)
def _gpt2_encoding(bpe_dir: str | None) -> Any:
    """tiktoken ``Encoding`` for GPT-2, from ``bpe_dir`` (offline) or tiktoken's registry."""
    import tiktoken

    if bpe_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as err:
            raise RuntimeError(
                f"could not load tiktoken's 'gpt2' encoding ({type(err).__name__}: {err}). "
                "Offline, set data.gpt2_bpe_dir to a folder holding GPT-2's encoder.json and "
                "vocab.bpe (https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/)."
            ) from err
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    folder = os.path.expanduser(bpe_dir)
    vocab_bpe = os.path.join(folder, "vocab.bpe")
    encoder_json = os.path.join(folder, "encoder.json")
    missing = [p for p in (encoder_json, vocab_bpe) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"data.gpt2_bpe_dir={bpe_dir!r}: missing {', '.join(missing)}; the folder must hold "
            "GPT-2's encoder.json and vocab.bpe "
            "(https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/)."
        )
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=os.path.abspath(vocab_bpe),
            encoder_json_file=os.path.abspath(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except ValueError as err:
        raise ValueError(
            f"data.gpt2_bpe_dir={bpe_dir!r}: encoder.json/vocab.bpe are not GPT-2's files "
            f"(sha256 mismatch: {err})."
        ) from err
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT_ID},
        explicit_n_vocab=GPT2_RAW_VOCAB,
    )


def build_tokenizer(name: str, gpt2_bpe_dir: str | None = None) -> ByteTokenizer | Gpt2Tokenizer:
    """Tokeniser by config name (``data.tokenizer``)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return Gpt2Tokenizer(_gpt2_encoding(gpt2_bpe_dir))
    raise ValueError(f"data.tokenizer={name!r} is not allowed; expected one of ('byte', 'gpt2').")
