"""Product-key routing for :class:`dsc_jax.DSCLayer` (``router="product_key"``; PEER,
arXiv 2407.04153), all in float32.

The router input ``q`` (``x`` after the router LayerNorm: normalised per token, nothing is
pooled across positions) is split into halves ``q₁ = q[:d₁]``, ``q₂ = q[d₁:]`` (``d₁ = ⌊d/2⌋``).
Two sub-key tables score them: ``s₁ = q₁ K₁ + b₁ [N, n₁]`` and ``s₂ = q₂ K₂ + b₂ [N, n₂]``
with ``n₁·n₂ = M``. Atom ``j = i₁·n₂ + i₂`` has the raw logit ``r_j = s₁[i₁] + s₂[i₂]``, i.e.
the flat router with the factorised kernel ``W[:, j] = [K₁[:, i₁]; K₂[:, i₂]]``, so scoring
costs ``O(N·d·√M)`` instead of ``O(N·d·M)`` and no ``[N, M]`` array exists.

Top-K (:func:`product_key_top_k`): the top-K of each half, then the top-K of the ``K²``
candidate sums. Exact: a winner ``(i₁, i₂)`` with ``i₁`` outside the top-K of ``s₁`` is beaten
by the K pairs ``(a, i₂)``, ``a`` in that top-K (floating-point addition is monotone). Ties are
broken by the lowest atom id among the candidates; only exactly equal sums can differ from a
brute-force lowest-id rule (the selected *values* are always the top-K). The selected logits then
go through the same DSC gating as the flat router (:class:`dsc_jax.layers.dsc_router.DSCRouter`:
softplus, clip ``τ``, ``ẑ = φ/(S+ε)·tanh(S)``).

Regularisers without ``[N, M]`` arrays:

* z-loss: ``logsumexp_j r_j = logsumexp(s₁) + logsumexp(s₂)`` exactly, so
  :func:`product_key_z_loss` equals the flat router's z-loss on the full ``M`` logits.
* aux (load balance): on the factorised probabilities, one softmax per half:
  ``L_aux = ½ (n₁ Σ P₁² + n₂ Σ P₂²)`` with ``P_h = mean_tokens softmax(clip(s_h, -τ, τ))``.
  It is 1 at uniform usage of each half's keys, like the flat ``M Σ P²``; a per-token product
  ``p₁ ⊗ p₂`` averaged over tokens is not the product of the averages, so this balances the
  marginals (the row and column usage of the ``n₁×n₂`` grid), a proxy for the atom usage.
* joint aux (``product_key_aux="joint"``, :func:`product_key_joint_aux_loss`): the flat
  ``M Σ_j P_j²`` over all ``M`` atoms. The softmax of a sum factorises,
  ``softmax(s₁ ⊕ s₂)[i₁, i₂] = softmax(s₁)[i₁] · softmax(s₂)[i₂]``, so the mean atom
  probabilities are one matmul ``P = p₁ᵀ p₂ / N [n₁, n₂]``: ``O(N·M)`` FLOPs and an
  ``[n₁, n₂]`` (= ``M``) array, never ``[N, M]``. The halves are clipped separately
  (``clip(s₁) + clip(s₂)`` instead of ``clip(s₁ + s₂)``; equal whenever no score reaches
  ``τ/2``).
* selection aux (``product_key_aux="selection"``, :func:`product_key_selection_aux_loss`):
  Switch-style ``M Σ_j f_j P_j`` with ``f_j`` the fraction of the top-K picks that chose atom
  ``j`` (no gradient) and the same ``P``: it penalises the atoms that are *picked* too often,
  which the softmax means of a large bank hide (at M=65,536 they stay near uniform while the
  picks concentrate; see ``benchmarks/README.md``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsc_jax.layers import common, remat_names
from dsc_jax.layers.dsc_router import DSCRouter, Selection, aux_loss
from dsc_jax.layers.routing import top_k_lowest_index


def product_key_shape(owner: str, num_bases: int, rows: int) -> tuple[int, int]:
    """``(n₁, n₂)`` with ``n₁·n₂ = M``: ``rows`` is ``n₁`` (0: ``√M``, M a perfect square)."""
    if rows == 0:
        root = math.isqrt(num_bases)
        if root * root != num_bases:
            raise ValueError(
                f"{owner}.num_bases={num_bases} is invalid for router='product_key'; expected a "
                f"perfect square (e.g. {root * root} or {(root + 1) ** 2}) or set "
                "product_key_rows=n1 with n1 dividing num_bases."
            )
        return root, root
    if rows < 1 or num_bases % rows:
        raise ValueError(
            f"{owner}.product_key_rows={rows} is invalid; expected a positive divisor of "
            f"num_bases={num_bases} (n1·n2 = M) or 0 for √M."
        )
    return rows, num_bases // rows


class ProductKeyRouter(DSCRouter):
    """The product-key DSC router (see the module docstring): ``q [N, d] -> RouterOutput``.

    Attributes (besides :class:`dsc_jax.layers.dsc_router.DSCRouter`'s):
      rows: ``n₁`` (0: ``√M``, M a perfect square); ``n₂ = M / n₁``.
      aux: the load-balancing loss, ``"marginal"``, ``"joint"`` or ``"selection"``
        (:func:`product_key_balance_loss`).

    Parameters: ``keys_1/kernel [d₁, n₁]``, ``keys_1/bias [n₁]``, ``keys_2/kernel [d-d₁, n₂]``,
    ``keys_2/bias [n₂]`` (normal(``init_std``) kernels, zero biases). Regularisers: ``aux``
    as chosen, ``z`` = :func:`product_key_z_loss` (the flat z-loss over all ``M`` sums).
    """

    rows: int = 0
    aux: str = "marginal"

    def select(self, query: jax.Array) -> Selection:
        scores_1, scores_2 = self.scores(query)
        indices, selected = product_key_top_k(scores_1, scores_2, self.top_k)

        def regularizers() -> tuple[jax.Array, jax.Array]:
            aux = product_key_balance_loss(self.aux, scores_1, scores_2, indices, self.tau)
            return aux, product_key_z_loss(scores_1, scores_2)

        return indices, selected, regularizers

    def scores(self, query: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The two sub-key tables: ``q [N, d] -> (s₁ [N, n₁], s₂ [N, n₂])`` float32."""
        rows, cols = product_key_shape(type(self).__name__, self.num_bases, self.rows)
        half = query.shape[-1] // 2
        if half < 1:
            raise ValueError("DSCLayer: router='product_key' needs d_model >= 2.")
        scores = []
        for name, part, size in (
            ("keys_1", query[..., :half], rows),
            ("keys_2", query[..., half:], cols),
        ):
            dense = nn.Dense(
                size,
                dtype=jnp.float32,
                param_dtype=self.param_dtype,
                kernel_init=common.normal(self.init_std, ("embed", "subkeys")),
                bias_init=common.logical(nn.initializers.zeros, ("subkeys",)),
                name=name,
            )
            scores.append(checkpoint_name(dense(part), remat_names.DSC_ROUTER_LOGITS))
        return scores[0], scores[1]


def product_key_top_k(
    scores_1: jax.Array, scores_2: jax.Array, top_k: int
) -> tuple[jax.Array, jax.Array]:
    """Exact top-K atoms of ``r[i₁·n₂ + i₂] = s₁[i₁] + s₂[i₂]``.

    Args:
      scores_1: ``[N, n₁]``; scores_2: ``[N, n₂]`` (float32).
      top_k: ``K <= n₁·n₂``.

    Returns:
      ``(indices [N, K] int32, selected [N, K] float32)``: atom ids by descending ``r``
      (lowest id first among equal sums) and their raw logits ``s₁[i₁] + s₂[i₂]``, which carry
      the gradient into the two score tables (``K`` entries per token each).
    """
    rows, cols = scores_1.shape[-1], scores_2.shape[-1]
    fixed_1 = jax.lax.stop_gradient(scores_1)
    fixed_2 = jax.lax.stop_gradient(scores_2)
    values_1, ids_1 = jax.lax.top_k(fixed_1, min(top_k, rows))
    values_2, ids_2 = jax.lax.top_k(fixed_2, min(top_k, cols))
    sums = (values_1[..., :, None] + values_2[..., None, :]).reshape(*values_1.shape[:-1], -1)
    ids = (ids_1[..., :, None] * cols + ids_2[..., None, :]).reshape(sums.shape)
    indices = top_k_lowest_index(sums, ids, top_k, rows * cols)
    selected = jnp.take_along_axis(scores_1, indices // cols, axis=-1) + jnp.take_along_axis(
        scores_2, indices % cols, axis=-1
    )
    return indices, selected


def product_key_aux_loss(scores_1: jax.Array, scores_2: jax.Array, tau: float) -> jax.Array:
    """``½ (n₁ Σ P₁² + n₂ Σ P₂²)``, ``P_h = mean_tokens softmax(clip(s_h, -τ, τ))``."""
    total = jnp.zeros((), jnp.float32)
    for scores in (scores_1, scores_2):
        total = total + aux_loss(jnp.clip(scores.astype(jnp.float32), -tau, tau))
    return total / 2


def _mean_atom_probs(scores_1: jax.Array, scores_2: jax.Array, tau: float) -> jax.Array:
    """``P = mean_tokens softmax(clip(s₁) ⊕ clip(s₂)) = p₁ᵀ p₂ / N`` as ``[n₁, n₂]`` (one
    matmul, no ``[N, M]`` array; ``scores_h: [..., n_h]``)."""
    probs_1, probs_2 = (
        jax.nn.softmax(jnp.clip(s.astype(jnp.float32), -tau, tau), axis=-1).reshape(-1, s.shape[-1])
        for s in (scores_1, scores_2)
    )
    return probs_1.T @ probs_2 / probs_1.shape[0]


def product_key_joint_aux_loss(scores_1: jax.Array, scores_2: jax.Array, tau: float) -> jax.Array:
    """``M Σ_j P_j²`` with ``P`` the mean atom probabilities (:func:`_mean_atom_probs`)."""
    mean_probs = _mean_atom_probs(scores_1, scores_2, tau)
    return mean_probs.size * jnp.sum(jnp.square(mean_probs))


def product_key_selection_aux_loss(
    scores_1: jax.Array, scores_2: jax.Array, indices: jax.Array, tau: float
) -> jax.Array:
    """Switch-style ``M Σ_j f_j P_j``: ``f_j`` the fraction of the top-K picks ``indices
    [..., K]`` that chose atom ``j`` (no gradient), ``P`` the mean atom probabilities; 1 at
    uniform picks."""
    mean_probs = _mean_atom_probs(scores_1, scores_2, tau).reshape(-1)  # [M]
    picked = jnp.take(mean_probs, jax.lax.stop_gradient(indices).reshape(-1))
    return mean_probs.size * jnp.mean(picked)


def product_key_balance_loss(
    kind: str, scores_1: jax.Array, scores_2: jax.Array, indices: jax.Array, tau: float
) -> jax.Array:
    """The ``DSCLayer.product_key_aux`` load-balancing loss: ``"marginal"``
    (:func:`product_key_aux_loss`), ``"joint"`` or ``"selection"``."""
    if kind == "selection":
        return product_key_selection_aux_loss(scores_1, scores_2, indices, tau)
    if kind == "joint":
        return product_key_joint_aux_loss(scores_1, scores_2, tau)
    return product_key_aux_loss(scores_1, scores_2, tau)


def product_key_z_loss(scores_1: jax.Array, scores_2: jax.Array) -> jax.Array:
    """``mean_tokens (logsumexp(s₁) + logsumexp(s₂))²`` = the z-loss over all ``M`` sums."""
    lse = jax.nn.logsumexp(scores_1.astype(jnp.float32), axis=-1) + jax.nn.logsumexp(
        scores_2.astype(jnp.float32), axis=-1
    )
    return jnp.mean(jnp.square(lse))
