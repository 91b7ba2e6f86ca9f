"""Text sources: local files, prepared TFDS datasets, WikiText-103, the embedded corpus.

A source gives raw text per part and a cheap identity for the token cache key:

* ``read(part, max_chars) -> str`` with ``part`` in ``"train"``, ``"validation"`` and, for
  sources without their own validation split (``has_validation_split = False``), ``"all"``;
* ``identity() -> dict`` (JSON-serialisable; changes whenever the text could change).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from dsc_jax.data.config import split_paths
from dsc_jax.data.text_io import decode_utf8, expand_paths, file_identity, read_text, take_chars


class TextSource(Protocol):
    """Raw text per part plus an identity for the cache key."""

    has_validation_split: bool

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description that changes whenever the text may change."""
        ...

    def read(self, part: str, max_chars: int | None) -> str:
        """Raw text of ``part``, at most ``max_chars`` characters (``None``/0: all)."""
        ...


def _with_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def validation_cut(text: str, validation_fraction: float) -> int:
    """Start of a text's last ``validation_fraction`` share, moved back to a line start.

    When no line starts before the nominal cut (a one-line file), the nominal cut is used.
    """
    target = int(len(text) * (1.0 - validation_fraction))
    return text.rfind("\n", 0, target) + 1 or target


class TextFilesSource:
    """Local UTF-8 files. Standard split: the last ``validation_fraction`` of every file
    (from a line start) is validation, the rest train; files are concatenated in order,
    each part ending with ``"\\n"``. Part ``"all"`` is the files' whole text, concatenated.
    """

    has_validation_split = False

    def __init__(self, paths: Any, validation_fraction: float) -> None:
        self.files = expand_paths(split_paths(paths))
        if not self.files:
            raise ValueError(f"data.paths={paths!r} names no file.")
        self.validation_fraction = validation_fraction

    def identity(self) -> dict[str, Any]:
        """Each file's absolute path, size and mtime."""
        return {"kind": "text_files", "files": [file_identity(f) for f in self.files]}

    def read(self, part: str, max_chars: int | None) -> str:
        """Concatenated text of ``part`` over all files (see class doc)."""
        pieces = []
        for path in self.files:
            text = read_text(path)
            if not text:
                raise ValueError(f"data file {path!r} is empty.")
            if part == "all":
                piece = text
            else:
                cut = validation_cut(text, self.validation_fraction)
                piece = text[:cut] if part == "train" else text[cut:]
            pieces.append(_with_newline(piece))
        return take_chars(pieces, max_chars)


class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord, read through ``as_data_source`` (no TF).

    A split's text is its examples' ``text_feature`` in order, each ending with ``"\\n"``.
    """

    has_validation_split = True

    def __init__(self, builder: Any, text_feature: str, splits: dict[str, str], label: str) -> None:
        self.builder = builder
        self.text_feature = text_feature
        self.splits = splits
        self.label = label
        features = builder.info.features
        if features is None or text_feature not in features:
            have = sorted(features.keys()) if features is not None else []
            raise ValueError(
                f"data.tfds_text_feature={text_feature!r}: {label} has no such feature; "
                f"its features are {have}."
            )
        for part, split in splits.items():
            if split not in builder.info.splits:
                raise ValueError(
                    f"data.tfds_{part}_split={split!r}: {label} has no such split; "
                    f"prepared splits are {sorted(builder.info.splits)}."
                )

    def identity(self) -> dict[str, Any]:
        """The prepared folder's files (paths, sizes, mtimes), feature and split names."""
        folder = os.fspath(self.builder.data_dir)
        files = [file_identity(os.path.join(folder, n)) for n in sorted(os.listdir(folder))]
        return {
            "kind": "tfds",
            "name": self.label,
            "files": files,
            "feature": self.text_feature,
            "splits": self.splits,
        }

    def _iter(self, split: str):
        source = self.builder.as_data_source(split=split)
        for start in range(0, len(source), 64):
            records = source.__getitems__(range(start, min(start + 64, len(source))))
            for index, record in enumerate(records, start):
                text = record[self.text_feature]
                if isinstance(text, bytes):
                    text = decode_utf8(text, f"{self.label} split {split!r} record {index}")
                else:
                    text = str(text)
                yield _with_newline(text)

    def read(self, part: str, max_chars: int | None) -> str:
        """Concatenated text of the split mapped to ``part``."""
        return take_chars(self._iter(self.splits[part]), max_chars)


def _tfds_builder(name: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as err:
        raise FileNotFoundError(
            f"data.source='tfds:{name}': TFDS cannot find the dataset under data_dir "
            f"{data_dir or '(TFDS default)'} ({type(err).__name__}: {err}). Prepare it first, "
            f"e.g. `tfds build {name} --file_format=array_record --data_dir=...`."
        ) from err
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"data.source='tfds:{name}': not prepared under {builder.data_dir}. Prepare it "
            f"first with file_format='array_record' (e.g. `tfds build {name} "
            "--file_format=array_record`)."
        )
    return builder


def make_source(d: dict[str, Any]) -> TextSource:
    """The source named by a validated plain config dict ``d`` (see ``config.as_plain_dict``)."""
    source = d["source"]
    if source == "embedded":
        from dsc_jax.data.embedded import EmbeddedSource

        return EmbeddedSource(d["embedded_max_bytes"], d["validation_fraction"])
    if source == "text_files":
        return TextFilesSource(d["paths"], d["validation_fraction"])
    if source == "wikitext103":
        from dsc_jax.data import wikitext103

        builder = wikitext103.prepare(
            d["tfds_data_dir"], d["wikitext_dir"], bool(d["wikitext_download"])
        )
        splits = {"train": "train", "validation": "validation"}
        return TfdsSource(builder, "text", splits, "wikitext103")
    if source.startswith("tfds:"):
        name = source[len("tfds:") :]
        splits = {"train": d["tfds_train_split"], "validation": d["tfds_validation_split"]}
        builder = _tfds_builder(name, d["tfds_data_dir"])
        return TfdsSource(builder, d["tfds_text_feature"], splits, f"tfds:{name}")
    raise ValueError(
        f"data.source={source!r} is not allowed; expected one of "
        "('embedded', 'wikitext103', 'text_files', 'tfds:<name>')."
    )
