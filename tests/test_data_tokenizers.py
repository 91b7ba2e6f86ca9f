"""Tokenisers: byte round trip, GPT-2 ids offline, padded vocab, chunked = whole encoding."""

import numpy as np
import pytest

from dsc_jax.data import build_tokenizer, pad_vocab
from dsc_jax.data.tokenizers import split_safe_chunks


def test_pad_vocab():
    assert pad_vocab(50257) == 50304
    assert pad_vocab(256) == 256
    assert pad_vocab(1) == 64


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte")
    ids = tok.encode("héllo\n")
    assert ids.dtype == np.uint16
    assert ids.tolist() == list("héllo\n".encode())
    assert tok.decode(ids) == "héllo\n"
    assert tok.vocab_size == 256


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match=r"data\.tokenizer='wordpiece' is not allowed"):
        build_tokenizer("wordpiece")


def test_gpt2_offline_ids(shared_data):
    tok = build_tokenizer("gpt2", str(shared_data / "gpt2"))
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.vocab_size == 50304 and tok.raw_vocab_size == 50257
    assert tok.decode([15496, 995, 50300]) == "Hello world"  # padding ids decode to nothing
    # <|endoftext|> in raw text is ordinary text, not the special id.
    assert 50256 not in tok.encode("a <|endoftext|> b").tolist()


def test_gpt2_chunked_encoding_equals_whole(shared_data):
    tok = build_tokenizer("gpt2", str(shared_data / "gpt2"))
    enc = tok._enc
    for name in ("tinyshakespeare.txt", "wiki.valid.raw"):
        text = (shared_data / name).read_text(encoding="utf-8")[:300_000]
        pieces = split_safe_chunks(text, 997)
        assert len(pieces) > 100 and "".join(pieces) == text
        chunked = [i for ids in enc.encode_ordinary_batch(pieces) for i in ids]
        assert chunked == enc.encode_ordinary(text)
        assert tok.encode(text).tolist() == chunked


def test_gpt2_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"encoder\.json.*vocab\.bpe"):
        build_tokenizer("gpt2", str(tmp_path))


def test_gpt2_wrong_files(tmp_path):
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="not GPT-2's files"):
        build_tokenizer("gpt2", str(tmp_path))
