"""``build_data``: config -> tokeniser, token corpus (cached) and batch iterators."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dsc_jax.data.config import as_plain_dict, validate_data_config
from dsc_jax.data.corpus import load_corpus
from dsc_jax.data.iterators import (
    TrainIterator,
    check_process_split,
    eval_batches,
    num_eval_windows,
)
from dsc_jax.data.sources import make_source
from dsc_jax.data.tokenizers import build_tokenizer


@dataclasses.dataclass
class DataBundle:
    """What the trainer uses (docs/DESIGN.md, "Data interface used by the trainer").

    Attributes:
      vocab_size: model vocabulary (256 for byte; GPT-2's 50257 padded to 50304).
      train: infinite iterator of ``np.int32 [B // P, T + 1]`` with ``get_state``/``set_state``.
      train_tokens: ``[N_train]`` training tokens (uint16, usually memory-mapped).
      validation_tokens: ``[N_valid]`` validation tokens.
      tokenizer: the tokeniser (``encode``/``decode``).
      seq_len: ``T``.
      process_index: this process's index ``p``.
      process_count: number of processes ``P``.
      cache_key: token cache key of this configuration.
      from_cache: whether the tokens came from the cache.
    """

    vocab_size: int
    train: TrainIterator
    train_tokens: np.ndarray
    validation_tokens: np.ndarray
    tokenizer: Any
    seq_len: int
    process_index: int
    process_count: int
    cache_key: str
    from_cache: bool

    def eval_batches(self, num_batches: int, batch_size: int) -> list[np.ndarray]:
        """``num_batches`` fixed batches ``np.int32 [batch_size // P, T + 1]`` of consecutive
        windows from the start of the validation tokens (``batch_size`` is global)."""
        return eval_batches(
            self.validation_tokens,
            seq_len=self.seq_len,
            num_batches=num_batches,
            batch_size=batch_size,
            process_index=self.process_index,
            process_count=self.process_count,
        )

    @property
    def num_eval_windows(self) -> int:
        """How many eval windows the validation tokens hold."""
        return num_eval_windows(len(self.validation_tokens), self.seq_len)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"build_data: {name}={value!r} is invalid; expected an int >= {minimum}.")


def check_token_range(tokens: np.ndarray, vocab_size: int, part: str, cache_key: str) -> None:
    """Raise unless every token id is in ``[0, vocab_size)`` (an id past the vocabulary would
    index outside the embedding table: NaN logits, silently). One pass over the tokens
    (memory-mapped uint16 for cached corpora: ~0.1 s per 100 M tokens)."""
    if len(tokens) == 0:
        return
    top, low = int(np.max(tokens)), int(np.min(tokens))
    if top >= vocab_size or low < 0:
        bad = top if top >= vocab_size else low
        first = int(np.argmax((tokens >= vocab_size) | (tokens < 0)))
        raise ValueError(
            f"the {part} tokens hold id {bad} (first bad id at position {first}) but the "
            f"tokenizer's vocabulary has {vocab_size} ids (0..{vocab_size - 1}); the token "
            f"cache (key {cache_key}) may be stale or from another tokenizer: delete it, or "
            "check the tokenizer."
        )


def build_data(
    data_config: Any,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> DataBundle:
    """Build the data for one run.

    Args:
      data_config: ``config.data`` (ConfigDict or mapping; missing keys take the defaults of
        :func:`dsc_jax.data.config.default_data_config`).
      seq_len: ``T``; batches hold windows of ``T + 1`` tokens.
      global_batch_size: ``B`` over all processes (divisible by ``process_count``).
      seed: training-window seed (batch at step ``s`` uses ``default_rng([seed, s])``).
      process_index: ``jax.process_index()``.
      process_count: ``jax.process_count()``.

    Returns:
      A :class:`DataBundle`.

    Raises:
      ValueError: bad config or sizes, empty corpus, invalid UTF-8, corpus shorter than a window.
      FileNotFoundError: a named file or dataset is missing.
    """
    validate_data_config(data_config)
    d = as_plain_dict(data_config)
    _check_int("seq_len", seq_len, 1)
    _check_int("global_batch_size", global_batch_size, 1)
    _check_int("seed", seed, 0)
    seq_len, global_batch_size, seed = int(seq_len), int(global_batch_size), int(seed)
    check_process_split(global_batch_size, process_index, process_count)
    tokenizer = build_tokenizer(d["tokenizer"], d["gpt2_bpe_dir"])
    corpus = load_corpus(d, make_source(d), tokenizer)
    check_token_range(corpus.train, tokenizer.vocab_size, "training", corpus.key)
    check_token_range(corpus.validation, tokenizer.vocab_size, "validation", corpus.key)
    if len(corpus.validation) < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len} needs {seq_len + 1} tokens per window but the validation "
            f"tokens number only {len(corpus.validation)}; lower seq_len or give more text."
        )
    train = TrainIterator(
        corpus.train,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return DataBundle(
        vocab_size=tokenizer.vocab_size,
        train=train,
        train_tokens=corpus.train,
        validation_tokens=corpus.validation,
        tokenizer=tokenizer,
        seq_len=seq_len,
        process_index=process_index,
        process_count=process_count,
        cache_key=corpus.key,
        from_cache=corpus.from_cache,
    )
