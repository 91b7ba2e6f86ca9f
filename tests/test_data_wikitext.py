"""TFDS builder ``wikitext103`` on a small fake archive of the real layout; ``tfds:NAME``."""

import re
import sys
import zipfile

import numpy as np
import pytest

from dsc_jax.data import build_data
from dsc_jax.data import wikitext103 as wt
from dsc_jax.data.augment import CALC_LINE_RE

SPLITS = {"train": 3000, "valid": 600, "test": 300}


def _fake_split(name, n_lines):
    rng = np.random.default_rng(len(name))
    words = ["the", "lobster", "Ωmega", "is", "a", "species", ",", "of", "crab", "1.5"]
    lines = []
    for i in range(n_lines):
        if i % 40 == 0:
            lines.append(f" = {name.title()} heading {i} = ")
        elif i % 3 == 0:
            lines.append(" ")
        else:
            lines.append(" " + " ".join(rng.choice(words, size=rng.integers(1, 40))) + " ")
    return "\n".join(lines) + "\n"


def _write_folder(root):
    folder = root / "wikitext-103-raw"
    folder.mkdir(parents=True)
    texts = {}
    for split, n in SPLITS.items():
        texts[split] = _fake_split(split, n)
        (folder / f"wiki.{split}.raw").write_bytes(texts[split].encode("utf-8"))
    return folder, texts


@pytest.fixture
def archive(tmp_path):
    """``(zip path, {split: text})`` with ``wikitext-103-raw/wiki.{train,valid,test}.raw``."""
    folder, texts = _write_folder(tmp_path / "src")
    zpath = tmp_path / "wikitext-103-raw-v1.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"wikitext-103-raw/{f.name}")
    return zpath, texts


def _read(builder, split):
    from dsc_jax.data.sources import TfdsSource

    source = TfdsSource(builder, "text", {"train": split}, "wikitext103")
    return source.read("train", None)


def test_builder_from_zip_is_exact_and_tf_free(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(wt, "CHUNK_CHARS", 5000)
    zpath, texts = archive
    builder = wt.prepare(str(tmp_path / "tfds"), str(zpath))
    splits = builder.info.splits
    assert set(splits) == {"train", "validation", "test"}
    assert splits["train"].num_examples > 10
    assert builder.info.disable_shuffling
    assert list((tmp_path / "tfds" / "wikitext103" / "1.0.0").glob("*.array_record*"))
    assert _read(builder, "train") == texts["train"]
    assert _read(builder, "validation") == texts["valid"]
    assert _read(builder, "test") == texts["test"]
    import tensorflow_datasets as tfds

    ds = tfds.data_source("wikitext103", split="validation", data_dir=str(tmp_path / "tfds"))
    assert ds[0]["text"].decode().startswith(" = Valid heading 0 = \n")
    assert "tensorflow" not in sys.modules


def test_builder_from_extracted_folder_and_manual_dir(tmp_path):
    folder, texts = _write_folder(tmp_path / "extracted")
    for arg in (folder, folder.parent):  # the wikitext-103-raw/ folder or its parent
        data_dir = tmp_path / f"tfds_{arg.name}"
        builder = wt.prepare(str(data_dir), str(arg))
        assert _read(builder, "validation") == texts["valid"]
    manual_root = tmp_path / "tfds_manual"
    _write_folder(manual_root / "downloads" / "manual")
    builder = wt.prepare(str(manual_root), None, allow_download=False)
    assert _read(builder, "train") == texts["train"]


def test_iter_line_chunks_cut_at_line_ends():
    text = "".join(f"line {i} " * (i % 7 + 1) + "\n" for i in range(500))
    import io

    chunks = list(wt.iter_line_chunks(lambda: io.BytesIO(text.encode()), "x", 300))
    assert "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks)
    assert len(chunks) > 10


def test_missing_data_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*wikitext-103-raw-v1\.zip"):
        wt.prepare(str(tmp_path / "tfds"), str(tmp_path / "nowhere.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks wiki\.train\.raw, wiki\.valid\.raw"):
        wt.prepare(str(tmp_path / "tfds"), str(tmp_path / "empty"))
    with pytest.raises(
        FileNotFoundError, match=r"(?s)downloads/manual.*wikitext_download is False"
    ):
        wt.prepare(str(tmp_path / "tfds2"), None, allow_download=False)
    not_zip = tmp_path / "wikitext-103-raw-v1.zip"
    not_zip.write_text("not a zip")
    with pytest.raises(FileNotFoundError, match="is not a zip archive"):
        wt.prepare(str(tmp_path / "tfds3"), str(not_zip))


def test_download_fails_fast_when_host_unresolvable(tmp_path, monkeypatch):
    monkeypatch.setattr(wt, "URL", "https://dsc-jax-test.invalid/wikitext-103-raw-v1.zip")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FileNotFoundError, match=r"(?s)downloading .*failed.*data\.wikitext_dir"):
        wt.prepare(str(tmp_path / "tfds"), None, allow_download=True)


def test_invalid_utf8_in_archive_names_file_and_offset(tmp_path):
    folder, _ = _write_folder(tmp_path / "src")
    (folder / "wiki.valid.raw").write_bytes(b" = A = \n bad \xff byte\n")
    with pytest.raises(ValueError, match=r"wiki\.valid\.raw: invalid UTF-8 at byte offset 13"):
        wt.prepare(str(tmp_path / "tfds"), str(folder))


def test_build_data_wikitext103_paper_pipeline(archive, tmp_path):
    zpath, texts = archive
    cfg = {
        "source": "wikitext103",
        "wikitext_dir": str(zpath),
        "tfds_data_dir": str(tmp_path / "tfds"),
        "pipeline": "paper",
        "cache_dir": str(tmp_path / "cache"),
    }
    bundle = build_data(cfg, seq_len=64, global_batch_size=4, seed=0)
    assert bundle.vocab_size == 256 and not bundle.from_cache
    text = bundle.tokenizer.decode(bundle.train_tokens)
    lines = text.split("\n")
    assert all(len(line) > 10 for line in lines[:-1])
    calc = [line for line in lines if line.startswith("Calc:")]
    assert calc and all(CALC_LINE_RE.match(line) for line in calc)
    # Train = first 90 % of the augmented train-file tokens: it starts with the file's start.
    assert text.startswith(" = Train heading 0 = \n")
    # Validation = last 10 % of the augmented valid-file tokens: it ends the valid file.
    tail = bundle.tokenizer.decode(bundle.validation_tokens)
    last_line = texts["valid"].rstrip("\n").split("\n")[-1]
    assert tail.endswith(last_line) or re.search(r"Calc: [0-9 +=]+$", tail)
    again = build_data(cfg, seq_len=64, global_batch_size=4, seed=0)
    assert again.from_cache
    np.testing.assert_array_equal(again.train_tokens, bundle.train_tokens)


def test_tfds_name_source_reads_prepared_dataset(archive, tmp_path):
    zpath, texts = archive
    wt.prepare(str(tmp_path / "tfds"), str(zpath))
    cfg = {
        "source": "tfds:wikitext103",
        "tfds_data_dir": str(tmp_path / "tfds"),
        "cache_dir": "",
        "max_chars": 0,
    }
    bundle = build_data(cfg, seq_len=32, global_batch_size=2, seed=0)
    assert bundle.tokenizer.decode(bundle.train_tokens) == texts["train"]
    assert bundle.tokenizer.decode(bundle.validation_tokens) == texts["valid"]
    with pytest.raises(ValueError, match=r"tfds_text_feature='content'.*features are \['text'\]"):
        build_data({**cfg, "tfds_text_feature": "content"}, seq_len=8, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"tfds_validation_split='dev'.*prepared splits"):
        build_data({**cfg, "tfds_validation_split": "dev"}, seq_len=8, global_batch_size=1, seed=0)


def test_tfds_name_source_not_prepared(tmp_path):
    cfg = {"source": "tfds:wikitext103", "tfds_data_dir": str(tmp_path / "none")}
    with pytest.raises(FileNotFoundError, match="not prepared"):
        build_data(cfg, seq_len=8, global_batch_size=1, seed=0)
