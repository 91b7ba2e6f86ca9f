"""dsc_jax: Dynamic Subspace Composition (arXiv 2512.23448) in JAX/Flax.

Public API:

* layers (Flax Linen, :mod:`dsc_jax.layers`): :class:`DSCLayer`, :class:`MoELayer`,
  :class:`MoLoRALayer`, :class:`DenseFFN`, and their per-kind configs :class:`DSCConfig`,
  :class:`MoEConfig`, :class:`MoLoRAConfig`, :class:`DenseConfig`;
* the same layers as Flax NNX modules: :mod:`dsc_jax.nnx`;
* the model (:mod:`dsc_jax.models`): :class:`GPT` / :class:`GPTConfig`, the iso-active
  solver :func:`solve_iso_active`;
* losses: :class:`LossWeights`, :func:`regularization_loss`, :func:`cross_entropy_loss`;
* optimisation: :func:`bank_retraction` (optax), :func:`retract_bank`, :func:`param_labels`;
* sharding: :data:`LOGICAL_AXIS_RULES` (merge into your model's rules);
* after training: :func:`load_model` (config, params, tokenizer of a run folder) and
  :func:`generate` / :func:`sample_text` (key/value-cached sampling);
* the paper's numbers: :mod:`dsc_jax.paper`.
"""

from dsc_jax import paper
from dsc_jax.bank import bank_retraction, retract_bank
from dsc_jax.generate import Generation, SamplingConfig, generate, sample_text
from dsc_jax.layers import (
    DenseConfig,
    DenseFFN,
    DSCConfig,
    DSCLayer,
    LossWeights,
    MoEConfig,
    MoELayer,
    MoLoRAConfig,
    MoLoRALayer,
    cross_entropy_loss,
    regularization_loss,
)
from dsc_jax.loading import LoadedModel, RunNotFoundError, load_model
from dsc_jax.models import GPT, GPTConfig, IsoActiveSolution, solve_iso_active
from dsc_jax.param_groups import param_labels
from dsc_jax.sharding import LOGICAL_AXIS_RULES

__all__ = [
    "GPT",
    "LOGICAL_AXIS_RULES",
    "DSCConfig",
    "DSCLayer",
    "DenseConfig",
    "DenseFFN",
    "GPTConfig",
    "Generation",
    "IsoActiveSolution",
    "LoadedModel",
    "LossWeights",
    "MoEConfig",
    "MoELayer",
    "MoLoRAConfig",
    "MoLoRALayer",
    "RunNotFoundError",
    "SamplingConfig",
    "bank_retraction",
    "cross_entropy_loss",
    "generate",
    "load_model",
    "paper",
    "param_labels",
    "regularization_loss",
    "retract_bank",
    "sample_text",
    "solve_iso_active",
]
__version__ = "0.2.0"
