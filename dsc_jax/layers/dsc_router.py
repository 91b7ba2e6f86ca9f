"""The DSC routers and regularisers (the paper's Algorithm 1 and 2), all in float32.

This is the one place where the DSC routing equations live: :class:`DSCRouter` is the template
both DSC routers share (select K atoms and their raw logits, then :func:`gate`: softplus,
clip, ``ẑ = φ/(S+ε)·tanh(S)``, and the budget term); :class:`FlatRouter` selects with one
``[d, M]`` projection, :class:`dsc_jax.layers.dsc_product_key.ProductKeyRouter` with two
sub-key tables. The z-loss, shared with the MoE baselines, is
:func:`dsc_jax.layers.common.z_loss`; the bank normalisation is
:func:`dsc_jax.layers.dsc_contract.normalize_rows` (also importable from here).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsc_jax import paper
from dsc_jax.layers import remat_names
from dsc_jax.layers.common import Dtype, z_loss
from dsc_jax.layers.dsc_contract import normalize_rows as normalize_rows
from dsc_jax.layers.dsc_contract import sparse_logit_gradient
from dsc_jax.layers.routing import RouterOutput, router_projection, top_k_lowest_index

#: What :meth:`DSCRouter.select` returns: ``(indices [N, K] int32, selected raw logits
#: [N, K] float32, regularisers)``, the last a no-argument function giving ``(aux, z)``.
Selection = tuple[jax.Array, jax.Array, Callable[[], tuple[jax.Array, jax.Array]]]


class DSCRouter(nn.Module):
    """Template of the DSC routers: ``q [N, d] -> RouterOutput`` (float32).

    A subclass implements :meth:`select` (its scoring parameters and the top-K); this class
    gates the selected logits with :func:`gate` and adds the budget term to the subclass's
    ``aux`` and ``z``.

    Attributes:
      num_bases: ``M``.
      top_k: ``K``.
      tau: logit clip ``τ``.
      eps: ``ε`` of ``ẑ = φ / (S + ε) · tanh(S)``.
      budget_target: ``μ`` of ``L_budget = max(0, μ − mean(S))²``.
      init_std: std of the router kernels (biases start at zero).
      param_dtype: storage dtype of the router parameters.
    """

    num_bases: int
    top_k: int
    tau: float = paper.TAU
    eps: float = paper.EPS
    budget_target: float = paper.BUDGET_TARGET
    init_std: float = paper.INIT_STD
    param_dtype: Dtype = jnp.float32

    def select(self, query: jax.Array) -> Selection:
        """The K atoms of every token, their raw logits and the ``(aux, z)`` regularisers."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, query: jax.Array, *, with_losses: bool = False) -> RouterOutput:
        """Route ``query: [N, d]`` (the router input: LayerNorm(x), or x in Algorithm 1);
        ``with_losses`` computes :attr:`RouterOutput.losses` (``aux``, ``budget``, ``z``)."""
        indices, selected, regularizers = self.select(query.astype(jnp.float32))
        gates, signal = gate(selected, self.tau, self.eps)
        losses = {}
        if with_losses:
            aux, z = regularizers()
            losses = {"aux": aux, "budget": budget_loss(signal, self.budget_target), "z": z}
        return RouterOutput(indices, gates, signal, losses)


class FlatRouter(DSCRouter):
    """The paper's router: ``r_raw = q W_r + b_r [N, M]``, exact top-K of
    ``α = softplus(clip(r_raw, -τ, τ))`` (:func:`top_k_indices`), the selected logits'
    gradient over the K selected columns only (:func:`sparse_logit_gradient`).

    Parameters: ``kernel [d, M]`` (``embed, bases``), ``bias [M]`` (``bases``).
    Regularisers: ``aux`` = :func:`aux_loss` on the clipped logits, ``z`` =
    :func:`dsc_jax.layers.common.z_loss` on the raw ones.
    """

    def select(self, query: jax.Array) -> Selection:
        raw_logits, kernel, bias = router_projection(
            self,
            query,
            self.num_bases,
            axis="bases",
            init_std=self.init_std,
            param_dtype=self.param_dtype,
            use_bias=True,
        )  # [N, M]
        raw_logits = checkpoint_name(raw_logits, remat_names.DSC_ROUTER_LOGITS)
        indices = top_k_indices(jax.lax.stop_gradient(raw_logits), self.top_k, self.tau)
        selected = jnp.take_along_axis(raw_logits, indices, axis=-1)
        # φ's gradient over the K selected router columns only (O(N K d), not O(N M d)).
        selected = sparse_logit_gradient(selected, query, kernel, bias, indices)

        def regularizers() -> tuple[jax.Array, jax.Array]:
            return aux_loss(jnp.clip(raw_logits, -self.tau, self.tau)), z_loss(raw_logits)

        return indices, selected, regularizers


def gate(selected: jax.Array, tau: float, eps: float) -> tuple[jax.Array, jax.Array]:
    """``(ẑ, S)`` from the selected raw logits ``[..., K]``: ``φ = softplus(clip(r, -τ, τ))``,
    ``S = Σ_k φ_k``, ``ẑ = φ / (S + ε) · tanh(S)`` (the paper's Algorithm 2)."""
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


# Candidate-pruning parameters of :func:`top_k_indices` (see :func:`pruning_block`), chosen
# with benchmarks/layer_latency.py at the paper's sizes (blocks of 32 about as fast as 16,
# 64 slower; see benchmarks/README.md).
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
    return top_k_lowest_index(values, candidates, top_k, num_bases)


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
