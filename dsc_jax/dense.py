"""Dense FFN baseline (spec §5): ``y = GELU(x W1) W2``, exact erf GELU, no bias."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax._checks import (
    check_float_input,
    check_positive_float,
    check_positive_int,
    check_probability,
)

Dtype = Any

#: Standard deviation of every non-residual projection (spec §7).
INIT_STD = 0.02


def model_dim_of(module: nn.Module, param_path: tuple[str, ...], axis: int) -> int | None:
    """Model dimension ``d`` recorded in an existing parameter, or ``None`` before ``init``.

    Args:
      module: the Linen module whose ``"params"`` are inspected (inside ``__call__``).
      param_path: names from the module's own scope down to the array, e.g.
        ``("wi", "kernel")``.
      axis: the axis of that array that has length ``d``.

    Reading the shape first lets a layer reject a wrongly shaped input with a clear
    ``ValueError`` before any matmul fails deep inside XLA.
    """
    if not module.has_variable("params", param_path[0]):
        return None
    value = nn.unbox(module.get_variable("params", param_path[0]))
    for name in param_path[1:]:
        value = nn.unbox(value[name])
    return int(jnp.shape(value)[axis])


def gelu_mlp(
    tokens: jax.Array,
    hidden_dim: int,
    *,
    names: tuple[str, str],
    dtype: Dtype,
    param_dtype: Dtype,
    out_init_std: float,
    in_init_std: float = INIT_STD,
) -> jax.Array:
    """``GELU(x W1) W2`` (exact erf GELU, no bias) on ``tokens: [N, d]`` → ``[N, d]``.

    Call it inside a parent's ``@nn.compact`` method: it creates the two ``nn.Dense``
    submodules ``names[0]`` (``W1 [d, H]``, logical ``("embed", "mlp")``) and ``names[1]``
    (``W2 [H, d]``, ``("mlp", "embed")``) in that parent. Shared by :class:`DenseFFN` and the
    static FFN of the DSC and MoLoRA layers.
    """

    def dense(features: int, axes: tuple[str, str], std: float, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
            name=name,
        )

    hidden = dense(hidden_dim, ("embed", "mlp"), in_init_std, names[0])(tokens)
    hidden = jax.nn.gelu(hidden, approximate=False)
    return dense(tokens.shape[-1], ("mlp", "embed"), out_init_std, names[1])(hidden)


class DenseFFN(nn.Module):
    """Position-wise feed-forward block ``GELU(x W1) W2`` (no bias).

    Attributes:
      hidden_dim: ``H``, the width of the hidden layer.
      dropout_rate: dropout on the output when ``deterministic=False``.
      out_init_std: standard deviation of ``W2`` (a GPT passes ``0.02 / sqrt(2 L)``).
      dtype: compute dtype; also the output dtype.
      param_dtype: storage dtype of the parameters.

    Parameters: ``wi/kernel [d, H]`` (``("embed", "mlp")``, normal(0.02)) and
    ``wo/kernel [H, d]`` (``("mlp", "embed")``, normal(``out_init_std``)).
    """

    hidden_dim: int
    dropout_rate: float = 0.0
    out_init_std: float = INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "hidden_dim", self.hidden_dim)
        check_probability(owner, "dropout_rate", self.dropout_rate)
        check_positive_float(owner, "out_init_std", self.out_init_std, allow_zero=True)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Apply the FFN.

        Args:
          x: ``[..., d]`` floating input.
          deterministic: disables dropout when ``True``.

        Returns:
          ``[..., d]`` in ``dtype``.
        """
        check_float_input(type(self).__name__, x, model_dim_of(self, ("wi", "kernel"), axis=0))
        model_dim = x.shape[-1]
        # Flatten to [N, d] like the other FFN kinds: XLA:CPU runs the backward of a rank-3
        # matmul ~2.5x slower than the same rank-2 one (benchmarks/layer_latency.py).
        tokens = x.reshape(-1, model_dim)
        y = gelu_mlp(
            tokens,
            self.hidden_dim,
            names=("wi", "wo"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            out_init_std=self.out_init_std,
        ).reshape((*x.shape[:-1], model_dim))
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        return y.astype(self.dtype)
