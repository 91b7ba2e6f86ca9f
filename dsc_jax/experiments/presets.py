"""Named studies for ``dsc-compare``: a base training config plus the iso-active budget.

A :class:`Study` fixes everything the methods share (transformer, data, recipe, seeds) and
the parameter targets; :func:`dsc_jax.experiments.runner.method_config` then sizes each
method's FFN with :func:`dsc_jax.models.solver.solve_iso_active`.

* ``tiny``: seconds on a CPU, for tests (d=32, L=1, 6 steps).
* ``cpu_embedded``: byte-level LM on the embedded corpus (the Python standard library),
  d=128, L=2, T=128, 0.60 M total / 0.35 M active parameters.
* ``cpu_wikitext``: the same model on real English text (WikiText ``wiki.test.raw`` +
  ``wiki.valid.raw``, byte tokens, the tail of each file held out for validation).
* ``paper``: the paper's configuration (spec §7, WikiText-103, GPT-2 BPE, d=384, L=6,
  35 M total / 28 M active, 2000 steps, seeds 42 and 1337): for an accelerator.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import ml_collections

from dsc_jax import paper
from dsc_jax.train.config import base_config
from dsc_jax.train.presets import paper_recipe

METHODS = ("dsc", "moe", "molora", "dense")
METHOD_NAMES = {"dsc": "DSC", "moe": "Standard MoE", "molora": "MoLoRA", "dense": "Dense"}
SHARED_DATA = os.environ.get("DSC_SHARED_DATA", "/work/shared/data")


@dataclasses.dataclass(frozen=True)
class Study:
    """What every method of a comparison shares.

    Attributes:
      name: default study folder name under the results root.
      base: builds the shared training config (``model.ffn``, ``seed``, ``name`` and the FFN
        sizes are set per run; an FFN field it sets off the :func:`base_config` default is
        kept, a size as a constraint of the solver, like ``dsc-compare --set``).
      total_params, active_params: iso-active targets (dense takes ``total_params``: the
        paper's Dense has as many parameters as the sparse models have in total).
      seeds: default seeds.
      methods: default methods.
      description: one line for the report.
    """

    name: str
    base: Callable[[], ml_collections.ConfigDict]
    total_params: float
    active_params: float
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    description: str = ""


def _cpu_base(steps: int = 600) -> ml_collections.ConfigDict:
    """The CPU-scale recipe: d=128, L=2, 4 heads, T=128, batch 16, byte tokens."""
    c = base_config()
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


def cpu_embedded() -> ml_collections.ConfigDict:
    c = _cpu_base()
    c.data.source = "embedded"
    c.data.embedded_max_bytes = 4_000_000
    return c


def cpu_wikitext() -> ml_collections.ConfigDict:
    c = _cpu_base()
    c.data.source = "text_files"
    # The data layer holds out the tail of every text file for validation (it has no
    # separate train/validation paths for text_files): train = the first 90 % of
    # wiki.test.raw and of wiki.valid.raw, validation = the last 10 % of each.
    c.data.paths = [
        os.path.join(SHARED_DATA, "wiki.test.raw"),
        os.path.join(SHARED_DATA, "wiki.valid.raw"),
    ]
    c.data.validation_fraction = 0.1
    c.data.max_chars = 0
    return c


def tiny() -> ml_collections.ConfigDict:
    c = base_config()
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


def paper_base() -> ml_collections.ConfigDict:
    """Spec §7 (:func:`dsc_jax.train.presets.paper_recipe`); the FFN is sized per method."""
    return paper_recipe("dsc")


STUDIES: dict[str, Study] = {
    "tiny": Study(
        "tiny",
        tiny,
        30_000,
        24_000,
        seeds=(0, 1),
        methods=("dsc", "moe"),
        description="test preset: d=32, L=1, T=16, 6 steps on 0.2 MB of the embedded corpus",
    ),
    "cpu_embedded": Study(
        "cpu_embedded",
        cpu_embedded,
        600_000,
        350_000,
        description="byte LM on the embedded corpus (Python stdlib sources, 4 MB): d=128, L=2, "
        "4 heads, T=128, batch 16, 600 steps",
    ),
    "cpu_wikitext": Study(
        "cpu_wikitext",
        cpu_wikitext,
        600_000,
        350_000,
        description="byte LM on WikiText (wiki.test.raw + wiki.valid.raw, last 10 % of each "
        "held out): d=128, L=2, 4 heads, T=128, batch 16, 600 steps",
    ),
    "paper": Study(
        "paper",
        paper_base,
        paper.TOTAL_PARAMS,
        paper.ACTIVE_PARAMS,
        seeds=paper.SEEDS,
        description="the paper (spec §7): WikiText-103, GPT-2 BPE, d=384, L=6, T=256, "
        "35 M total / 28 M active, 2000 steps of 128x256 tokens (accelerator)",
    ),
}
