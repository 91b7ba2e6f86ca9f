"""Named training recipes built on :func:`dsc_jax.train.config.base_config`.

``configs/*.py`` call these, so a recipe is defined once and every variant (FFN kind,
ablation, seed) composes from it by overriding fields.
"""

from __future__ import annotations

import ml_collections

from dsc_jax import paper
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
    c.seed = paper.SEEDS[0]  # the paper's seeds are 42 and 1337 (override --config.seed=1337)
    c.num_train_steps = paper.NUM_TRAIN_STEPS  # cosine decay ends here
    c.batch_size = paper.BATCH_SIZE  # global batch: 128 sequences ...
    c.micro_batches = paper.MICRO_BATCHES  # ... as 8 accumulated micro-batches of 16
    c.seq_len = paper.SEQ_LEN  # T
    c.eval_every_steps = paper.EVAL_EVERY_STEPS  # evaluate every 250 steps ...
    c.eval_batches = paper.EVAL_BATCHES  # ... on 50 fixed validation batches ...
    c.eval_batch_size = paper.EVAL_BATCH_SIZE  # ... of 16 sequences
    c.log_every_steps = 10  # metrics every 10 steps
    c.checkpoint_every_steps = paper.EVAL_EVERY_STEPS  # checkpoint with every evaluation
    c.keep_checkpoints = 3  # newest 3 checkpoints on disk
    c.router_lr_multiplier = (
        paper.ROUTER_LR_MULTIPLIER
    )  # router/gate parameters at 5x the learning rate
    c.bank_projection = "retract"  # unit-norm bank rows after every update (spec §4)
    # Model: GPTConfig defaults = the paper's models; vocab from the tokenizer (50304).
    c.model.ffn = ffn  # "dsc" | "moe" | "dense" | "molora"
    c.model.num_layers = paper.NUM_LAYERS  # L
    c.model.num_heads = paper.NUM_HEADS  # attention heads
    c.model.d_model = paper.D_MODEL  # d
    c.model.dropout_rate = paper.DROPOUT_RATE  # attention-probability and residual dropout
    c.model.dtype = "bfloat16"  # mixed precision (fp16 in the paper; bf16 on TPU/GPU)
    c.model.param_dtype = "float32"  # parameters and optimiser state in float32
    # Optimiser (spec §7): AdamW β=(0.9, 0.95), lr 6e-4 after 150 warm-up steps, cosine to
    # 6e-5 at step 2000, weight decay 0.02 on >=2-D non-router parameters, clipping 1.0.
    c.optim.learning_rate = paper.LEARNING_RATE
    c.optim.min_learning_rate = paper.MIN_LEARNING_RATE
    c.optim.warmup_steps = paper.WARMUP_STEPS
    c.optim.decay_steps = paper.NUM_TRAIN_STEPS
    c.optim.weight_decay = paper.WEIGHT_DECAY
    c.optim.b1, c.optim.b2, c.optim.eps = paper.ADAM_B1, paper.ADAM_B2, paper.ADAM_EPS
    c.optim.grad_clip_norm = paper.GRAD_CLIP_NORM
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
    c.losses.update(paper.LOSS_WEIGHTS)
    return c
