"""Named training recipes built on :func:`dsc_jax.train.config.base_config`.

``configs/*.py`` call these, so a recipe is defined once and every variant (FFN kind,
ablation, seed) composes from it by overriding fields.
"""

from __future__ import annotations

import ml_collections

from dsc_jax.train.config import base_config

PAPER_FFN_KINDS = ("dsc", "moe", "dense", "molora")


def paper_recipe(ffn: str) -> ml_collections.ConfigDict:
    """Spec §7/§8: the paper's GPT (d=384, L=6, 6 heads, T=256, GPT-2 BPE) on WikiText-103
    with the reference data pipeline, trained 2000 steps with AdamW. ``ffn`` picks the FFN;
    its sizes are the iso-parameter ones of spec §6 (``GPTConfig``'s defaults)."""
    if ffn not in PAPER_FFN_KINDS:
        raise ValueError(
            f"paper_recipe: ffn={ffn!r} is not allowed; expected one of {PAPER_FFN_KINDS}."
        )
    c = base_config()
    c.name = f"paper_{ffn}"  # run name in config.json and result tables
    c.seed = 42  # the paper's seeds are 42 and 1337 (override --config.seed=1337)
    c.num_train_steps = 2000  # cosine decay ends here
    c.batch_size = 128  # global batch: 128 sequences ...
    c.micro_batches = 8  # ... as 8 accumulated micro-batches of 16
    c.seq_len = 256  # T
    c.eval_every_steps = 250  # evaluate every 250 steps ...
    c.eval_batches = 50  # ... on 50 fixed validation batches ...
    c.eval_batch_size = 16  # ... of 16 sequences
    c.log_every_steps = 10  # metrics every 10 steps
    c.checkpoint_every_steps = 250  # checkpoint with every evaluation
    c.keep_checkpoints = 3  # newest 3 checkpoints on disk
    c.router_lr_multiplier = 5.0  # router/gate parameters at 5x the learning rate
    c.bank_projection = "retract"  # unit-norm bank rows after every update (spec §4)
    # Model: GPTConfig defaults = the paper's models; vocab from the tokenizer (50304).
    c.model.ffn = ffn  # "dsc" | "moe" | "dense" | "molora"
    c.model.num_layers = 6  # L
    c.model.num_heads = 6  # attention heads
    c.model.d_model = 384  # d
    c.model.dropout_rate = 0.1  # attention-probability and residual dropout
    c.model.dtype = "bfloat16"  # mixed precision (fp16 in the paper; bf16 on TPU/GPU)
    c.model.param_dtype = "float32"  # parameters and optimiser state in float32
    # Optimiser (spec §7): AdamW β=(0.9, 0.95), lr 6e-4 after 150 warm-up steps, cosine to
    # 6e-5 at step 2000, weight decay 0.02 on >=2-D non-router parameters, clipping 1.0.
    c.optim.learning_rate = 6e-4
    c.optim.min_learning_rate = 6e-5
    c.optim.warmup_steps = 150
    c.optim.decay_steps = 2000
    c.optim.weight_decay = 0.02
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 1.0
    # Data (spec §8): WikiText-103 raw, first 20M characters, lines > 10 characters,
    # "Calc:" lines with probability 0.15, GPT-2 BPE, 90 % / last 10 % token splits.
    c.data.source = "wikitext103"
    c.data.tokenizer = "gpt2"
    c.data.pipeline = "paper"
    c.data.max_chars = 20_000_000
    c.data.min_line_chars = 10
    c.data.calc_prob = 0.15
    c.data.train_fraction = 0.9
    # Regulariser weights (spec §3).
    c.losses.aux = 0.01
    c.losses.budget = 0.01
    c.losses.frame = 0.001
    c.losses.z = 1e-4
    return c
