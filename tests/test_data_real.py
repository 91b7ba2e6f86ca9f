"""Real text from ../shared/data (skipped where absent, failed instead with
``DSC_REQUIRE_SHARED_DATA=1``): GPT-2 tokens and the paper pipeline."""

import numpy as np
import pytest

from dsc_jax.data import build_data
from dsc_jax.data.augment import CALC_LINE_RE


def test_tinyshakespeare_gpt2(shared_data, tmp_path):
    cfg = {
        "source": "text_files",
        "paths": [str(shared_data / "tinyshakespeare.txt")],
        "tokenizer": "gpt2",
        "gpt2_bpe_dir": str(shared_data / "gpt2"),
        "cache_dir": str(tmp_path / "c"),
    }
    b = build_data(cfg, seq_len=128, global_batch_size=8, seed=0)
    assert b.vocab_size == 50304
    assert 250_000 < len(b.train_tokens) < 330_000 and len(b.validation_tokens) > 20_000
    assert b.train_tokens.dtype == np.uint16 and int(b.train_tokens.max()) < 50257
    text = b.tokenizer.decode(b.train_tokens[:20])
    assert text.startswith("First Citizen:\nBefore we proceed any further")
    x = next(b.train)
    assert x.shape == (8, 129) and x.dtype == np.int32
    assert [e.shape for e in b.eval_batches(4, 8)] == [(8, 129)] * 4
    again = build_data(cfg, seq_len=128, global_batch_size=8, seed=0)
    assert again.from_cache
    np.testing.assert_array_equal(next(again.train), x)


def test_wiki_valid_paper_pipeline(shared_data, tmp_path):
    path = shared_data / "wiki.valid.raw"
    cfg = {
        "source": "text_files",
        "paths": str(path),
        "tokenizer": "gpt2",
        "gpt2_bpe_dir": str(shared_data / "gpt2"),
        "pipeline": "paper",
        "cache_dir": "",
    }
    b = build_data(cfg, seq_len=256, global_batch_size=4, seed=0)
    text = b.tokenizer.decode(np.concatenate([b.train_tokens, b.validation_tokens]))
    lines = text.split("\n")
    calc = [line for line in lines if line.startswith("Calc:")]
    kept = [line for line in lines if not line.startswith("Calc:")]
    raw = path.read_text(encoding="utf-8").split("\n")
    assert kept == [line for line in raw if len(line) > 10]
    mean, sd = 0.15 * len(kept), (len(kept) * 0.15 * 0.85) ** 0.5
    assert abs(len(calc) - mean) < 5 * sd
    for line in calc:
        a, b_, c, s = map(int, CALC_LINE_RE.match(line).groups())
        assert a + b_ + c == s
    n = len(b.train_tokens) + len(b.validation_tokens)
    assert len(b.train_tokens) == int(n * 0.9)


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_wiki_valid_max_chars(shared_data, tmp_path, tokenizer):
    cfg = {
        "source": "text_files",
        "paths": str(shared_data / "wiki.valid.raw"),
        "tokenizer": tokenizer,
        "gpt2_bpe_dir": str(shared_data / "gpt2"),
        "max_chars": 50_000,
        "cache_dir": "",
    }
    b = build_data(cfg, seq_len=64, global_batch_size=2, seed=0)
    raw = (shared_data / "wiki.valid.raw").read_text(encoding="utf-8")
    cut = raw.rfind("\n", 0, int(len(raw) * 0.9)) + 1
    assert b.tokenizer.decode(b.train_tokens) == raw[:50_000]
    assert b.tokenizer.decode(b.validation_tokens) == raw[cut : cut + 50_000]


def test_wikitext103_builder_paper_pipeline_on_real_files(shared_data, tmp_path):
    """The paper's reference data pipeline through the TFDS builder: real wiki.valid.raw,
    wiki.test.raw standing in for wiki.train.raw (the real train split is not shipped), GPT-2
    tokens."""
    import zipfile

    zpath = tmp_path / "wikitext-103-raw-v1.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(shared_data / "wiki.test.raw", "wikitext-103-raw/wiki.train.raw")
        zf.write(shared_data / "wiki.valid.raw", "wikitext-103-raw/wiki.valid.raw")
    cfg = {
        "source": "wikitext103",
        "wikitext_dir": str(zpath),
        "tfds_data_dir": str(tmp_path / "tfds"),
        "tokenizer": "gpt2",
        "gpt2_bpe_dir": str(shared_data / "gpt2"),
        "pipeline": "paper",
        "max_chars": 600_000,
        "cache_dir": str(tmp_path / "c"),
    }
    b = build_data(cfg, seq_len=256, global_batch_size=4, seed=0)
    train_text = b.tokenizer.decode(b.train_tokens)
    raw_train = (shared_data / "wiki.test.raw").read_text(encoding="utf-8")[:600_000]
    assert train_text.startswith(next(line for line in raw_train.split("\n") if len(line) > 10))
    valid_text = b.tokenizer.decode(b.validation_tokens)
    raw_valid = (shared_data / "wiki.valid.raw").read_text(encoding="utf-8")[:600_000]
    last_kept = [line for line in raw_valid.split("\n") if len(line) > 10][-1]
    assert valid_text.rstrip().endswith(last_kept.rstrip()) or CALC_LINE_RE.match(
        valid_text.rsplit("\n", 1)[-1]
    )
    # Validation is the last 10 % of the augmented valid-file tokens: about 1/9 of train's size
    # (the two files differ, so only roughly).
    assert 0.05 < len(b.validation_tokens) / len(b.train_tokens) < 0.2
    assert len(b.eval_batches(2, 4)) == 2


def test_missing_shared_data_skips_or_fails_as_switched(tmp_path):
    """Without the switch a missing folder or entry skips; ``DSC_REQUIRE_SHARED_DATA=1``
    fails instead (naming what is missing); a complete folder is returned either way."""
    from tests.conftest import SHARED_DATA_ENTRIES, locate_shared_data

    with pytest.raises(pytest.skip.Exception, match="lacks"):
        locate_shared_data(tmp_path / "absent", {})
    with pytest.raises(pytest.fail.Exception, match=r"lacks tinyshakespeare\.txt.*must run"):
        locate_shared_data(tmp_path / "absent", {"DSC_REQUIRE_SHARED_DATA": "1"})
    for name in SHARED_DATA_ENTRIES[:-1]:
        (tmp_path / name).write_text("x")
    with pytest.raises(pytest.fail.Exception, match="lacks gpt2 "):
        locate_shared_data(tmp_path, {"DSC_REQUIRE_SHARED_DATA": "1"})
    (tmp_path / "gpt2").mkdir()
    assert locate_shared_data(tmp_path, {"DSC_REQUIRE_SHARED_DATA": "1"}) == tmp_path
    assert locate_shared_data(tmp_path, {"DSC_REQUIRE_SHARED_DATA": "0"}) == tmp_path
    with pytest.raises(pytest.fail.Exception, match="DSC_REQUIRE_SHARED_DATA='yes'"):
        locate_shared_data(tmp_path, {"DSC_REQUIRE_SHARED_DATA": "yes"})
