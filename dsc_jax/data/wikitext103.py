"""TFDS builder ``wikitext103`` (raw, v1): WikiText-103 as ArrayRecord, read back without TF.

Generation and reading need no TensorFlow: a ``GeneratorBasedBuilder`` with
``file_format="array_record"`` writes ArrayRecord shards, and ``as_data_source`` /
``tfds.data_source`` read them through ``array_record`` (TFDS's TF-less path; GCS metadata
lookups are off by default in this TFDS version).

Each split is stored as its file's exact text, in order (``disable_shuffling=True``), cut into
examples ``{"text": str}`` of about 1M characters that end at a line end; concatenating a
split's examples gives back ``wiki.<split>.raw`` byte for byte.

Where the raw files come from, in order: ``source_path`` (a ``wikitext-103-raw-v1.zip``, a
folder holding it, its extracted ``wikitext-103-raw/`` folder or the ``wiki.*.raw`` files),
TFDS's manual dir (``<data_dir>/downloads/manual``, same layouts), then a download of the
public archive (when allowed).

Prepare once from the shell (useful before a multi-host run)::

    python -m dsc_jax.data.wikitext103 --data_dir ~/tensorflow_datasets \
        --source ~/Downloads/wikitext-103-raw-v1.zip
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import tensorflow_datasets as tfds

from dsc_jax.data.text_io import iter_utf8

URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"
ARCHIVE_NAME = "wikitext-103-raw-v1.zip"
FOLDER_NAME = "wikitext-103-raw"
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
REQUIRED_SPLITS = ("train", "validation")
CHUNK_CHARS = 1 << 20

_INSTRUCTIONS = f"""\
Download {ARCHIVE_NAME} (about 190 MB) from {URL} and either
set data.wikitext_dir to the zip (or to the folder holding it, or to its extracted
{FOLDER_NAME}/ folder), or put the zip or the extracted {FOLDER_NAME}/ folder into
TFDS's manual dir <tfds_data_dir>/downloads/manual/. Needed files: {FOLDER_NAME}/wiki.train.raw and
{FOLDER_NAME}/wiki.valid.raw (wiki.test.raw optional).
"""

Opener = Callable[[], contextlib.AbstractContextManager[BinaryIO]]


@contextlib.contextmanager
def _open_member(archive: str, member: str) -> Iterator[BinaryIO]:
    with zipfile.ZipFile(archive) as zf, zf.open(member) as f:
        yield f


def _zip_openers(archive: str) -> dict[str, tuple[str, Opener]]:
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    found: dict[str, tuple[str, Opener]] = {}
    for split, fname in SPLIT_FILES.items():
        members = sorted((n for n in names if n.rsplit("/", 1)[-1] == fname), key=len)
        if members:
            found[split] = (
                f"{archive}:{members[0]}",
                lambda m=members[0]: _open_member(archive, m),
            )
    return found


def _folder_openers(folder: str) -> dict[str, tuple[str, Opener]]:
    for cand in (folder, os.path.join(folder, FOLDER_NAME)):
        files = {s: os.path.join(cand, f) for s, f in SPLIT_FILES.items()}
        found = {s: p for s, p in files.items() if os.path.isfile(p)}
        if found:
            return {s: (p, lambda p=p: open(p, "rb")) for s, p in found.items()}
    archive = os.path.join(folder, ARCHIVE_NAME)
    return _zip_openers(archive) if os.path.isfile(archive) else {}


def locate_raw_files(path: str) -> dict[str, tuple[str, Opener]]:
    """Map split -> (display name, opener of the raw bytes) for a zip or a folder.

    Raises:
      FileNotFoundError: ``path`` is missing, or lacks ``wiki.train.raw``/``wiki.valid.raw``.
    """
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        if not zipfile.is_zipfile(path):
            raise FileNotFoundError(
                f"WikiText-103: {path!r} is not a zip archive.\n{_INSTRUCTIONS}"
            )
        found = _zip_openers(path)
    elif os.path.isdir(path):
        found = _folder_openers(path)
    else:
        raise FileNotFoundError(f"WikiText-103: {path!r} does not exist.\n{_INSTRUCTIONS}")
    missing = [SPLIT_FILES[s] for s in REQUIRED_SPLITS if s not in found]
    if missing:
        raise FileNotFoundError(
            f"WikiText-103: {path!r} lacks {', '.join(missing)} (looked for "
            f"{FOLDER_NAME}/wiki.*.raw inside a zip, and for wiki.*.raw, {FOLDER_NAME}/ and "
            f"{ARCHIVE_NAME} inside a folder).\n{_INSTRUCTIONS}"
        )
    return found


def _check_resolvable(url: str) -> None:
    """Fail fast offline: TFDS's downloader would retry an unresolvable host for minutes.

    Skipped when a proxy is configured (the proxy resolves the host).
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = urllib.parse.urlparse(url).hostname or ""
    socket.getaddrinfo(host, 443)


def iter_line_chunks(opener: Opener, name: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The file's exact text in pieces of about ``chunk_chars`` characters ending at ``\\n``.

    Raises:
      ValueError: the file is empty or not valid UTF-8 (naming the file and byte offset).
    """
    buffer = ""
    emitted = False
    with opener() as f:
        for piece in iter_utf8(f, name):
            buffer += piece
            while len(buffer) >= chunk_chars:
                cut = buffer.rfind("\n", 0, chunk_chars) + 1 or buffer.find("\n", chunk_chars) + 1
                if cut == 0:
                    break
                yield buffer[:cut]
                emitted = True
                buffer = buffer[cut:]
    if buffer:
        yield buffer
    elif not emitted:
        raise ValueError(f"WikiText-103: {name} is empty.")


class Wikitext103(tfds.core.GeneratorBasedBuilder):
    """WikiText-103 raw v1 (Merity et al., 2016), exact text in ordered ~1M-character examples."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw text, ordered chunks of whole lines."}  # noqa: RUF012
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def __init__(
        self, *, source_path: str | None = None, allow_download: bool = True, **kwargs: Any
    ) -> None:
        """``source_path``: local zip/folder (see module doc); ``kwargs`` go to TFDS."""
        self._source_path = source_path
        self._allow_download = allow_download
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="WikiText-103 raw: the split files' exact text, in order.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/",
            citation="Merity, Xiong, Bradbury, Socher. Pointer Sentinel Mixture Models. 2016.",
            disable_shuffling=True,
        )

    def _find_raw_files(self, dl_manager: Any) -> dict[str, tuple[str, Opener]]:
        if self._source_path is not None:
            return locate_raw_files(self._source_path)
        try:
            manual = str(dl_manager.manual_dir)
        except AssertionError:
            manual = None
        if manual is not None:
            return locate_raw_files(manual)
        if not self._allow_download:
            raise FileNotFoundError(
                "WikiText-103: no local copy (data.wikitext_dir is unset, the manual dir "
                f"{getattr(dl_manager, '_manual_dir', '')} is empty) and data.wikitext_download is "
                f"False.\n{_INSTRUCTIONS}"
            )
        try:
            _check_resolvable(URL)
            archive = dl_manager.download(URL)
        except Exception as err:
            raise FileNotFoundError(
                f"WikiText-103: downloading {URL} failed ({type(err).__name__}: {err}).\n"
                f"{_INSTRUCTIONS}"
            ) from err
        return locate_raw_files(str(archive))

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        found = self._find_raw_files(dl_manager)
        return {split: self._generate_examples(*found[split]) for split in found}

    def _generate_examples(self, name: str, opener: Opener) -> Iterator[tuple[int, dict[str, str]]]:
        for i, chunk in enumerate(iter_line_chunks(opener, name, CHUNK_CHARS)):
            yield i, {"text": chunk}


def prepare(
    data_dir: str | None, source_path: str | None = None, allow_download: bool = True
) -> Wikitext103:
    """Generate the ArrayRecord dataset if absent and return the builder.

    A dataset already prepared under ``data_dir`` is reused as is (whatever ``source_path``
    says); delete ``<data_dir>/wikitext103`` to regenerate it.
    """
    builder = Wikitext103(
        data_dir=os.path.expanduser(data_dir) if data_dir else None,
        file_format="array_record",
        source_path=source_path,
        allow_download=allow_download,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        )
    )
    return builder


def main(argv: list[str] | None = None) -> None:
    """CLI: prepare the dataset (``python -m dsc_jax.data.wikitext103 --help``)."""
    parser = argparse.ArgumentParser(description="Prepare the wikitext103 TFDS dataset.")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default TFDS's own)")
    parser.add_argument("--source", default=None, help="local zip or folder (default: download)")
    args = parser.parse_args(argv)
    builder = prepare(args.data_dir, args.source)
    print(f"prepared {builder.data_dir}: {dict(builder.info.splits)}")


if __name__ == "__main__":
    main()
