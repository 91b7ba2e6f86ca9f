"""Pieces every FFN layer shares; no layer owns them.

* float32 initialisers (:func:`normal`, :func:`orthogonal`): computed in float32, then cast
  to ``param_dtype``, so bfloat16/float16 parameters initialise (QR has no bfloat16 kernel)
  and start from the same values as float32 ones;
* :func:`gelu_mlp`, the ``GELU(x W1) W2`` block of the dense FFN and of the static FFNs;
* :func:`layer_norm`, the float32 LayerNorm of the GPT and in front of the DSC and MoE routers;
* :func:`check_top_k`, :func:`load_balancing_loss` (Switch/GShard) and :func:`z_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax import paper
from dsc_jax._checks import check_positive_float, check_positive_int, check_probability

Dtype = Any
Initializer = Callable[..., jax.Array]


def float32_init(init: Initializer) -> Initializer:
    """Wrap ``init(key, shape, dtype)`` to compute in float32 and cast to ``dtype``."""

    def wrapped(key: jax.Array, shape: Any, dtype: Dtype = jnp.float32) -> jax.Array:
        return init(key, shape, jnp.float32).astype(dtype)

    return wrapped


def logical(init: Initializer, names: tuple[str, ...]) -> Initializer:
    """``init`` with logical axis names (``nn.with_logical_partitioning``)."""
    return nn.with_logical_partitioning(init, names)


def normal(std: float, names: tuple[str, ...]) -> Initializer:
    """``normal(0, std)`` drawn in float32, with logical axis ``names``."""
    return logical(float32_init(nn.initializers.normal(std)), names)


def orthogonal(scale: float, names: tuple[str, ...]) -> Initializer:
    """``scale × orthogonal`` (QR in float32), with logical axis ``names``."""
    return logical(float32_init(nn.initializers.orthogonal(scale)), names)


def model_dim_of(module: nn.Module, param_path: tuple[str, ...], axis: int) -> int | None:
    """Model dimension ``d`` recorded in an existing parameter, or ``None`` before ``init``.

    Args:
      module: the Linen module whose ``"params"`` are inspected (inside ``__call__``).
      param_path: names from the module's own scope down to the array, e.g.
        ``("mlp_in", "kernel")``.
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
    dtype: Dtype,
    param_dtype: Dtype,
    init_std: float,
    out_init_std: float,
    names: tuple[str, str] = ("mlp_in", "mlp_out"),
) -> jax.Array:
    """``GELU(x W1) W2`` (exact erf GELU, no bias) on ``tokens: [N, d]`` → ``[N, d]``.

    Call it inside a parent's ``@nn.compact`` method: it creates the two ``nn.Dense``
    submodules ``names[0]`` (``W1 [d, H]``, logical ``("embed", "mlp")``, normal(``init_std``))
    and ``names[1]`` (``W2 [H, d]``, ``("mlp", "embed")``, normal(``out_init_std``)).
    """

    def dense(features: int, axes: tuple[str, str], std: float, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=normal(std, axes),
            name=name,
        )

    hidden = dense(hidden_dim, ("embed", "mlp"), init_std, names[0])(tokens)
    hidden = jax.nn.gelu(hidden, approximate=False)
    return dense(tokens.shape[-1], ("mlp", "embed"), out_init_std, names[1])(hidden)


def layer_norm(param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """The one LayerNorm of the package (the routers' and the GPT's): float32 math, exact
    two-pass variance, eps 1e-5 (PyTorch's), ``scale``/``bias`` ``[d]`` (ones, zeros) on
    logical axis ``embed``."""
    return nn.LayerNorm(
        epsilon=paper.LAYER_NORM_EPS,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def check_top_k(owner: str, top_k: object, pool_name: str, pool: object) -> None:
    """Raise unless ``1 <= top_k <= pool`` (``pool`` already validated)."""
    check_positive_int(owner, "top_k", top_k)
    if top_k > pool:
        raise ValueError(
            f"{owner}.top_k={top_k!r} is invalid; expected an integer in [1, {pool_name}={pool!r}]."
        )


def load_balancing_loss(probs: jax.Array, top_k_indices: jax.Array) -> jax.Array:
    """Switch/GShard auxiliary loss ``E / N² · Σ_e importance_e · load_e``.

    Args:
      probs: ``[N, E]`` router probabilities (``importance_e = Σ_tokens probs[:, e]``).
      top_k_indices: ``[N, k]`` chosen experts (``load_e`` = number of assignments to ``e``).

    Returns:
      float32 scalar; equals ``k`` for a perfectly uniform router. Gradient flows through
      ``probs`` only (the counts are piecewise constant).
    """
    num_tokens, num_experts = probs.shape
    importance = jnp.sum(probs.astype(jnp.float32), axis=0)
    load = jnp.sum(jax.nn.one_hot(top_k_indices, num_experts, dtype=jnp.float32), axis=(0, 1))
    return num_experts / num_tokens**2 * jnp.sum(importance * load)


def z_loss(raw_logits: jax.Array) -> jax.Array:
    """``L_z = mean_tokens (logsumexp_j r_raw)²`` on unclipped router logits ``[..., M]``."""
    lse = jax.nn.logsumexp(raw_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(lse))


def check_common_fields(module: nn.Module) -> None:
    """Validate the fields every FFN layer shares (``hidden_dim``, ``init_std``,
    ``out_init_std``, ``dropout_rate``), naming the layer and the field."""
    owner = type(module).__name__
    check_positive_int(owner, "hidden_dim", module.hidden_dim)
    check_positive_float(owner, "init_std", module.init_std, allow_zero=True)
    check_positive_float(owner, "out_init_std", module.out_init_std, allow_zero=True)
    check_probability(owner, "dropout_rate", module.dropout_rate)
