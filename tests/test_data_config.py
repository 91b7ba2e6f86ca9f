"""Data config defaults and validation errors."""

import pytest

from dsc_jax.data import default_data_config, validate_data_config
from dsc_jax.data.config import as_plain_dict, split_paths


def test_defaults_are_valid_and_documented_values():
    cfg = default_data_config()
    validate_data_config(cfg)
    assert cfg.source == "embedded"
    assert cfg.tokenizer == "byte"
    assert cfg.pipeline == "standard"
    assert cfg.max_chars == 20_000_000
    assert cfg.calc_prob == 0.15
    assert cfg.min_line_chars == 10
    assert cfg.train_fraction == 0.9
    assert cfg.gpt2_bpe_dir is None and cfg.wikitext_dir is None
    # Optional string keys accept strings later; paths accepts a list or a string.
    cfg.gpt2_bpe_dir = "/x"
    cfg.paths = ["a.txt", "b/*.txt"]
    cfg.paths = "a.txt,b.txt"
    assert split_paths(cfg.paths) == ["a.txt", "b.txt"]


def test_mapping_overrides_defaults():
    d = as_plain_dict({"source": "text_files", "paths": "x.txt"})
    assert d["source"] == "text_files" and d["tokenizer"] == "byte"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"source": "webtext"}, "data.source='webtext' is not allowed"),
        ({"source": "tfds:"}, "data.source='tfds:' is not allowed"),
        ({"tokenizer": "sentencepiece"}, "data.tokenizer='sentencepiece' is not allowed"),
        ({"pipeline": "fancy"}, "data.pipeline='fancy' is not allowed"),
        ({"source": "text_files"}, "data.paths=None is invalid for source 'text_files'"),
        ({"paths": [1, 2]}, "data.paths=[1, 2] is invalid"),
        ({"calc_prob": 1.5}, "data.calc_prob=1.5 is invalid"),
        ({"train_fraction": 1.0}, "data.train_fraction=1.0 is invalid"),
        ({"validation_fraction": 0}, "data.validation_fraction=0 is invalid"),
        ({"max_chars": -5}, "data.max_chars=-5 is invalid"),
        ({"min_line_chars": -1}, "data.min_line_chars=-1 is invalid"),
        ({"embedded_max_bytes": 0}, "data.embedded_max_bytes=0 is invalid"),
        ({"gpt2_bpe_dir": 3}, "data.gpt2_bpe_dir=3 is invalid"),
        ({"tfds_text_feature": ""}, "data.tfds_text_feature='' is invalid"),
        ({"bogus_key": 1}, "unknown key(s) ['bogus_key']"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ValueError) as err:
        validate_data_config(override)
    assert needle in str(err.value)


def test_unknown_source_lists_allowed_values():
    with pytest.raises(ValueError, match=r"expected one of \('embedded', 'wikitext103'"):
        validate_data_config({"source": "c4"})


def test_max_chars_zero_or_none_means_unlimited():
    validate_data_config({"max_chars": 0})
    validate_data_config({"max_chars": None})
