"""Named studies for ``dsc-compare``: a base training config plus the iso-active budget.

A :class:`Study` names the shared settings (a preset of :mod:`dsc_jax.train.presets`:
transformer, data, recipe) and the parameter targets; the runner then sizes each method's
FFN with :func:`dsc_jax.models.solver.solve_iso_active`.

* ``tiny``: seconds on a CPU, for tests (d=32, L=1, 6 steps).
* ``cpu_embedded``: byte-level LM on the embedded corpus (the Python standard library),
  d=128, L=2, T=128, 0.60 M total / 0.35 M active parameters.
* ``cpu_wikitext``: the same model on real English text (WikiText ``wiki.test.raw`` +
  ``wiki.valid.raw`` from ``$DSC_WIKITEXT_RAW_DIR``, byte tokens, the tail of each file held
  out for validation).
* ``paper``: the paper's setting (WikiText-103, GPT-2 BPE, d=384, L=6, 35 M total / 28 M
  active, 2000 steps, seeds 42 and 1337): for an accelerator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from dsc_jax import paper
from dsc_jax.train import presets

METHODS = ("dsc", "moe", "molora", "dense")
METHOD_NAMES = {"dsc": "DSC", "moe": "Standard MoE", "molora": "MoLoRA", "dense": "Dense"}


@dataclasses.dataclass(frozen=True)
class Study:
    """What every method of a comparison shares.

    Attributes:
      name: default study folder name under the results root.
      base: builds the shared training config for an FFN kind (``seed``, ``name`` and the
        FFN sizes are set per run; an FFN field it sets off the kind's default is kept, a
        size as a constraint of the solver, like ``dsc-compare --set``).
      total_params, active_params: iso-active targets (dense takes ``total_params``: the
        paper's Dense has as many parameters as the sparse models have in total).
      seeds: default seeds.
      methods: default methods.
      description: one line for the report.
    """

    name: str
    base: Callable[[str | None], ml_collections.ConfigDict]
    total_params: float
    active_params: float
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    description: str = ""


STUDIES: dict[str, Study] = {
    "tiny": Study(
        "tiny",
        presets.compare_tiny,
        30_000,
        24_000,
        seeds=(0, 1),
        methods=("dsc", "moe"),
        description="test preset: d=32, L=1, T=16, 6 steps on 0.2 MB of the embedded corpus",
    ),
    "cpu_embedded": Study(
        "cpu_embedded",
        presets.cpu_embedded,
        600_000,
        350_000,
        description="byte LM on the embedded corpus (Python stdlib sources, 4 MB): d=128, L=2, "
        "4 heads, T=128, batch 16, 600 steps",
    ),
    "cpu_wikitext": Study(
        "cpu_wikitext",
        presets.cpu_wikitext,
        600_000,
        350_000,
        description="byte LM on WikiText (wiki.test.raw + wiki.valid.raw, last 10 % of each "
        "held out): d=128, L=2, 4 heads, T=128, batch 16, 600 steps",
    ),
    "paper": Study(
        "paper",
        lambda kind=None: presets.paper_recipe(kind or "dsc"),
        paper.TOTAL_PARAMS,
        paper.ACTIVE_PARAMS,
        seeds=paper.SEEDS,
        description="the paper: WikiText-103, GPT-2 BPE, d=384, L=6, T=256, "
        "35 M total / 28 M active, 2000 steps of 128x256 tokens (accelerator)",
    ),
}
