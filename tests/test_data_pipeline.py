"""build_data end to end on small local files: augmentation, iterators, resume, multi-host
slices, cache reuse/invalidation, the embedded corpus, global batches and every bad input."""

import itertools
import json
import os

import numpy as np
import pytest

from dsc_jax.data import build_data
from dsc_jax.data.augment import CALC_LINE_RE, paper_augment, paper_slices
from dsc_jax.data.embedded import is_validation_file

LINE = "the quick brown fox jumps over the lazy dog {i}"


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(LINE.format(i=i) + "\n" for i in range(4000)), encoding="utf-8")
    return path


def _cfg(tmp_path, path, **kw):
    return {"source": "text_files", "paths": str(path), "cache_dir": str(tmp_path / "c"), **kw}


# --- paper augmentation -------------------------------------------------------------------


def test_augment_rate_format_and_filter():
    n = 20_000
    text = "\n".join(("short" if i % 5 == 0 else f"a kept line number {i}") for i in range(n))
    out = paper_augment(text, calc_prob=0.15, min_line_chars=10, seed=[0, 0])
    lines = out.split("\n")
    calc = [line for line in lines if line.startswith("Calc:")]
    kept = [line for line in lines if not line.startswith("Calc:")]
    assert len(kept) == n - n // 5 and "short" not in kept
    mean, sd = 0.15 * len(kept), (len(kept) * 0.15 * 0.85) ** 0.5
    assert abs(len(calc) - mean) < 5 * sd
    values = []
    for line in calc:
        m = CALC_LINE_RE.match(line)
        assert m, line
        a, b, c, s = map(int, m.groups())
        assert a + b + c == s and max(a, b, c) <= 99
        values += [a, b, c]
    assert min(values) == 0 and max(values) == 99
    # A Calc line only ever follows a kept line.
    assert not lines[0].startswith("Calc:")
    assert all(
        not (x.startswith("Calc:") and y.startswith("Calc:")) for x, y in itertools.pairwise(lines)
    )
    assert out == paper_augment(text, calc_prob=0.15, min_line_chars=10, seed=[0, 0])
    assert out != paper_augment(text, calc_prob=0.15, min_line_chars=10, seed=[1, 0])


def test_paper_slices_quirk():
    train, valid = paper_slices(np.arange(100), np.arange(1000, 1050), 0.9)
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(valid, np.arange(1045, 1050))


def test_paper_pipeline_on_one_file_splits_one_stream(tmp_path, corpus_file):
    cfg = _cfg(tmp_path, corpus_file, pipeline="paper")
    b = build_data(cfg, seq_len=16, global_batch_size=2, seed=0)
    n_t, n_v = len(b.train_tokens), len(b.validation_tokens)
    assert n_v == pytest.approx(n_t / 9, rel=0.01)
    text = b.tokenizer.decode(np.concatenate([b.train_tokens, b.validation_tokens]))
    assert text.startswith("the quick brown fox jumps over the lazy dog 0\n")
    assert text.endswith("dog 3999") or CALC_LINE_RE.match(text.rsplit("\n", 1)[-1])


# --- iterators ----------------------------------------------------------------------------


def test_train_batches_shape_determinism_and_seed(tmp_path, corpus_file):
    cfg = _cfg(tmp_path, corpus_file)
    a = build_data(cfg, seq_len=32, global_batch_size=8, seed=3)
    b = build_data(cfg, seq_len=32, global_batch_size=8, seed=3)
    c = build_data(cfg, seq_len=32, global_batch_size=8, seed=4)
    xa = [next(a.train) for _ in range(3)]
    xb = [next(b.train) for _ in range(3)]
    assert xa[0].shape == (8, 33) and xa[0].dtype == np.int32
    for x, y in zip(xa, xb, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(xa[0], next(c.train))
    assert not np.array_equal(xa[0], xa[1])
    # Every row is a real window of the training tokens.
    starts = a.train.global_starts(0)
    for row, s in zip(xa[0], starts, strict=True):
        np.testing.assert_array_equal(row, a.train_tokens[s : s + 33])


def test_resume_continues_with_exact_next_batch(tmp_path, corpus_file):
    cfg = _cfg(tmp_path, corpus_file)
    first = build_data(cfg, seq_len=16, global_batch_size=4, seed=0)
    for _ in range(5):
        next(first.train)
    state = json.loads(json.dumps(first.train.get_state()))
    assert state["step"] == 5
    expected = [next(first.train) for _ in range(2)]
    resumed = build_data(cfg, seq_len=16, global_batch_size=4, seed=0)
    resumed.train.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed.train), want)
    other = build_data(cfg, seq_len=16, global_batch_size=4, seed=1)
    with pytest.raises(ValueError, match="seed=0 but this iterator has seed=1"):
        other.train.set_state(state)
    with pytest.raises(ValueError, match="no valid 'step'"):
        other.train.set_state({"step": -1})


def test_multi_host_slices_are_disjoint_and_complete(tmp_path, corpus_file):
    cfg = _cfg(tmp_path, corpus_file)
    whole = build_data(cfg, seq_len=16, global_batch_size=8, seed=7)
    parts = [
        build_data(cfg, seq_len=16, global_batch_size=8, seed=7, process_index=p, process_count=4)
        for p in range(4)
    ]
    for _ in range(3):
        full = next(whole.train)
        rows = [next(p.train) for p in parts]
        assert all(r.shape == (2, 17) for r in rows)
        np.testing.assert_array_equal(np.concatenate(rows), full)
    evals = [p.eval_batches(3, 8) for p in parts]
    for j, full in enumerate(whole.eval_batches(3, 8)):
        np.testing.assert_array_equal(np.concatenate([e[j] for e in evals]), full)


def test_eval_windows_consecutive_non_overlapping(tmp_path, corpus_file):
    b = build_data(_cfg(tmp_path, corpus_file), seq_len=16, global_batch_size=2, seed=0)
    batches = b.eval_batches(3, 4)
    assert len(batches) == 3 and all(x.shape == (4, 17) for x in batches)
    windows = np.concatenate(batches)
    # Inputs tile the stream from its start; each window's last target is the next's first input.
    np.testing.assert_array_equal(windows[:, :-1].reshape(-1), b.validation_tokens[: 12 * 16])
    np.testing.assert_array_equal(windows[:-1, -1], windows[1:, 0])
    for x, y in zip(batches, b.eval_batches(3, 4), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="validation tokens"):
        b.eval_batches(b.num_eval_windows + 1, 1)


def test_text_files_split_is_last_fraction_of_each_file(tmp_path):
    f1, f2 = tmp_path / "a.txt", tmp_path / "b.txt"
    f1.write_text("".join(f"A{i:03d}\n" for i in range(100)))
    f2.write_text("".join(f"B{i:03d}\n" for i in range(100)))
    cfg = _cfg(tmp_path, f"{tmp_path}/*.txt", max_chars=0)
    b = build_data(cfg, seq_len=4, global_batch_size=1, seed=0)
    train, valid = (b.tokenizer.decode(t) for t in (b.train_tokens, b.validation_tokens))
    assert train == "".join(f"A{i:03d}\n" for i in range(90)) + "".join(
        f"B{i:03d}\n" for i in range(90)
    )
    assert valid == "".join(f"A{i:03d}\n" for i in range(90, 100)) + "".join(
        f"B{i:03d}\n" for i in range(90, 100)
    )


# --- cache --------------------------------------------------------------------------------


def test_cache_reuse_and_invalidation(tmp_path, corpus_file):
    cfg = _cfg(tmp_path, corpus_file, pipeline="paper")
    a = build_data(cfg, seq_len=16, global_batch_size=2, seed=0)
    b = build_data(cfg, seq_len=64, global_batch_size=4, seed=9)  # iterator options: same tokens
    assert not a.from_cache and b.from_cache and a.cache_key == b.cache_key
    assert isinstance(b.train_tokens, np.memmap) and b.train_tokens.dtype == np.uint16
    entry = tmp_path / "c" / a.cache_key
    assert sorted(os.listdir(entry)) == ["meta.json", "train.npy", "validation.npy"]
    keys = {a.cache_key}
    for change in ({"calc_prob": 0.3}, {"augment_seed": 1}, {"max_chars": 5000}):
        c = build_data({**cfg, **change}, seq_len=16, global_batch_size=2, seed=0)
        assert not c.from_cache and c.cache_key not in keys, change
        keys.add(c.cache_key)
    # Editing the file changes its size/mtime: a new entry with the new text.
    corpus_file.write_text(corpus_file.read_text() + "one more line of text here\n")
    d = build_data(cfg, seq_len=16, global_batch_size=2, seed=0)
    assert not d.from_cache and d.cache_key not in keys
    # No cache folder: nothing written.
    e = build_data({**cfg, "cache_dir": ""}, seq_len=16, global_batch_size=2, seed=0)
    assert not e.from_cache and e.cache_key == d.cache_key


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("train.npy", b""),  # zero bytes: "EOFError: No data left in file" before
        ("validation.npy", None),  # truncated to half
        ("meta.json", b""),
    ],
)
def test_damaged_cache_entry_is_named_and_rebuilt(tmp_path, corpus_file, caplog, name, damage):
    cfg = _cfg(tmp_path, corpus_file)
    a = build_data(cfg, seq_len=16, global_batch_size=2, seed=0)
    key, want = a.cache_key, np.array(a.train_tokens)  # a copy: the file is damaged in place
    del a
    path = tmp_path / "c" / key / name
    body = path.read_bytes()
    path.write_bytes(body[: len(body) // 2] if damage is None else damage)
    b = build_data(cfg, seq_len=16, global_batch_size=2, seed=0)
    assert not b.from_cache and b.cache_key == key
    assert np.array_equal(b.train_tokens, want)
    [warning] = [r.getMessage() for r in caplog.records if "token cache" in r.getMessage()]
    assert f"token cache file {path} is damaged" in warning and "rebuilding" in warning
    if name == "meta.json":  # rebuilt; its build time is the one field that may differ
        rebuilt, before = json.loads(path.read_bytes()), json.loads(body)
        assert rebuilt.pop("build_seconds") >= 0 and before.pop("build_seconds") >= 0
        assert rebuilt == before
    else:
        assert path.read_bytes() == body  # rebuilt
    assert build_data(cfg, seq_len=16, global_batch_size=2, seed=0).from_cache


# --- embedded corpus and global batches ----------------------------------------------------


def test_embedded_corpus_small(tmp_path):
    cfg = {"embedded_max_bytes": 400_000, "cache_dir": str(tmp_path / "c")}
    b = build_data(cfg, seq_len=64, global_batch_size=4, seed=0)
    assert b.vocab_size == 256
    assert len(b.train_tokens) > 300_000 and 20_000 < len(b.validation_tokens) < 200_000
    assert "def " in b.tokenizer.decode(b.train_tokens[:200_000])
    again = build_data(cfg, seq_len=64, global_batch_size=4, seed=0)
    assert again.from_cache and again.cache_key == b.cache_key
    assert is_validation_file("os.py", 1.0) and not is_validation_file("os.py", 1e-12)


# --- bad inputs ---------------------------------------------------------------------------


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt' does not exist"):
        build_data(_cfg(tmp_path, tmp_path / "nope.txt"), seq_len=4, global_batch_size=1, seed=0)
    with pytest.raises(FileNotFoundError, match=r"glob '.*\*\.md' matches no file"):
        build_data(_cfg(tmp_path, f"{tmp_path}/*.md"), seq_len=4, global_batch_size=1, seed=0)


def test_directory_as_data_path_says_directory(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"texts' is a directory; expected a file"):
        build_data(_cfg(tmp_path, folder), seq_len=4, global_batch_size=1, seed=0)
    from dsc_jax.data.text_io import read_text

    with pytest.raises(IsADirectoryError, match="is a directory; expected a file"):
        read_text(str(folder))


def test_token_ids_past_the_vocabulary_are_refused(tmp_path, corpus_file, monkeypatch):
    """Ids >= vocab_size used to reach the model (NaN logits, silently)."""
    from dsc_jax.data import pipeline
    from dsc_jax.data.corpus import TokenCorpus

    real_load = pipeline.load_corpus

    def with_bad_id(*args, **kwargs):
        corpus = real_load(*args, **kwargs)
        train = np.array(corpus.train, dtype=np.uint16)
        train[123] = 300  # byte tokenizer: vocabulary 0..255
        return TokenCorpus(train, corpus.validation, corpus.key, corpus.from_cache)

    monkeypatch.setattr(pipeline, "load_corpus", with_bad_id)
    with pytest.raises(ValueError, match=r"training tokens hold id 300 .*position 123.*256 ids"):
        build_data(_cfg(tmp_path, corpus_file), seq_len=4, global_batch_size=1, seed=0)


def test_empty_file_and_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt' is empty"):
        build_data(_cfg(tmp_path, empty), seq_len=4, global_batch_size=1, seed=0)
    short = tmp_path / "short.txt"
    short.write_text("tiny\nlines\nonly\n")  # the paper filter keeps nothing
    with pytest.raises(ValueError, match=r"empty corpus.*no train tokens"):
        build_data(_cfg(tmp_path, short, pipeline="paper"), seq_len=4, global_batch_size=1, seed=0)


def test_invalid_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello world\ncaf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"latin1\.txt: invalid UTF-8 at byte offset 15"):
        build_data(_cfg(tmp_path, bad), seq_len=4, global_batch_size=1, seed=0)


def test_decode_utf8_names_the_record():
    from dsc_jax.data.text_io import decode_utf8

    assert decode_utf8("café".encode(), "wikitext103 split 'train' record 0") == "café"
    with pytest.raises(ValueError, match=r"record 3: invalid UTF-8 at byte offset 3"):
        decode_utf8(b"caf\xe9", "wikitext103 split 'train' record 3")


def test_sequence_longer_than_corpus(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("".join(f"line {i}\n" for i in range(20)))
    with pytest.raises(ValueError, match="seq_len=1000 needs 1001 tokens"):
        build_data(_cfg(tmp_path, small), seq_len=1000, global_batch_size=1, seed=0)


def test_bad_sizes_and_unknown_source(tmp_path, corpus_file):
    cfg = _cfg(tmp_path, corpus_file)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by process_count 4"):
        build_data(cfg, seq_len=8, global_batch_size=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=4 is invalid"):
        build_data(cfg, seq_len=8, global_batch_size=8, seed=0, process_index=4, process_count=4)
    with pytest.raises(ValueError, match="seq_len=0 is invalid"):
        build_data(cfg, seq_len=0, global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="seed=-1 is invalid"):
        build_data(cfg, seq_len=8, global_batch_size=8, seed=-1)
    with pytest.raises(ValueError, match=r"data\.source='openwebtext' is not allowed"):
        build_data({"source": "openwebtext"}, seq_len=8, global_batch_size=8, seed=0)
    b = build_data(cfg, seq_len=8, global_batch_size=8, seed=0, process_count=2)
    with pytest.raises(ValueError, match="eval batch size 3 is not divisible by process_count 2"):
        b.eval_batches(1, 3)


def test_data_paths_expand_environment_variables_or_name_the_unset_one(tmp_path, monkeypatch):
    """A data root comes from the config or an environment variable, never a default path."""
    from dsc_jax.data.text_io import expand_paths

    (tmp_path / "a.txt").write_text("x")
    monkeypatch.setenv("DSC_TEST_DATA_ROOT", str(tmp_path))
    assert expand_paths(["$DSC_TEST_DATA_ROOT/a.txt"]) == [str(tmp_path / "a.txt")]
    monkeypatch.delenv("DSC_TEST_DATA_ROOT")
    with pytest.raises(
        FileNotFoundError, match=r"environment variable\(s\) \['DSC_TEST_DATA_ROOT'\]"
    ):
        expand_paths(["${DSC_TEST_DATA_ROOT}/a.txt"])


def test_the_wikitext_study_reads_its_folder_from_the_environment(monkeypatch):
    from dsc_jax.train import presets

    monkeypatch.delenv(presets.WIKITEXT_RAW_DIR, raising=False)
    assert presets.cpu_wikitext().data.paths[0] == "$DSC_WIKITEXT_RAW_DIR/wiki.test.raw"
    monkeypatch.setenv(presets.WIKITEXT_RAW_DIR, "/data/wt")
    assert list(presets.cpu_wikitext().data.paths) == [
        "/data/wt/wiki.test.raw",
        "/data/wt/wiki.valid.raw",
    ]
