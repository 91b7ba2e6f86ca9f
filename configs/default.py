"""Default run: a small DSC byte-level language model on the embedded corpus (the running
Python's standard-library sources), offline, a few minutes on a 2-core CPU.

    python train.py --config=configs/default.py --workdir=runs/default

Starts from dsc_jax.train.config.base_config (every key documented there) and overrides:
"""

from dsc_jax.train.config import base_config


def get_config():
    """4-layer d=128 DSC GPT, byte tokens, 600 steps of 16 x 128 tokens."""
    c = base_config()
    c.name = "default"  # run name
    c.seed = 42  # init, dropout and data-window seed
    c.num_train_steps = 600  # optimiser steps
    c.batch_size = 16  # global sequences per step
    c.micro_batches = 1  # no gradient accumulation
    c.seq_len = 128  # tokens (bytes) per sequence
    c.eval_every_steps = 100  # evaluate every 100 steps and at the end ...
    c.eval_batches = 8  # ... on 8 fixed validation batches ...
    c.eval_batch_size = 16  # ... of 16 sequences
    c.log_every_steps = 25  # a metrics record / console line every 25 steps
    c.checkpoint_every_steps = 100  # a checkpoint every 100 steps and at the end
    c.keep_checkpoints = 3  # keep the newest 3
    c.router_lr_multiplier = 5.0  # router parameters at 5x the learning rate (paper)
    c.bank_projection = "retract"  # unit bank rows after every update (spec §4)
    c.model.ffn = "dsc"  # DSC feed-forward layers
    c.model.num_layers = 4  # L
    c.model.num_heads = 4  # attention heads (head dim 32)
    c.model.d_model = 128  # d
    c.model.dropout_rate = 0.0  # no dropout: short run, large corpus
    c.model.dsc.num_bases = 128  # M atoms in each layer's bank
    c.model.dsc.top_k = 4  # K active atoms per token
    c.model.dsc.hidden_dim = 256  # H of the static FFN
    c.optim.learning_rate = 2e-3  # peak lr (small model, short run)
    c.optim.min_learning_rate = 2e-4  # cosine end value
    c.optim.warmup_steps = 50  # linear warm-up steps
    c.optim.decay_steps = 0  # cosine ends at num_train_steps
    c.optim.weight_decay = 0.02  # AdamW decay on >=2-D non-router parameters (paper)
    c.data.source = "embedded"  # the Python standard library's *.py files, offline
    c.data.tokenizer = "byte"  # UTF-8 bytes, vocab 256
    c.data.embedded_max_bytes = 20_000_000  # up to 20 MB of source text
    return c
