"""Tiny DSC run for tests and smoke checks: seconds on a CPU.

    python train.py --config=configs/tiny.py --workdir=/tmp/dsc_tiny

Starts from dsc_jax.train.config.base_config (every key documented there) and overrides:
"""

from dsc_jax.train.config import base_config


def get_config():
    """A 1-layer d=32 DSC byte-level LM on a 0.5 MB slice of the embedded corpus."""
    c = base_config()
    c.name = "tiny"  # run name
    c.seed = 0  # init, dropout and data-window seed
    c.num_train_steps = 20  # optimiser steps
    c.batch_size = 8  # global sequences per step (multiple of the 8 fake test devices)
    c.micro_batches = 2  # two accumulated micro-batches of 4 (exercises the scan)
    c.seq_len = 32  # tokens per sequence
    c.eval_every_steps = 10  # evaluate every 10 steps and at the end
    c.eval_batches = 2  # two fixed validation batches ...
    c.eval_batch_size = 8  # ... of 8 sequences
    c.log_every_steps = 5  # a metrics record every 5 steps
    c.checkpoint_every_steps = 10  # a checkpoint every 10 steps and at the end
    c.keep_checkpoints = 3  # keep the newest 3
    c.router_lr_multiplier = 5.0  # router parameters at 5x the learning rate
    c.bank_projection = "retract"  # unit bank rows after every update
    c.model.ffn = "dsc"  # DSC feed-forward layers
    c.model.num_layers = 1  # L
    c.model.num_heads = 2  # attention heads
    c.model.d_model = 32  # d
    c.model.dropout_rate = 0.1  # dropout on (so resume must restore the dropout stream)
    c.model.dsc.num_bases = 16  # M atoms
    c.model.dsc.top_k = 2  # K active atoms
    c.model.dsc.hidden_dim = 32  # H of the static FFN
    c.optim.learning_rate = 3e-3  # high peak lr: the loss must fall within a few steps
    c.optim.min_learning_rate = 3e-4  # cosine end value
    c.optim.warmup_steps = 5  # linear warm-up steps
    c.optim.decay_steps = 0  # cosine ends at num_train_steps
    c.data.source = "embedded"  # the Python standard library's sources, offline
    c.data.tokenizer = "byte"  # UTF-8 bytes, vocab 256
    c.data.embedded_max_bytes = 500_000  # a 0.5 MB slice: tokenised in well under a second
    c.data.cache_dir = ""  # no token cache on disk
    return c
