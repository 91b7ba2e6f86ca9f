"""The MoE layer's ``dispatch="sorted"`` path split into its parts, each timed like a layer.

Parts, at the layer's sizes and on its own parameters (the functions of
:mod:`dsc_jax.layers.moe` that :func:`~dsc_jax.layers.moe.sorted_tile_dispatch` composes):

* ``router``: the layer's router LayerNorm and router module
  (:meth:`~dsc_jax.layers.moe.MoELayer.make_router`: ``[N, d] × [d, E]`` logits, softmax,
  top-k); backward w.r.t. the tokens and the router weights through the gates;
* ``dispatch``: the slot ranks and buffer rows (:func:`sorted_tile_plan`) and the scatter of
  the ``N·k`` slots into the padded ``[tiles·tile, d]`` buffer; backward w.r.t. the tokens;
* ``weight_gather``: each tile's expert weights ``w_in[tile_expert]``, ``w_out[tile_expert]``
  (``[tiles, d, H]`` and ``[tiles, H, d]`` copies); backward = their scatter-add;
* ``expert_matmuls``: the two batched tile matmuls with GELU (the layer's only matmul FLOPs
  besides the router), on a ready buffer and ready per-tile weights;
* ``combine``: gather the slots back from the buffer and sum them with the gates.

A grouped-GEMM kernel (one kernel walking the sorted slots with per-group weight pointers)
would do ``dispatch`` + ``weight_gather`` + ``expert_matmuls`` + ``combine`` without the
buffer and the weight copies: ``expert_matmuls`` alone is what such a kernel costs at best.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.harness import vjp_function
from dsc_jax.layers import moe
from dsc_jax.layers.common import layer_norm

PARTS = ("router", "dispatch", "weight_gather", "expert_matmuls", "combine")

Part = tuple[Callable[..., Any], Callable[..., Any] | None, tuple[Any, ...], tuple[Any, ...]]


def parts(layer: moe.MoELayer, params: dict, x: jax.Array, key: jax.Array) -> dict[str, Part]:
    """``{name: (fwd, fwd_bwd, fwd args, fwd_bwd args)}`` (jitted) for ``layer`` on ``x``."""
    tokens = x.reshape(-1, x.shape[-1]).astype(layer.dtype)
    num_tokens, top_k, tile = tokens.shape[0], layer.top_k, layer.tile_size
    norm, kernel = params["router_norm"], params["router"]["kernel"]
    w_in = params["expert_in"].astype(layer.dtype)
    w_out = params["expert_out"].astype(layer.dtype)
    num_experts = w_in.shape[0]

    router_module = layer.make_router()

    def route(tokens: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The layer's router (its LayerNorm, then its router module, no jitter):
        ``(gates [N, k], indices [N, k])``."""
        normed = layer_norm(layer.param_dtype, "router_norm").apply({"params": norm}, tokens)
        routing = router_module.apply({"params": {"kernel": kernel}}, normed)
        return routing.gates, routing.indices

    def router(tokens: jax.Array, kernel: jax.Array) -> jax.Array:
        return route(tokens, kernel)[0]  # the gates carry the router's gradient

    gates, indices = jax.jit(route)(tokens, kernel)
    indices = indices.astype(jnp.int32)
    dest, tile_expert = jax.jit(lambda i: moe.sorted_tile_plan(i, num_experts, tile))(indices)
    rows = tile_expert.shape[0] * tile

    def dispatch(tokens: jax.Array) -> jax.Array:
        dest, _ = moe.sorted_tile_plan(indices, num_experts, tile)
        return moe.scatter_slots(tokens, dest, top_k, rows)

    def weight_gather(w_in: jax.Array, w_out: jax.Array) -> tuple[jax.Array, jax.Array]:
        return w_in[tile_expert], w_out[tile_expert]

    tiles = jax.jit(dispatch)(tokens).reshape(-1, tile, tokens.shape[-1])
    tile_w_in, tile_w_out = jax.jit(weight_gather)(w_in, w_out)
    out = jax.jit(moe.tile_expert_mlp)(tiles, tile_w_in, tile_w_out).reshape(rows, -1)

    def combine(out: jax.Array, gates: jax.Array) -> jax.Array:
        return moe.combine_slots(out, dest, gates)

    cot = jax.random.normal(key, tokens.shape, jnp.float32)
    return {
        "router": (
            jax.jit(router),
            vjp_function(router, (0, 1)),
            (tokens, kernel),
            (tokens, kernel, jax.random.normal(key, (num_tokens, top_k))),
        ),
        "dispatch": (
            jax.jit(dispatch),
            vjp_function(dispatch, (0,)),
            (tokens,),
            (tokens, jax.random.normal(key, (rows, tokens.shape[-1]))),
        ),
        "weight_gather": (
            jax.jit(weight_gather),
            vjp_function(weight_gather, (0, 1)),
            (w_in, w_out),
            (w_in, w_out, (tile_w_in, tile_w_out)),
        ),
        "expert_matmuls": (
            jax.jit(moe.tile_expert_mlp),
            vjp_function(moe.tile_expert_mlp, (0, 1, 2)),
            (tiles, tile_w_in, tile_w_out),
            (tiles, tile_w_in, tile_w_out, tiles),
        ),
        "combine": (
            jax.jit(combine),
            vjp_function(combine, (0, 1)),
            (out, gates),
            (out, gates, cot),
        ),
    }
