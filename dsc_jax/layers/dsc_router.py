"""DSC router math and regularisers (spec §2 steps 2-6 and §3), all in float32.

This is the one place where the routing equations live; every compute path of
:class:`dsc_jax.DSCLayer` (Linen and NNX) calls it. The z-loss, shared with the MoE
baselines, is :func:`dsc_jax.layers.common.z_loss`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RouterOutput(NamedTuple):
    """Result of :func:`route`. ``N`` is the number of tokens (leading axes flattened or not).

    Attributes:
      indices: ``[..., K]`` int32, the selected atoms (descending ``α``).
      coefficients: ``[..., K]`` float32, the magnitude-gated ``ẑ``.
      signal: ``[...]`` float32, ``S = Σ_k φ_k``.
      clipped_logits: ``[..., M]`` float32, ``r = clip(r_raw, -τ, τ)``.
    """

    indices: jax.Array
    coefficients: jax.Array
    signal: jax.Array
    clipped_logits: jax.Array


def route(raw_logits: jax.Array, top_k: int, tau: float, eps: float) -> RouterOutput:
    """Clip, softplus, top-K and magnitude-gated contraction (spec §2 steps 2-5).

    Args:
      raw_logits: ``[..., M]`` router logits ``r_raw`` (cast to float32 here).
      top_k: static number of active atoms ``K``.
      tau: logit clip ``τ``.
      eps: ``ε`` in ``ẑ = φ / (S + ε) · tanh(S)``.

    Returns:
      :class:`RouterOutput` with ``ẑ`` satisfying ``Σ_k ẑ_k < 1`` and ``ẑ → 0`` as ``S → 0``.
    """
    raw_logits = raw_logits.astype(jnp.float32)
    clipped = jnp.clip(raw_logits, -tau, tau)
    alpha = jax.nn.softplus(clipped)
    phi, indices = jax.lax.top_k(alpha, top_k)
    signal = jnp.sum(phi, axis=-1)
    coefficients = phi / (signal + eps)[..., None] * jnp.tanh(signal)[..., None]
    return RouterOutput(indices.astype(jnp.int32), coefficients, signal, clipped)


def normalize_rows(bank: jax.Array, eps: float) -> jax.Array:
    """``b_j / max(ε, ‖b_j‖₂)`` row-wise (spec §2 step 6). ``bank: [M, d]``; math in float32."""
    bank32 = bank.astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(jnp.square(bank32), axis=-1, keepdims=True))
    return (bank32 / jnp.maximum(norms, eps)).astype(bank.dtype)


def aux_loss(clipped_logits: jax.Array) -> jax.Array:
    """``L_aux = M · Σ_j P_j²`` with ``P = mean_tokens softmax(r)``. ``clipped_logits: [N, M]``."""
    num_bases = clipped_logits.shape[-1]
    probs = jax.nn.softmax(clipped_logits.astype(jnp.float32), axis=-1)
    mean_probs = jnp.mean(probs.reshape(-1, num_bases), axis=0)
    return num_bases * jnp.sum(jnp.square(mean_probs))


def budget_loss(signal: jax.Array, target: float) -> jax.Array:
    """``L_budget = max(0, μ − mean(S))²``. ``signal: [N]``."""
    return jnp.square(jnp.maximum(0.0, target - jnp.mean(signal.astype(jnp.float32))))


def _off_diagonal_gram_energy(bank: jax.Array) -> jax.Array:
    """``Σ_{i≠j} (b_i·b_j)² = ‖BᵀB‖_F² − Σ_i ‖b_i‖⁴`` in O(M d²) time, O(d²) memory."""
    bank = bank.astype(jnp.float32)
    feature_gram = bank.T @ bank  # [d, d]
    row_sq_norms = jnp.sum(jnp.square(bank), axis=-1)
    energy = jnp.sum(jnp.square(feature_gram)) - jnp.sum(jnp.square(row_sq_norms))
    return jnp.maximum(energy, 0.0)  # the true value is >= 0; float32 cancellation can dip below


def frame_loss(basis_u: jax.Array, basis_v: jax.Array) -> jax.Array:
    """``L_frame = Σ_{i≠j}(u_i·u_j)² + Σ_{i≠j}(v_i·v_j)²`` on normalised banks ``[M, d]``."""
    return _off_diagonal_gram_energy(basis_u) + _off_diagonal_gram_energy(basis_v)
