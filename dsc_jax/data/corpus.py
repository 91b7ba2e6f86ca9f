"""Raw text -> train/validation token arrays, through the token cache.

Pipelines (``data.pipeline``):

* ``"standard"``: train = tokens of the source's train text, validation = tokens of its
  validation text; no augmentation.
* ``"paper"`` (the paper's reference code): each raw text (first ``max_chars`` characters)
  goes through
  :func:`dsc_jax.data.augment.paper_augment` (train seeded ``[augment_seed, 0]``, validation
  ``[augment_seed, 1]``) and is tokenised; train = first ``train_fraction`` of the train tokens,
  validation = the validation tokens after their first ``train_fraction``. A source without its
  own validation split (``text_files``) uses its whole text as both, augmented once, so train
  and validation are the two disjoint ends of one token stream.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from dsc_jax.data.augment import paper_augment, paper_slices
from dsc_jax.data.cache import TokenCache, cache_key, token_dtype
from dsc_jax.data.sources import TextSource
from dsc_jax.data.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
    """Token arrays of one configuration.

    Attributes:
      train: ``[N_train]`` token ids (uint16, often a read-only memory map).
      validation: ``[N_valid]`` token ids.
      key: cache key of this configuration.
      from_cache: whether the arrays were read from the token cache.
    """

    train: np.ndarray
    validation: np.ndarray
    key: str
    from_cache: bool


def token_spec(d: dict[str, Any], source: TextSource, tokenizer: Tokenizer) -> dict[str, Any]:
    """Everything that determines the tokens (hashed into the cache key)."""
    spec: dict[str, Any] = {
        "source": source.identity(),
        "tokenizer": tokenizer.name,
        "pipeline": d["pipeline"],
        "max_chars": int(d["max_chars"] or 0),
    }
    if d["source"] in ("embedded", "text_files"):
        spec["validation_fraction"] = float(d["validation_fraction"])
    if d["source"] == "embedded":
        spec["embedded_max_bytes"] = int(d["embedded_max_bytes"])
    if d["pipeline"] == "paper":
        spec["calc_prob"] = float(d["calc_prob"])
        spec["min_line_chars"] = int(d["min_line_chars"])
        spec["train_fraction"] = float(d["train_fraction"])
        spec["augment_seed"] = int(d["augment_seed"])
    return spec


def tokenize_splits(
    d: dict[str, Any], source: TextSource, tokenizer: Tokenizer
) -> dict[str, np.ndarray]:
    """Run the configured pipeline: ``{"train": [N_t], "validation": [N_v]}`` uint16 ids."""
    max_chars = d["max_chars"] or None
    if d["pipeline"] == "standard":
        return {
            part: tokenizer.encode(source.read(part, max_chars)) for part in ("train", "validation")
        }

    def augmented(text: str, split_id: int) -> np.ndarray:
        seed = [int(d["augment_seed"]), split_id]
        return tokenizer.encode(
            paper_augment(
                text, calc_prob=d["calc_prob"], min_line_chars=d["min_line_chars"], seed=seed
            )
        )

    if source.has_validation_split:
        train_tokens = augmented(source.read("train", max_chars), 0)
        valid_tokens = augmented(source.read("validation", max_chars), 1)
    else:
        train_tokens = valid_tokens = augmented(source.read("all", max_chars), 0)
    train, valid = paper_slices(train_tokens, valid_tokens, d["train_fraction"])
    return {"train": train, "validation": valid}


def _check_not_empty(arrays: dict[str, np.ndarray], d: dict[str, Any]) -> None:
    for part, arr in arrays.items():
        if arr.size == 0:
            raise ValueError(
                f"empty corpus: data.source={d['source']!r} (pipeline {d['pipeline']!r}) gave no "
                f"{part} tokens; give more text, or lower data.min_line_chars / change "
                "data.validation_fraction."
            )


def load_corpus(d: dict[str, Any], source: TextSource, tokenizer: Tokenizer) -> TokenCorpus:
    """Tokens for config ``d``: from the cache when present, else built and cached."""
    spec = token_spec(d, source, tokenizer)
    key = cache_key(spec)
    cache = TokenCache(d["cache_dir"])
    cached = cache.load(key)
    if cached is not None:
        return TokenCorpus(cached["train"], cached["validation"], key, True)
    start = time.perf_counter()
    arrays = tokenize_splits(d, source, tokenizer)
    _check_not_empty(arrays, d)
    dtype = token_dtype(tokenizer.vocab_size)
    arrays = {part: np.asarray(arr, dtype=dtype) for part, arr in arrays.items()}
    meta = {
        "spec": spec,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "num_tokens": {part: int(arr.size) for part, arr in arrays.items()},
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    stored = cache.save(key, arrays, meta)
    return TokenCorpus(stored["train"], stored["validation"], key, False)
