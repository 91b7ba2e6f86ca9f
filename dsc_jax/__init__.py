"""dsc_jax: Dynamic Subspace Composition (arXiv 2512.23448) in JAX/Flax.

Public API (stable names): the layers :class:`DSCLayer`, :class:`DenseFFN`, :class:`MoELayer`,
:class:`MoLoRALayer`; the model :class:`GPT` / :class:`GPTConfig`; the regulariser helpers
:class:`LossWeights`, :func:`regularization_loss`, :func:`cross_entropy_loss`; the bank
projection :func:`retract_bank`; and the iso-active solver :func:`solve_iso_active`.
"""

from dsc_jax.dense import DenseFFN
from dsc_jax.dsc import DSCLayer
from dsc_jax.gpt import GPT, GPTConfig
from dsc_jax.losses import LossWeights, cross_entropy_loss, regularization_loss
from dsc_jax.moe import MoELayer
from dsc_jax.molora import MoLoRALayer
from dsc_jax.solver import IsoActiveSolution, solve_iso_active
from dsc_jax.train.state import retract_bank

__all__ = [
    "GPT",
    "DSCLayer",
    "DenseFFN",
    "GPTConfig",
    "IsoActiveSolution",
    "LossWeights",
    "MoELayer",
    "MoLoRALayer",
    "cross_entropy_loss",
    "regularization_loss",
    "retract_bank",
    "solve_iso_active",
]
__version__ = "0.1.0"
