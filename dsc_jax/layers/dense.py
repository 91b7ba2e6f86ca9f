"""Dense FFN baseline of the paper: ``y = GELU(x W1) W2``, exact erf GELU, no bias."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax import paper
from dsc_jax._checks import check_float_input
from dsc_jax.layers.common import Dtype, check_common_fields, gelu_mlp, model_dim_of


class DenseFFN(nn.Module):
    """Position-wise feed-forward block ``GELU(x W1) W2`` (no bias).

    Shapes: ``x [..., d] -> [..., d]`` in ``dtype`` (any leading axes, e.g. ``[B, T, d]``);
    ``d`` is fixed by the first call. Example::

        layer = DenseFFN(hidden_dim=256)
        variables = layer.init(jax.random.key(0), x)          # x: [B, T, d]
        y = layer.apply(variables, x)                          # [B, T, d]

    Attributes:
      hidden_dim: ``H``, the width of the hidden layer.
      dropout_rate: dropout on the output when ``deterministic=False``.
      init_std: standard deviation of ``W1`` (the paper: 0.02).
      out_init_std: standard deviation of ``W2`` (a GPT passes ``0.02 / sqrt(2 L)``).
      dtype: compute dtype; also the output dtype.
      param_dtype: storage dtype of the parameters (initialisers compute in float32).

    Parameters: ``mlp_in/kernel [d, H]`` (``("embed", "mlp")``, normal(``init_std``)) and
    ``mlp_out/kernel [H, d]`` (``("mlp", "embed")``, normal(``out_init_std``)).
    """

    hidden_dim: int
    dropout_rate: float = 0.0
    init_std: float = paper.INIT_STD
    out_init_std: float = paper.INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_common_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Apply the FFN.

        Args:
          x: ``[..., d]`` floating input.
          deterministic: disables dropout when ``True``.

        Returns:
          ``[..., d]`` in ``dtype``.
        """
        check_float_input(type(self).__name__, x, model_dim_of(self, ("mlp_in", "kernel"), axis=0))
        model_dim = x.shape[-1]
        # Flatten to [N, d] like the other FFN kinds: XLA:CPU runs the backward of a rank-3
        # matmul ~2.5x slower than the same rank-2 one (benchmarks/layer_latency.py).
        tokens = x.reshape(-1, model_dim)
        y = gelu_mlp(
            tokens,
            self.hidden_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=self.init_std,
            out_init_std=self.out_init_std,
        ).reshape((*x.shape[:-1], model_dim))
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        return y.astype(self.dtype)
