"""What every router shares: the one result type, the router projection, the lowest-id top-K
and the dense gate row.

Three routers, each a small Linen module named ``router`` inside its layer, map the router
input ``q [N, d]`` (float32; the layer applies its router LayerNorm first where it has one)
to one :class:`RouterOutput`:

* :class:`dsc_jax.layers.dsc_router.FlatRouter`: DSC, one ``[d, M]`` projection
  (the paper's Algorithm 1 and 2);
* :class:`dsc_jax.layers.dsc_product_key.ProductKeyRouter`: DSC, two sub-key tables of
  ``n₁·n₂ = M`` keys;
* :class:`dsc_jax.layers.topk_router.TopKRouter`: the softmax top-k router of the MoE and
  MoLoRA baselines.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dsc_jax.layers import common


@struct.dataclass
class RouterOutput:
    """One router's decision for ``N`` tokens; every router fills every field.

    Attributes:
      indices: ``[N, K]`` int32, the selected atoms / experts (best first).
      gates: ``[N, K]`` float32, their weights in the layer's sum (DSC: the magnitude-gated
        ``ẑ``; MoE: the top-k softmax probabilities; MoLoRA: the softmax over the k selected
        logits).
      signal: ``[N]`` float32, the token's routing mass: DSC's ``S = Σ_k φ_k`` (what the
        budget regulariser and the tanh gate read), ``Σ_k g_k`` for the softmax routers.
      losses: the router's unweighted regularisers under the names the layer sows
        (DSC: ``aux``, ``budget``, ``z``; MoE / MoLoRA: ``aux``, ``z``), float32 scalars.
        Empty when the caller did not ask for them (``with_losses=False``: inference, or
        ``init``), so no regulariser work is traced there.
    """

    indices: jax.Array
    gates: jax.Array
    signal: jax.Array
    losses: dict[str, jax.Array] = struct.field(default_factory=dict)


def router_projection(
    module: nn.Module,
    query: jax.Array,
    features: int,
    *,
    axis: str,
    init_std: float,
    param_dtype: Any,
    use_bias: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``q W (+ b)`` in float32 with ``kernel [d, F]`` (logical ``("embed", axis)``,
    normal(``init_std``)) and ``bias [F]`` (``(axis,)``, zeros) created as ``module``'s own
    parameters, exactly as an ``nn.Dense`` named like ``module`` would (same names, keys and
    math), so a router module keeps the ``router/kernel`` paths.

    Call inside ``module``'s ``@nn.compact`` method. ``query: [N, d]`` float32.

    Returns:
      ``(logits [N, F] float32, kernel, bias or None)``; ``kernel`` and ``bias`` as stored
      (``param_dtype``), for a sparse gradient rule.
    """
    kernel = module.param(
        "kernel", common.normal(init_std, ("embed", axis)), (query.shape[-1], features), param_dtype
    )
    bias = None
    if use_bias:
        init = common.logical(nn.initializers.zeros, (axis,))
        bias = module.param("bias", init, (features,), param_dtype)
    logits = jax.lax.dot_general(
        query.astype(jnp.float32),
        kernel.astype(jnp.float32),
        (((query.ndim - 1,), (0,)), ((), ())),
    )
    if bias is not None:
        logits = logits + jnp.reshape(bias.astype(jnp.float32), (1,) * (logits.ndim - 1) + (-1,))
    return logits, kernel, bias


def top_k_lowest_index(values: jax.Array, ids: jax.Array, top_k: int, sentinel: int) -> jax.Array:
    """The ``ids`` of the ``top_k`` largest ``values`` (lowest id first among equal values).

    ``top_k`` rounds of max / min-id / mask on the last axis. ``values``, ``ids``:
    ``[..., C]`` candidates (ids distinct and ``< sentinel``) -> ``[..., top_k]`` int32.
    """
    chosen = []
    for _ in range(top_k):
        best = jnp.max(values, axis=-1, keepdims=True)
        winner = jnp.min(jnp.where(values == best, ids, sentinel), axis=-1, keepdims=True)
        chosen.append(winner)
        values = jnp.where(ids == winner, -jnp.inf, values)
    return jnp.concatenate(chosen, axis=-1).astype(jnp.int32)


def dense_gates(indices: jax.Array, gates: jax.Array, pool: int) -> jax.Array:
    """The K-sparse gate row of every token: ``[N, pool]`` float32, ``gates [N, K]`` at the
    columns ``indices [N, K]`` and zeros elsewhere (the dense compute paths multiply every
    atom / expert by it)."""
    num_tokens = indices.shape[0]
    row = jnp.zeros((num_tokens, pool), jnp.float32)
    return row.at[jnp.arange(num_tokens)[:, None], indices].set(gates)


def collects_losses(module: nn.Module) -> bool:
    """Whether ``module``'s call should compute its regularisers: ``"losses"`` is mutable and
    this is not ``init`` (whose variables stay free of losses and diagnostics)."""
    return module.is_mutable_collection("losses") and not module.is_initializing()


def sow_routing(
    module: nn.Module,
    routing: RouterOutput,
    lead_shape: tuple[int, ...],
    *,
    signal: bool = False,
    extra_losses: dict[str, jax.Array] | None = None,
) -> None:
    """Sow a layer's routing (never at ``init``).

    ``intermediates/top_k_indices [..., K]`` int32 and ``intermediates/gates [..., K]``
    (``lead_shape`` = the input's leading axes), ``intermediates/signal [...]`` when
    ``signal`` (DSC), and ``routing.losses`` plus ``extra_losses`` (e.g. the bank's frame
    term) into ``"losses"`` when it is mutable, in name order.
    """
    if module.is_initializing():
        return
    module.sow("intermediates", "top_k_indices", routing.indices.reshape(*lead_shape, -1))
    module.sow("intermediates", "gates", routing.gates.reshape(*lead_shape, -1))
    if signal:
        module.sow("intermediates", "signal", routing.signal.reshape(lead_shape))
    losses = {**routing.losses, **(extra_losses or {})}
    if module.is_mutable_collection("losses"):
        for name in sorted(losses):
            module.sow("losses", name, losses[name])
