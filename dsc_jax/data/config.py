"""Data configuration: defaults (``config.data``) and validation with clear errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from dsc_jax._checks import check_choice, check_positive_int, check_probability

OWNER = "data"
SOURCES = ("embedded", "wikitext103", "text_files", "tfds:<name>")
TOKENIZERS = ("byte", "gpt2")
PIPELINES = ("standard", "paper")


def default_data_config() -> ml_collections.ConfigDict:
    """The ``config.data`` block with its defaults (every key documented inline)."""
    c = ml_collections.ConfigDict()
    # Where the text comes from:
    #   "embedded"    the running Python's standard-library *.py files (always there, offline);
    #   "wikitext103" WikiText-103 raw through the TFDS builder in dsc_jax/data/wikitext103.py;
    #   "text_files"  local UTF-8 text files named by `paths`;
    #   "tfds:NAME"   any TFDS text dataset already prepared (array_record) under `tfds_data_dir`.
    c.source = "embedded"
    # text_files: list of files/globs, or one comma-separated string of them. Globs are sorted;
    # explicit files keep the given order.
    c.paths = config_dict.placeholder(object)
    # "byte" (UTF-8 bytes, vocab 256) or "gpt2" (GPT-2 BPE through tiktoken, vocab 50257 -> 50304).
    c.tokenizer = "byte"
    # Folder holding GPT-2's encoder.json + vocab.bpe (works offline). None: tiktoken's own
    # cache/download of the "gpt2" encoding.
    c.gpt2_bpe_dir = config_dict.placeholder(str)
    # WikiText-103: a local wikitext-103-raw-v1.zip, or a folder holding it, its extracted
    # wikitext-103-raw/ folder, or the wiki.{train,valid,test}.raw files. None: look in TFDS's
    # manual dir (<tfds_data_dir>/downloads/manual), then download (see `wikitext_download`).
    c.wikitext_dir = config_dict.placeholder(str)
    # WikiText-103: allow downloading the public archive when no local copy is found.
    c.wikitext_download = True
    # TFDS data_dir for "wikitext103" and "tfds:NAME" (None: TFDS's default ~/tensorflow_datasets).
    c.tfds_data_dir = config_dict.placeholder(str)
    # tfds:NAME: the string feature holding the text, and the two splits used.
    c.tfds_text_feature = "text"
    c.tfds_train_split = "train"
    c.tfds_validation_split = "validation"
    # "standard": train on the train split, validate on the validation split, no augmentation.
    # "paper": the paper's reference pipeline (line filter, "Calc:" lines, 90 % of train
    # tokens, last 10 % of valid).
    c.pipeline = "standard"
    # Read at most this many characters of each split's raw text (0 or None: everything).
    c.max_chars = 20_000_000
    # paper: probability of a "Calc: a + b + c = s" line after each kept line.
    c.calc_prob = 0.15
    # paper: keep only lines with more than this many characters.
    c.min_line_chars = 10
    # paper: train = first `train_fraction` of the train-text tokens; validation = the tokens of
    # the validation text after its first `train_fraction` (i.e. its last 10 % by default).
    c.train_fraction = 0.9
    # paper: seed of the "Calc:" insertion (not the training seed; part of the cache key).
    c.augment_seed = 0
    # standard pipeline, sources without their own validation split: share held out.
    # text_files: the last share of every file (cut at a line start); embedded: whole files
    # chosen by a stable hash of their relative path.
    c.validation_fraction = 0.1
    # embedded: cap on the corpus size in bytes (split between train and validation files).
    c.embedded_max_bytes = 20_000_000
    # Token cache folder (memory-mapped .npy files). None or "": no cache, tokenise every run.
    c.cache_dir = "~/.cache/dsc_jax/tokens"
    return c


def as_plain_dict(cfg: Any) -> dict[str, Any]:
    """Defaults overlaid with ``cfg`` (ConfigDict or mapping) as a plain ``dict``."""
    out = default_data_config().to_dict()
    items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = sorted(set(items) - set(out))
    if unknown:
        raise ValueError(
            f"{OWNER}: unknown key(s) {unknown}; expected keys among {tuple(sorted(out))}."
        )
    out.update(items)
    return out


def unread_keys(cfg: Any) -> dict[str, str]:
    """The keys of ``config.data`` that the data of ``cfg`` does not depend on, given its
    ``source``, ``pipeline`` and ``tokenizer`` (e.g. ``paths`` unless ``source`` is
    ``"text_files"``), each with the reason. Everything else may change the tokens."""
    d = as_plain_dict(cfg)
    source, pipeline = d["source"], d["pipeline"]
    tfds = isinstance(source, str) and source.startswith("tfds:")
    out: dict[str, str] = {}

    def unread(keys: tuple[str, ...], reason: str) -> None:
        out.update({key: reason for key in keys})

    if source != "text_files":
        unread(("paths",), f"only source='text_files' reads it (source={source!r})")
    if source not in ("embedded", "text_files"):
        reason = f"only sources 'embedded' and 'text_files' read it (source={source!r})"
        unread(("validation_fraction",), reason)
    if source != "embedded":
        unread(("embedded_max_bytes",), f"only source='embedded' reads it (source={source!r})")
    if source != "wikitext103":
        reason = f"only source='wikitext103' reads it (source={source!r})"
        unread(("wikitext_dir", "wikitext_download"), reason)
        if not tfds:
            reason = f"only sources 'wikitext103' and 'tfds:<name>' read it (source={source!r})"
            unread(("tfds_data_dir",), reason)
    if not tfds:
        reason = f"only sources 'tfds:<name>' read it (source={source!r})"
        unread(("tfds_text_feature", "tfds_train_split", "tfds_validation_split"), reason)
    if pipeline != "paper":
        reason = f"only pipeline='paper' reads it (pipeline={pipeline!r})"
        unread(("calc_prob", "min_line_chars", "train_fraction", "augment_seed"), reason)
    if d["tokenizer"] != "gpt2":
        unread(("gpt2_bpe_dir",), f"only tokenizer='gpt2' reads it (tokenizer={d['tokenizer']!r})")
    return out


def split_paths(paths: Any) -> list[str]:
    """``paths`` (comma-separated string, or sequence of strings) as a list of non-empty strings."""
    if paths is None:
        return []
    if isinstance(paths, str):
        return [p.strip() for p in paths.split(",") if p.strip()]
    if isinstance(paths, Sequence) and all(isinstance(p, str) for p in paths):
        return [p.strip() for p in paths if p.strip()]
    raise ValueError(
        f"{OWNER}.paths={paths!r} is invalid; expected a list of file paths/globs "
        "or one comma-separated string."
    )


def _check_fraction(field: str, value: Any) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value < 1.0
    if not ok:
        raise ValueError(f"{OWNER}.{field}={value!r} is invalid; expected 0 < value < 1.")


def _check_optional_str(field: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{OWNER}.{field}={value!r} is invalid; expected a path string or None.")


def validate_data_config(cfg: Any) -> None:
    """Raise ``ValueError`` (naming key, bad value and what is allowed) on a bad ``config.data``."""
    d = as_plain_dict(cfg)
    source = d["source"]
    if not isinstance(source, str) or not (
        source in SOURCES[:3] or (source.startswith("tfds:") and len(source) > len("tfds:"))
    ):
        raise ValueError(f"{OWNER}.source={source!r} is not allowed; expected one of {SOURCES}.")
    check_choice(OWNER, "tokenizer", d["tokenizer"], TOKENIZERS)
    check_choice(OWNER, "pipeline", d["pipeline"], PIPELINES)
    if source == "text_files" and not split_paths(d["paths"]):
        raise ValueError(
            f"{OWNER}.paths={d['paths']!r} is invalid for source 'text_files'; "
            "expected at least one file path or glob."
        )
    split_paths(d["paths"])
    max_chars = d["max_chars"]
    if max_chars is not None and max_chars != 0:
        check_positive_int(OWNER, "max_chars", max_chars)
    check_probability(OWNER, "calc_prob", d["calc_prob"])
    check_positive_int(OWNER, "min_line_chars", d["min_line_chars"], minimum=0)
    check_positive_int(OWNER, "augment_seed", d["augment_seed"], minimum=0)
    check_positive_int(OWNER, "embedded_max_bytes", d["embedded_max_bytes"])
    _check_fraction("train_fraction", d["train_fraction"])
    _check_fraction("validation_fraction", d["validation_fraction"])
    check_choice(OWNER, "wikitext_download", d["wikitext_download"], (True, False))
    for key in ("gpt2_bpe_dir", "wikitext_dir", "tfds_data_dir", "cache_dir"):
        _check_optional_str(key, d[key])
    for key in ("tfds_text_feature", "tfds_train_split", "tfds_validation_split"):
        if not isinstance(d[key], str) or not d[key]:
            raise ValueError(f"{OWNER}.{key}={d[key]!r} is invalid; expected a non-empty string.")
