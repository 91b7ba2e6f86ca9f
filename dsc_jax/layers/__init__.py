"""The FFN layers (Flax Linen) and what they share.

Every layer takes the same constructor vocabulary for the same things (``hidden_dim``,
``init_std``, ``out_init_std``, ``dropout_rate``, ``dtype``, ``param_dtype``), is called as
``layer.apply(variables, x, deterministic)`` on ``x: [..., d]``, sows its unweighted
regularisers into ``"losses"`` (when mutable) and its routing diagnostics into
``"intermediates"`` under the same names (``top_k_indices``, ``gates``).
"""

from dsc_jax.layers.configs import (
    FFN_CONFIGS,
    FFN_KINDS,
    DenseConfig,
    DSCConfig,
    FFNConfig,
    MoEConfig,
    MoLoRAConfig,
    ffn_config,
)
from dsc_jax.layers.dense import DenseFFN
from dsc_jax.layers.dsc import DSCLayer
from dsc_jax.layers.losses import LossWeights, cross_entropy_loss, regularization_loss
from dsc_jax.layers.moe import MoELayer
from dsc_jax.layers.molora import MoLoRALayer

__all__ = [
    "FFN_CONFIGS",
    "FFN_KINDS",
    "DSCConfig",
    "DSCLayer",
    "DenseConfig",
    "DenseFFN",
    "FFNConfig",
    "LossWeights",
    "MoEConfig",
    "MoELayer",
    "MoLoRAConfig",
    "MoLoRALayer",
    "cross_entropy_loss",
    "ffn_config",
    "regularization_loss",
]
