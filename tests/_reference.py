"""References of the DSC layer written for the tests: an independent float64 NumPy one
(:func:`dsc_reference`, the paper's Algorithms 1 and 2 and its regularisers) and a plain-JAX
one without custom derivative rules (:func:`plain_dsc_apply`) for checking the layer's
derivatives of every order."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def to_numpy64(params: dict) -> dict:
    """Unbox a Flax parameter tree and convert every leaf to a float64 NumPy array."""
    unboxed = nn.meta.unbox(params)
    return {
        key: to_numpy64(value) if isinstance(value, dict) else np.asarray(value, np.float64)
        for key, value in unboxed.items()
    }


def gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = 1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def dsc_reference(
    params: dict, x: np.ndarray, top_k: int, variant: str, tau: float = 20.0, eps: float = 1e-6
) -> dict:
    """DSC forward for ``x: [N, d]`` in float64; returns every intermediate and the output."""
    x = np.asarray(x, np.float64)
    static = gelu(x @ params["mlp_in"]["kernel"]) @ params["mlp_out"]["kernel"]
    router_in = x
    if variant == "refined":
        norm = params["router_norm"]
        router_in = layer_norm(x, norm["scale"], norm["bias"])
    raw = router_in @ params["router"]["kernel"] + params["router"]["bias"]
    clipped = np.clip(raw, -tau, tau)
    alpha = softplus(clipped)
    indices = np.argsort(-alpha, axis=-1, kind="stable")[:, :top_k]
    phi = np.take_along_axis(alpha, indices, -1)
    signal = phi.sum(-1)
    coefficients = phi / (signal + eps)[:, None] * np.tanh(signal)[:, None]
    unit_u = (
        params["basis_u"] / np.maximum(eps, np.linalg.norm(params["basis_u"], axis=-1))[:, None]
    )
    unit_v = (
        params["basis_v"] / np.maximum(eps, np.linalg.norm(params["basis_v"], axis=-1))[:, None]
    )
    gamma = params["gamma"]
    # Materialised ΔW(x) = γ-scaled Σ_j ẑ_j u_jᵀ v_j, one d×d matrix per token.
    delta_w = np.einsum("nk,nki,nkj->nij", coefficients, unit_u[indices], unit_v[indices])
    delta_w = delta_w * gamma  # scales output channels (columns); scalar γ broadcasts
    dynamic = np.einsum("ni,nij->nj", x, delta_w)
    probs = np.exp(clipped - clipped.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    num_bases = raw.shape[-1]
    gram_u, gram_v = unit_u @ unit_u.T, unit_v @ unit_v.T
    off = ~np.eye(num_bases, dtype=bool)
    lse = np.log(np.exp(raw - raw.max(-1, keepdims=True)).sum(-1)) + raw.max(-1)
    return {
        "output": static + dynamic,
        "indices": indices,
        "gates": coefficients,
        "signal": signal,
        "delta_w": delta_w,
        "aux": num_bases * np.sum(probs.mean(0) ** 2),
        "budget": max(0.0, 1.0 - signal.mean()) ** 2,
        # the excess over the Welch bound 2·max(0, M²/d − M) (what the layer sows)
        "frame": np.sum(gram_u[off] ** 2)
        + np.sum(gram_v[off] ** 2)
        - 2 * max(0.0, num_bases**2 / unit_u.shape[1] - num_bases),
        "z": np.mean(lse**2),
    }


def plain_dsc_apply(layer: nn.Module, params: dict, x: jax.Array) -> jax.Array:
    """``DSCLayer.apply`` in plain JAX: dense ``[N, M]`` logits (both routers), ``lax.top_k`` on
    ``softplus(clip(r))``, whole-bank normalisation and an einsum contraction, differentiated
    by autodiff only (no custom JVP/VJP, no stop-gradients). ``params``: the layer's unboxed
    parameters; ``x: [..., d]``. Ties between logits are assumed absent."""
    p = params
    d = x.shape[-1]
    tokens = x.reshape(-1, d).astype(jnp.float32)
    static = jax.nn.gelu(tokens @ p["mlp_in"]["kernel"], approximate=False)
    static = static @ p["mlp_out"]["kernel"]
    router_in = tokens
    if layer.variant == "refined":
        mean = tokens.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(tokens - mean), -1, keepdims=True)
        router_in = (tokens - mean) / jnp.sqrt(var + 1e-5)
        router_in = router_in * p["router_norm"]["scale"] + p["router_norm"]["bias"]
    if layer.router == "product_key":
        half = d // 2
        keys = p["router"]
        s1 = router_in[:, :half] @ keys["keys_1"]["kernel"] + keys["keys_1"]["bias"]
        s2 = router_in[:, half:] @ keys["keys_2"]["kernel"] + keys["keys_2"]["bias"]
        logits = (s1[:, :, None] + s2[:, None, :]).reshape(tokens.shape[0], -1)
    else:
        logits = router_in @ p["router"]["kernel"] + p["router"]["bias"]
    alpha = jax.nn.softplus(jnp.clip(logits, -layer.tau, layer.tau))
    phi, indices = jax.lax.top_k(alpha, layer.top_k)
    signal = phi.sum(-1, keepdims=True)
    gates = phi / (signal + layer.eps) * jnp.tanh(signal)

    def unit(bank: jax.Array) -> jax.Array:
        norms = jnp.sqrt(jnp.sum(jnp.square(bank), axis=-1, keepdims=True))
        return bank / jnp.maximum(norms, layer.eps)

    rows_u = jnp.take(unit(p["basis_u"]), indices, axis=0)  # [N, K, d]
    rows_v = jnp.take(unit(p["basis_v"]), indices, axis=0)
    projections = jnp.einsum("nd,nkd->nk", tokens, rows_u)
    dynamic = jnp.einsum("nk,nkd->nd", projections * gates, rows_v)
    return (static + dynamic * p["gamma"]).reshape(x.shape)
