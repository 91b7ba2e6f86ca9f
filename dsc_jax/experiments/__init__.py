"""Rerunning the paper's comparison (its Table 1): methods × seeds at iso-active parameters.

See :mod:`dsc_jax.experiments.cli` (``dsc-compare``), :mod:`~dsc_jax.experiments.presets`
(studies), :mod:`~dsc_jax.experiments.runner` (sweep) and :mod:`~dsc_jax.experiments.report`.
"""

from dsc_jax.experiments.presets import METHODS, STUDIES, Study
from dsc_jax.experiments.variants import ABLATIONS, Variant, ablation_variants, method_variants

__all__ = [
    "ABLATIONS",
    "METHODS",
    "STUDIES",
    "Study",
    "Variant",
    "ablation_variants",
    "method_variants",
]
