"""Every named run config, in one place, built on :func:`dsc_jax.train.config.base_config`.

* :func:`default`, :func:`tiny`, :func:`paper_recipe`: what ``configs/*.py`` return
  (``dsc-train --config=configs/tiny.py``; ``--config=configs/tiny.py:moe`` picks the FFN);
* :func:`compare_tiny`, :func:`cpu_embedded`, :func:`cpu_wikitext`: the shared settings of the
  ``dsc-compare`` studies (:mod:`dsc_jax.experiments.presets` adds their parameter targets;
  the runner sizes each method's FFN).

Each takes the FFN kind and gives the group of that kind only (``model.ffn``); a variant
(FFN kind, ablation, seed) composes from a preset by overriding fields.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from dsc_jax import paper
from dsc_jax.layers.configs import FFN_KINDS
from dsc_jax.train.config import base_config, set_ffn_kind

PAPER_FFN_KINDS = ("dsc", "moe", "dense", "molora")
#: Environment variable naming the folder with ``wiki.test.raw`` and ``wiki.valid.raw``
#: (the WikiText raw files) for :func:`cpu_wikitext`.
WIKITEXT_RAW_DIR = "DSC_WIKITEXT_RAW_DIR"
#: FFN sizes of :func:`tiny` per kind (seconds on a CPU at d=32).
TINY_FFN: Mapping[str, Mapping[str, Any]] = {
    "dsc": {"num_bases": 16, "top_k": 2, "hidden_dim": 32},
    "moe": {"num_experts": 4, "top_k": 2, "hidden_dim": 16},
    "molora": {"num_experts": 4, "rank": 4, "top_k": 2, "hidden_dim": 32},
    "dense": {"hidden_dim": 64},
}


def _kind(preset: str, ffn_kind: str | None, kinds: tuple[str, ...] = FFN_KINDS) -> str:
    """``ffn_kind`` (``None``: ``"dsc"``), checked against ``kinds``."""
    kind = ffn_kind or "dsc"
    if kind not in kinds:
        raise ValueError(f"{preset}: ffn_kind={kind!r} is not allowed; expected one of {kinds}.")
    return kind


def default(ffn_kind: str | None = None) -> ml_collections.ConfigDict:
    """A small byte-level language model on the embedded corpus (the running Python's
    standard-library sources), offline, small enough for a CPU: 4-layer d=128 GPT,
    600 steps of 16 x 128 tokens. The DSC FFN has M=128, K=4, H=256; another kind takes its
    config type's defaults."""
    kind = _kind("default", ffn_kind)
    c = base_config(kind)
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
    c.bank_projection = "retract"  # bank rows back at their radius after every update
    c.model.num_layers = 4  # L
    c.model.num_heads = 4  # attention heads (head dim 32)
    c.model.d_model = 128  # d
    c.model.dropout_rate = 0.0  # no dropout: short run, large corpus
    if kind == "dsc":  # M atoms per bank, K active per token, H of the static FFN
        c.model.ffn.update(num_bases=128, top_k=4, hidden_dim=256)
    c.optim.learning_rate = 2e-3  # peak lr (small model, short run)
    c.optim.min_learning_rate = 2e-4  # cosine end value
    c.optim.warmup_steps = 50  # linear warm-up steps
    c.optim.decay_steps = 0  # cosine ends at num_train_steps
    c.optim.weight_decay = 0.02  # AdamW decay on >=2-D non-router parameters (paper)
    c.data.source = "embedded"  # the Python standard library's *.py files, offline
    c.data.tokenizer = "byte"  # UTF-8 bytes, vocab 256
    c.data.embedded_max_bytes = 20_000_000  # up to 20 MB of source text
    return c


def tiny(ffn_kind: str | None = None) -> ml_collections.ConfigDict:
    """Tests and smoke checks, seconds on a CPU: a 1-layer d=32 byte-level LM on a 0.5 MB
    slice of the embedded corpus, FFN sizes :data:`TINY_FFN`."""
    kind = _kind("tiny", ffn_kind)
    c = set_ffn_kind(base_config(kind), kind, **TINY_FFN[kind])
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
    c.bank_projection = "retract"  # bank rows back at their radius after every update
    c.model.num_layers = 1  # L
    c.model.num_heads = 2  # attention heads
    c.model.d_model = 32  # d
    c.model.dropout_rate = 0.1  # dropout on (so resume must restore the dropout stream)
    c.optim.learning_rate = 3e-3  # high peak lr: the loss must fall within a few steps
    c.optim.min_learning_rate = 3e-4  # cosine end value
    c.optim.warmup_steps = 5  # linear warm-up steps
    c.optim.decay_steps = 0  # cosine ends at num_train_steps
    c.data.source = "embedded"  # the Python standard library's sources, offline
    c.data.tokenizer = "byte"  # UTF-8 bytes, vocab 256
    c.data.embedded_max_bytes = 500_000  # a 0.5 MB slice: tokenised in well under a second
    c.data.cache_dir = ""  # no token cache on disk
    return c


def paper_recipe(ffn: str) -> ml_collections.ConfigDict:
    """The paper's setting: its GPT (d=384, L=6, 6 heads, T=256, GPT-2 BPE) on
    WikiText-103 with the reference data pipeline, trained 2000 steps with AdamW. ``ffn``
    picks the FFN; its sizes are the paper's iso-parameter ones (the config types'
    defaults: Dense H=2611; MoE E=5, top-2, H=545; DSC M=1523, K=4, H=327; MoLoRA from the
    solver at the same budgets)."""
    kind = _kind("paper_recipe", ffn, PAPER_FFN_KINDS)
    c = base_config(kind)
    c.name = f"paper_{kind}"  # run name in config.json and result tables
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
    c.router_lr_multiplier = paper.ROUTER_LR_MULTIPLIER  # router/gate parameters at 5x the lr
    c.bank_projection = "retract"  # bank rows back at their radius after every update
    # Model: GPTConfig defaults = the paper's models; vocab from the tokenizer (50304).
    c.model.num_layers = paper.NUM_LAYERS  # L
    c.model.num_heads = paper.NUM_HEADS  # attention heads
    c.model.d_model = paper.D_MODEL  # d
    c.model.dropout_rate = paper.DROPOUT_RATE  # attention-probability and residual dropout
    c.model.dtype = "bfloat16"  # mixed precision (fp16 in the paper; bf16 on TPU/GPU)
    c.model.param_dtype = "float32"  # parameters and optimiser state in float32
    # Optimiser: AdamW β=(0.9, 0.95), lr 6e-4 after 150 warm-up steps, cosine to 6e-5 at
    # step 2000, weight decay 0.02 on >=2-D non-router parameters, clipping 1.0.
    c.optim.learning_rate = paper.LEARNING_RATE
    c.optim.min_learning_rate = paper.MIN_LEARNING_RATE
    c.optim.warmup_steps = paper.WARMUP_STEPS
    c.optim.decay_steps = paper.NUM_TRAIN_STEPS
    c.optim.weight_decay = paper.WEIGHT_DECAY
    c.optim.b1, c.optim.b2, c.optim.eps = paper.ADAM_B1, paper.ADAM_B2, paper.ADAM_EPS
    c.optim.grad_clip_norm = paper.GRAD_CLIP_NORM
    # Data (the paper's reference code): WikiText-103 raw, first 20M characters, lines > 10
    # characters, "Calc:" lines with probability 0.15, GPT-2 BPE, 90 % / last 10 % splits.
    c.data.source = "wikitext103"
    c.data.tokenizer = "gpt2"
    c.data.pipeline = "paper"
    c.data.max_chars = 20_000_000
    c.data.min_line_chars = 10
    c.data.calc_prob = 0.15
    c.data.train_fraction = 0.9
    c.losses.update(paper.LOSS_WEIGHTS)  # regulariser weights λ
    return c


def _cpu_base(ffn_kind: str | None, steps: int = 600) -> ml_collections.ConfigDict:
    """The CPU-scale comparison recipe: d=128, L=2, 4 heads, T=128, batch 16, byte tokens."""
    c = base_config(_kind("cpu", ffn_kind))
    c.num_train_steps = steps
    c.batch_size = 16
    c.micro_batches = 1
    c.seq_len = 128
    c.eval_every_steps = 50
    c.eval_batches = 16  # 16 fixed validation windows ...
    c.eval_batch_size = 16  # ... batches of 16 sequences (32k tokens)
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    c.async_checkpointing = False
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.d_model = 128
    c.model.dropout_rate = 0.1
    c.optim.learning_rate = 1e-3
    c.optim.min_learning_rate = 1e-4
    c.optim.warmup_steps = 50
    c.optim.decay_steps = 0  # cosine ends at num_train_steps
    c.data.tokenizer = "byte"
    return c


def cpu_embedded(ffn_kind: str | None = None) -> ml_collections.ConfigDict:
    """:func:`_cpu_base` on 4 MB of the embedded corpus (the Python standard library)."""
    c = _cpu_base(ffn_kind)
    c.data.source = "embedded"
    c.data.embedded_max_bytes = 4_000_000
    return c


def cpu_wikitext(ffn_kind: str | None = None) -> ml_collections.ConfigDict:
    """:func:`_cpu_base` on real English text: ``wiki.test.raw`` and ``wiki.valid.raw`` from
    the folder ``$DSC_WIKITEXT_RAW_DIR`` (:data:`WIKITEXT_RAW_DIR`; unset, the run's data
    set-up names it). The data layer holds out the tail of every text file for validation:
    train = the first 90 % of each file, validation = the last 10 %."""
    c = _cpu_base(ffn_kind)
    c.data.source = "text_files"
    folder = os.environ.get(WIKITEXT_RAW_DIR) or f"${WIKITEXT_RAW_DIR}"
    c.data.paths = [os.path.join(folder, "wiki.test.raw"), os.path.join(folder, "wiki.valid.raw")]
    c.data.validation_fraction = 0.1
    c.data.max_chars = 0
    return c


def compare_tiny(ffn_kind: str | None = None) -> ml_collections.ConfigDict:
    """The ``dsc-compare`` test study: d=32, L=1, T=16, 6 steps on 0.2 MB of the embedded
    corpus."""
    c = base_config(_kind("compare_tiny", ffn_kind))
    c.num_train_steps = 6
    c.batch_size = 8
    c.micro_batches = 1
    c.seq_len = 16
    c.eval_every_steps = 3
    c.eval_batches = 2
    c.eval_batch_size = 8
    c.log_every_steps = 3
    c.checkpoint_every_steps = 3
    c.keep_checkpoints = 2
    c.async_checkpointing = False
    c.model.num_layers = 1
    c.model.num_heads = 2
    c.model.d_model = 32
    c.model.dropout_rate = 0.0
    c.optim.learning_rate = 3e-3
    c.optim.min_learning_rate = 3e-4
    c.optim.warmup_steps = 2
    c.optim.decay_steps = 0
    c.data.source = "embedded"
    c.data.tokenizer = "byte"
    c.data.embedded_max_bytes = 200_000
    c.data.cache_dir = None
    return c
