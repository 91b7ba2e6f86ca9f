"""DSC router math and regularisers (spec §2 steps 2-6 and §3), all in float32.

This is the one place where the routing equations live; every compute path of
:class:`dsc_jax.DSCLayer` (Linen and NNX) calls it. The z-loss, shared with the MoE
baselines, is :func:`dsc_jax.layers.common.z_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
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


def route(
    raw_logits: jax.Array,
    top_k: int,
    tau: float,
    eps: float,
    selected_gradient: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> RouterOutput:
    """Clip, softplus, top-K and magnitude-gated contraction (spec §2 steps 2-5).

    Args:
      raw_logits: ``[..., M]`` router logits ``r_raw`` (cast to float32 here).
      top_k: static number of active atoms ``K``.
      tau: logit clip ``τ``.
      eps: ``ε`` in ``ẑ = φ / (S + ε) · tanh(S)``.
      selected_gradient: optional ``f(selected, indices) -> selected`` that returns the
        selected logits ``[..., K]`` unchanged but gives them its own tangent (e.g.
        :func:`dsc_jax.layers.dsc_contract.sparse_logit_gradient`); ``raw_logits`` then gets
        no first-order gradient through ``φ`` (higher orders still see the dependence).
        Without it, ``φ``'s gradient flows into ``raw_logits``.

    Returns:
      :class:`RouterOutput` with ``ẑ`` satisfying ``Σ_k ẑ_k < 1`` and ``ẑ → 0`` as ``S → 0``.
    """
    raw_logits = raw_logits.astype(jnp.float32)
    clipped = jnp.clip(raw_logits, -tau, tau)  # only the aux loss reads it (dead code otherwise)
    indices = top_k_indices(jax.lax.stop_gradient(raw_logits), top_k, tau)
    selected = jnp.take_along_axis(raw_logits, indices, axis=-1)
    if selected_gradient is not None:
        selected = selected_gradient(selected, indices)
    coefficients, signal = gate(selected, tau, eps)
    return RouterOutput(indices, coefficients, signal, clipped)


def gate(selected: jax.Array, tau: float, eps: float) -> tuple[jax.Array, jax.Array]:
    """``(ẑ, S)`` from the selected raw logits ``[..., K]``: ``φ = softplus(clip(r, -τ, τ))``,
    ``S = Σ_k φ_k``, ``ẑ = φ / (S + ε) · tanh(S)`` (spec §2 steps 3-5)."""
    # φ from the K winners only: the same elementwise ops as softplus(clip(r)) on all M.
    phi = _alpha(selected, tau)
    signal = jnp.sum(phi, axis=-1)
    coefficients = phi / (signal + eps)[..., None] * jnp.tanh(signal)[..., None]
    return coefficients, signal


def _alpha(raw_logits: jax.Array, tau: float) -> jax.Array:
    """``α = softplus(clip(r_raw, -τ, τ))``."""
    return jax.nn.softplus(jnp.clip(raw_logits, -tau, tau))


def pruning_block(num_bases: int, top_k: int) -> int | None:
    """Block size of :func:`top_k_indices`' candidate pruning, or None for a plain top-K.

    Pruning reads the logits once (block maxima) and runs the sort-based top-K on
    ``M / B + K·B`` values instead of ``M``; it pays when that is well below ``M``.
    """
    block = BLOCK_SIZE
    if num_bases < MIN_PRUNED_BASES or top_k * block * 4 > num_bases:
        return None
    return block


# Candidate-pruning parameters of :func:`top_k_indices` (see :func:`pruning_block`). Measured
# with benchmarks/layer_latency.py (XLA:CPU, float32, [4096, 1523] logits, K=4): blocks of 16
# make the top-K ~4x cheaper than ``lax.top_k`` on all M (32: similar, 64: slower).
BLOCK_SIZE = 16
MIN_PRUNED_BASES = 256


def top_k_indices(
    raw_logits: jax.Array, top_k: int, tau: float, block: int | None = -1
) -> jax.Array:
    """Indices of ``lax.top_k(softplus(clip(r_raw, -τ, τ)), K)``, exactly (ties included).

    Exact candidate pruning: split the M logits into blocks of ``B``, rank the blocks by
    ``α`` of their maximum (softplus and clip are monotone, so that is the block maximum of
    ``α``), keep the top-K blocks and take the top-K of their ``K·B`` candidates, laid out in
    index order. Every true winner lies in a kept block: a dropped block is preceded, in the
    (value desc, index asc) order of ``lax.top_k``, by the maxima of K kept blocks. Ties
    therefore resolve to the lowest index, as in ``lax.top_k`` on all M. ``α`` is evaluated on
    the ``M / B`` block maxima and the ``K·B`` candidates only.

    Args:
      raw_logits: ``[..., M]`` float32 logits.
      top_k: ``K``.
      tau: clip ``τ``.
      block: block size ``B``; ``-1`` picks :func:`pruning_block`, ``None`` disables pruning.

    Returns:
      ``[..., K]`` int32 indices, by descending ``α`` (lowest index first among ties).
    """
    num_bases = raw_logits.shape[-1]
    if block == -1:
        block = pruning_block(num_bases, top_k)
    if block is None:
        return jax.lax.top_k(_alpha(raw_logits, tau), top_k)[1].astype(jnp.int32)
    num_blocks = -(-num_bases // block)
    if num_blocks < top_k:
        raise ValueError(f"top_k_indices: {num_blocks} blocks of {block} < top_k={top_k}.")
    lead = raw_logits.shape[:-1]
    # Block maxima of the raw logits (clip and softplus commute with max); a window reduction
    # pads the ragged last block with -inf without copying the [..., M] array.
    block_max = jax.lax.reduce_window(
        raw_logits,
        -jnp.inf,
        jax.lax.max,
        (1,) * len(lead) + (block,),
        (1,) * len(lead) + (block,),
        [(0, 0)] * len(lead) + [(0, num_blocks * block - num_bases)],
    )
    block_max = jnp.clip(block_max, -tau, tau)
    _, kept = jax.lax.top_k(jax.nn.softplus(block_max), top_k)  # [..., K] block ids
    candidates = (kept[..., None] * block + jnp.arange(block)).reshape(*lead, top_k * block)
    in_range = candidates < num_bases
    values = jnp.take_along_axis(raw_logits, jnp.minimum(candidates, num_bases - 1), axis=-1)
    values = jnp.where(in_range, _alpha(values, tau), -jnp.inf)
    return _top_k_lowest_index(values, candidates, top_k, num_bases)


def _top_k_lowest_index(values: jax.Array, ids: jax.Array, top_k: int, sentinel: int) -> jax.Array:
    """The ``ids`` of the ``top_k`` largest ``values`` (lowest id first among equal values),
    by ``top_k`` rounds of max / min-id / mask on the last axis. ``ids`` are distinct and
    ``< sentinel``."""
    chosen = []
    for _ in range(top_k):
        best = jnp.max(values, axis=-1, keepdims=True)
        winner = jnp.min(jnp.where(values == best, ids, sentinel), axis=-1, keepdims=True)
        chosen.append(winner)
        values = jnp.where(ids == winner, -jnp.inf, values)
    return jnp.concatenate(chosen, axis=-1).astype(jnp.int32)


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


def frame_floor(num_bases: int, d_model: int) -> float:
    """The least value of :func:`frame_loss` for unit rows: ``2·max(0, M²/d − M)``.

    Welch's bound: ``M`` unit vectors in ``R^d`` have ``Σ_{i,j}(u_i·u_j)² = ‖UᵀU‖_F² ≥
    (tr UᵀU)²/d = M²/d``, met by tight frames; the diagonal contributes ``M``. For ``M ≤ d``
    the floor is 0 (orthonormal rows). At M=256, d=64 it is 1,536 per bank; at M=65,536,
    d=128 about 6.7e7.
    """
    return 2.0 * max(0.0, num_bases * num_bases / d_model - num_bases)


def frame_excess(basis_u: jax.Array, basis_v: jax.Array) -> jax.Array:
    """:func:`frame_loss` minus :func:`frame_floor`: 0 for two tight frames, > 0 otherwise;
    the same gradient as the paper's ``L_frame`` (the floor is a constant). The DSC layer
    sows this, so the logged term measures what the regulariser can still remove."""
    num_bases, d_model = basis_u.shape[-2:]
    return frame_loss(basis_u, basis_v) - frame_floor(num_bases, d_model)
