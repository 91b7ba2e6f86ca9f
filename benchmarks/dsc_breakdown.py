"""The DSC layer split into its parts, each timed like a layer (forward and forward+backward).

Parts, at the layer's sizes and on its own parameters (``compute="gather"`` path):

* ``router``: the layer's router as the layer runs it, the router LayerNorm then its own
  router module (:meth:`~dsc_jax.layers.dsc.DSCLayer.make_router`: the dense
  ``[N, d] × [d, M]`` logits, the top-K and the gating); backward through the gates = the
  sparse logit gradient over the K selected columns (what the layer differentiates);
* ``top_k``: :func:`dsc_jax.layers.dsc_router.top_k_indices` on ``[N, M]`` logits (no backward;
  a part of ``router``);
* ``contract``: the gathered bank contraction (:mod:`dsc_jax.layers.dsc_contract`), w.r.t.
  ``x``, both banks and the gates;
* ``static_ffn``: ``GELU(x W1) W2``;
* ``regularisers``: the weighted aux + budget + frame + z losses (training only) w.r.t. the
  logits and both banks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.harness import vjp_function
from dsc_jax.layers import common, dsc_contract, dsc_router
from dsc_jax.layers.dsc import DSCLayer
from dsc_jax.layers.losses import LossWeights

PARTS = ("router", "top_k", "contract", "static_ffn", "regularisers")

Part = tuple[Callable[..., Any], Callable[..., Any] | None, tuple[Any, ...], tuple[Any, ...]]


def parts(layer: DSCLayer, params: dict, x: jax.Array, key: jax.Array) -> dict[str, Part]:
    """``{name: (fwd, fwd_bwd or None, fwd args, fwd_bwd args)}`` (jitted functions)."""
    tokens = x.reshape(-1, x.shape[-1]).astype(layer.dtype)
    num_tokens, top_k, tau = tokens.shape[0], layer.top_k, layer.tau
    norm = params.get("router_norm")
    kernel, bias = params["router"]["kernel"], params["router"]["bias"]
    router_module = layer.make_router()

    def router_in(tokens: jax.Array) -> jax.Array:
        if norm is None:
            return tokens.astype(jnp.float32)
        return common.layer_norm(layer.param_dtype, "router_norm").apply({"params": norm}, tokens)

    logits = jax.jit(lambda t: router_in(t) @ kernel.astype(jnp.float32) + bias)(tokens)
    indices = jax.jit(lambda r: dsc_router.top_k_indices(r, top_k, tau))(logits)

    def router(tokens: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        routing = router_module.apply(
            {"params": {"kernel": kernel, "bias": bias}}, router_in(tokens)
        )
        return routing.gates  # the gates carry the router's gradient

    def top_k_part(raw: jax.Array) -> jax.Array:
        return dsc_router.top_k_indices(raw, top_k, tau)

    gates = jax.random.uniform(key, (num_tokens, top_k), jnp.float32) / top_k

    def contract(tokens, basis_u, basis_v, gates):
        # The layer's gather path (normalises the bank or the gathered rows, the smaller).
        return dsc_contract.contract_raw_banks(tokens, basis_u, basis_v, indices, gates, layer.eps)

    w_in = params["mlp_in"]["kernel"].astype(layer.dtype)
    w_out = params["mlp_out"]["kernel"].astype(layer.dtype)

    def static_ffn(tokens, w_in, w_out):
        return jax.nn.gelu(tokens @ w_in, approximate=False) @ w_out

    weights = LossWeights()
    signal = jnp.sum(gates, axis=-1) * 4.0

    def regularisers(raw, basis_u, basis_v):
        clipped = jnp.clip(raw, -tau, tau)
        u = dsc_router.normalize_rows(basis_u, layer.eps)
        v = dsc_router.normalize_rows(basis_v, layer.eps)
        return (
            weights.aux * dsc_router.aux_loss(clipped)
            + weights.budget * dsc_router.budget_loss(signal, layer.budget_target)
            + weights.frame * dsc_router.frame_loss(u, v)
            + weights.z * common.z_loss(raw)
        )

    one = jnp.ones((), jnp.float32)
    cot = jax.random.normal(key, tokens.shape, jnp.float32)
    sel_cot = jax.random.normal(key, (num_tokens, top_k), jnp.float32)
    banks = (params["basis_u"], params["basis_v"])
    return {
        "router": (
            jax.jit(router),
            vjp_function(router, (0, 1, 2)),
            (tokens, kernel, bias),
            (tokens, kernel, bias, sel_cot),
        ),
        "top_k": (jax.jit(top_k_part), None, (logits,), ()),
        "contract": (
            jax.jit(contract),
            vjp_function(contract, (0, 1, 2, 3)),
            (tokens, params["basis_u"], params["basis_v"], gates),
            (tokens, params["basis_u"], params["basis_v"], gates, cot),
        ),
        "static_ffn": (
            jax.jit(static_ffn),
            vjp_function(static_ffn, (0, 1, 2)),
            (tokens, w_in, w_out),
            (tokens, w_in, w_out, cot),
        ),
        "regularisers": (
            jax.jit(regularisers),
            vjp_function(regularisers, (0, 1, 2)),
            (logits, *banks),
            (logits, *banks, one),
        ),
    }
