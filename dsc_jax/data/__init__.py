"""Data: corpora, tokenisers, token cache, TFDS builder ``wikitext103``, batch iterators.

Main entry point: :func:`build_data` (docs/DESIGN.md, "Data interface used by the trainer").
The TFDS builder lives in :mod:`dsc_jax.data.wikitext103` and is imported on demand.
"""

from dsc_jax.data.config import default_data_config, validate_data_config
from dsc_jax.data.iterators import TrainIterator, eval_batches
from dsc_jax.data.pipeline import DataBundle, build_data
from dsc_jax.data.tokenizers import ByteTokenizer, Gpt2Tokenizer, build_tokenizer, pad_vocab

__all__ = [
    "ByteTokenizer",
    "DataBundle",
    "Gpt2Tokenizer",
    "TrainIterator",
    "build_data",
    "build_tokenizer",
    "default_data_config",
    "eval_batches",
    "pad_vocab",
    "validate_data_config",
]
