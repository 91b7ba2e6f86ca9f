"""Per-layer routing sums from a model's ``"intermediates"`` (traceable, static shapes).

Shared by the trainer's evaluation (:mod:`dsc_jax.train.diagnostics` turns summed values into
metrics) and the NNX faces (:class:`dsc_jax.nnx.Diagnostic`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

SIGNAL_COLLAPSE_THRESHOLD = 0.1


def _sown(value: Any) -> list[jax.Array]:
    """The arrays sown under one name (``sow`` stores a tuple, one entry per call)."""
    return [jnp.asarray(v) for v in jax.tree.leaves(value)]


def _pool_size(params: Mapping[str, Any] | None) -> int | None:
    """Number of atoms / experts of a routed layer, from its parameters."""
    if not params:
        return None
    if "basis_u" in params:  # [M, d], or [layers, M, d] under nn.scan
        return int(params["basis_u"].shape[-2])
    if "router" in params and "kernel" in params["router"]:
        return int(params["router"]["kernel"].shape[-1])
    return None


def routing_statistics(intermediates: Mapping[str, Any], params: Any) -> dict[str, Any]:
    """Per-layer float32 sums from one batch's ``"intermediates"`` (traceable, static shapes).

    Args:
      intermediates: the collection returned by ``apply(..., mutable=["intermediates"])``.
      params: the model parameters (the same tree paths give each layer's pool size).

    Returns:
      ``{layer_path: {"usage": [M] selection counts, "tokens": token count,
      ["signal_sum", "collapsed"]}}``; sums over batches add leaf-wise.
    """
    stats: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], layer_params: Any, path: str) -> None:
        if "top_k_indices" in node:
            pool = _pool_size(layer_params)
            indices = jnp.concatenate([i.reshape(-1) for i in _sown(node["top_k_indices"])])
            if pool is not None:
                entry = {"usage": jnp.zeros((pool,), jnp.float32).at[indices].add(1.0)}
                top_k = _sown(node["top_k_indices"])[0].shape[-1]
                entry["tokens"] = jnp.asarray(indices.size // top_k, jnp.float32)
                if "signal" in node:
                    signal = jnp.concatenate([s.reshape(-1) for s in _sown(node["signal"])])
                    entry["signal_sum"] = jnp.sum(signal.astype(jnp.float32))
                    entry["collapsed"] = jnp.sum(
                        (signal < SIGNAL_COLLAPSE_THRESHOLD).astype(jnp.float32)
                    )
                stats[path] = entry
        for key, child in node.items():
            if isinstance(child, Mapping):
                sub_params = layer_params.get(key) if isinstance(layer_params, Mapping) else None
                walk(child, sub_params, f"{path}/{key}" if path else str(key))

    walk(intermediates, params, "")
    return stats
