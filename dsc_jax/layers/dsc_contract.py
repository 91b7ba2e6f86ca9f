"""The DSC bank contraction ``y_n = Σ_k ẑ_nk (x_n·u_{i_nk}) v_{i_nk}`` (the paper's
Algorithm 2: normalise the bank rows, project, gate, combine), and the sparse gradient of the
router's selected logits.

:func:`contract` is the bank step of :class:`dsc_jax.DSCLayer` on both compute paths:
``"dense"`` (every atom, a K-sparse gate row) and ``"gather"`` (:func:`contract_raw_banks`:
O(N·K·d) work, the ``[M, d]`` banks read through the ``[N, K]`` indices).
:func:`gathered_contraction` (on unit banks, or on raw banks normalising only the gathered
rows) and :func:`sparse_logit_gradient` each have a custom JVP whose tangent rule is linear and
sparse; JAX transposes it for reverse mode, so one rule serves every transform (``jax.grad``,
``jax.jvp`` / ``jax.linearize`` / ``jax.jacfwd``, and any nesting of them, e.g.
Hessian-vector products) with the efficiency of a hand-written VJP:

* the sum over ``k`` runs as K fused multiply-adds instead of a batched ``[1,K]×[K,d]``
  matmul per token (which XLA:CPU runs far slower; see ``benchmarks/README.md``); the
  tangent rules are broadcast products and reductions, whose transposes are the same kind of
  ops;
* the reverse pass re-gathers the selected rows from the banks instead of keeping
  ``[N, K, d]`` residuals alive (the tangent rules run under :func:`jax.checkpoint`, so only
  their inputs, e.g. the ``[N, K]`` projections, are saved), and the transpose of the
  tangents' one row gather (:func:`_tangent_rows`) is the one scatter-add, of the row
  gradients into the banks and of the selected columns' gradients into the router (a
  segment sum over the selected ids, accumulated in float32).

Higher derivatives differentiate the tangent rules themselves, which are exact.

Numerics: projections and coefficients in float32 (``preferred_element_type``), the
coefficient cast to the compute dtype before the combine (as the einsum form did), the sum
over ``k`` accumulated in float32; tangents in float32, cast to the primal dtypes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from dsc_jax.layers import remat_names
from dsc_jax.layers.routing import dense_gates

#: The compute paths of :func:`contract`.
COMPUTE_PATHS = ("gather", "dense")

RowNorms = tuple[jax.Array, jax.Array]


def _normalize(rows32: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(rows / max(ε, ‖row‖), max(ε, ‖row‖), ‖row‖ > ε)`` on float32 rows ``[..., d]``
    (the norms ``[..., 1]``)."""
    norms = jnp.sqrt(jnp.sum(jnp.square(rows32), axis=-1, keepdims=True))
    clamped = jnp.maximum(norms, eps)
    return rows32 / clamped, clamped, norms > eps


def normalize_rows(bank: jax.Array, eps: float) -> jax.Array:
    """``b_j / max(ε, ‖b_j‖₂)`` row-wise (the paper's bank normalisation). ``bank: [M, d]``;
    math in float32, result in ``bank.dtype``."""
    return _normalize(bank.astype(jnp.float32), eps)[0].astype(bank.dtype)


def _rows(bank: jax.Array, indices: jax.Array) -> jax.Array:
    """``bank[indices]``: ``[M, d]`` rows at ``[N, K]`` ids -> ``[N, K, d]`` (ids in range)."""
    return jnp.take(bank, indices, axis=0, mode="clip")


def _tangent_rows(bank_tangent: jax.Array, indices: jax.Array) -> jax.Array:
    """``bank_tangent[indices]`` in float32 (``[M, d]`` rows at ``[N, K]`` ids -> ``[N, K, d]``;
    a ``[M]`` vector -> ``[N, K]``): the one gather of the tangent rules, whose transpose is
    the one float32 scatter-add into ``[M, ...]`` (then a cast to the primal dtype)."""
    return bank_tangent.astype(jnp.float32).at[indices].get(mode="promise_in_bounds")


def _combine(weights: jax.Array, rows: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``Σ_k weights[:, k] rows[:, k]`` with a float32 accumulator: ``[N, K]``, ``[N, K, d]``."""
    total = None
    for k in range(rows.shape[1]):
        term = weights[:, k : k + 1].astype(jnp.float32) * rows[:, k].astype(jnp.float32)
        total = term if total is None else total + term
    return total.astype(dtype)


def _project(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x_n · rows_nk`` in float32: ``[N, d]``, ``[N, K, d]`` -> ``[N, K]``."""
    return jnp.einsum("nd,nkd->nk", x, rows, preferred_element_type=jnp.float32)


def _nonzero(tangent: Any) -> Any:
    """``tangent``, or None for a symbolic zero (a term the tangent rule can skip)."""
    return None if isinstance(tangent, SymbolicZero) else tangent


def _add(total: jax.Array | None, term: jax.Array) -> jax.Array:
    return term if total is None else total + term


def _slot_dot(vectors: jax.Array, rows: jax.Array) -> jax.Array:
    """``vectors_n · rows_nk`` in float32, one slot ``k`` at a time: ``[N, d]``, ``[N, K, d]``
    -> ``[N, K]``. Linear in ``vectors``; its transpose ``Σ_k c_nk rows_nk`` is K fused
    multiply-adds, as :func:`_combine`."""
    vectors = vectors.astype(jnp.float32)
    return jnp.stack([jnp.sum(vectors * rows[:, k], axis=-1) for k in range(rows.shape[1])], axis=1)


def _row_dot(weights: jax.Array, row_tangents: jax.Array) -> jax.Array:
    """``Σ_d weights ⊙ row_tangents`` -> ``[N, K]`` float32 (``weights`` ``[N, K, d]`` or
    ``[N, 1, d]``). Linear in ``row_tangents``; its transpose is the outer product
    ``weights ⊙ c[..., None]`` that the row gather's transpose scatter-adds."""
    return jnp.sum(weights * row_tangents, axis=-1)


def _contraction_tangent(
    x: jax.Array,
    u_rows: jax.Array,
    v_rows: jax.Array,
    gates: jax.Array,
    projections: jax.Array,
    tangents: tuple[jax.Array | None, jax.Array | None, jax.Array | None, jax.Array | None],
    norms: tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
) -> jax.Array:
    """Tangent of ``Σ_k (x·u_k) g_k v_k``, linear in ``tangents`` (None: a zero tangent).

    Args:
      x: ``[N, d]``; u_rows, v_rows: ``[N, K, d]`` float32 gathered unit rows;
        gates, projections: ``[N, K]`` float32 (``projections = x·u_k``).
      tangents: ``(ẋ [N, d], u̇ [N, K, d], v̇ [N, K, d], ġ [N, K])``, the row tangents in
        float32.
      norms: None when ``u̇``, ``v̇`` are the unit rows' tangents. Otherwise
        ``((‖b_u‖, above_u), (‖b_v‖, above_v))``, each ``[N, K, 1]`` (the clamped norms and
        ``‖b‖ > ε``), and ``u̇``, ``v̇`` are the RAW rows' tangents ``ḃ``: the normalisation's
        Jacobian ``(ḃ − û (û·ḃ)) / ‖b‖`` (``ḃ / ε`` below ``ε``) is folded into the sums, so
        that the transpose reuses ``x·û`` and ``c·v̂``, as a hand-written VJP would.

    Returns:
      ``[N, d]`` in ``x.dtype``. Written so that the transpose (the reverse pass) is made of
      the same ops as the forward pass: one batched ``[N, K]`` projection, K fused
      multiply-adds, outer products for the scatter-adds.
    """
    d_x, d_u, d_v, d_gates = tangents
    x32 = x.astype(jnp.float32)[:, None, :]  # [N, 1, d]
    coefficients = (projections * gates).astype(x.dtype).astype(jnp.float32)
    d_projections = None
    if d_x is not None:
        d_projections = _slot_dot(d_x, u_rows)
    if d_u is not None:
        weights = x32
        if norms is not None:  # x·dû = ((x − û (û·x)) / ‖b‖)·ḃ, û·x = projection
            norm, above = norms[0]
            weights = (x32 - jnp.where(above, u_rows * projections[..., None], 0)) / norm
        d_projections = _add(d_projections, _row_dot(weights, d_u))
    slots = None  # the coefficient of v̂_k in the tangent
    if d_projections is not None:
        slots = d_projections * gates
    if d_gates is not None:
        slots = _add(slots, projections * d_gates.astype(jnp.float32))
    out = None
    if d_v is not None:
        scale = coefficients[..., None]
        if norms is not None:  # c dv̂ = (c / ‖b‖) ḃ − v̂ (c (v̂·ḃ) / ‖b‖)
            norm, above = norms[1]
            scale = scale / norm
            radial = _row_dot(v_rows, d_v) * scale[..., 0]
            slots = _add(slots, -jnp.where(above[..., 0], radial, 0))
        out = jnp.sum(scale * d_v, axis=1)
    if slots is not None:
        # A batched [1, K] x [K, d] matmul per token: its transpose w.r.t. the slots is the
        # [N, K] projection of the cotangent (only forward mode runs the matmul itself).
        combined = jnp.einsum("nk,nkd->nd", slots, v_rows, preferred_element_type=jnp.float32)
        out = _add(out, combined)
    if out is None:
        return jnp.zeros(x.shape, x.dtype)
    return out.astype(x.dtype)


def _gather_rows(
    bank: jax.Array, indices: jax.Array, eps: float | None, dtype: jnp.dtype
) -> tuple[jax.Array, RowNorms | None]:
    """The unit rows ``[N, K, d]`` in ``dtype`` that the contraction reads, and their norms.

    ``eps=None``: ``bank`` already holds unit rows (in ``dtype``); norms None. Otherwise
    ``bank`` is raw: the gathered rows are normalised like :func:`normalize_rows` (float32
    math, cast to the bank dtype, then ``dtype``), norms ``(max(ε, ‖row‖), ‖row‖ > ε)``,
    each ``[N, K, 1]``.
    """
    rows = _rows(bank, indices)
    if eps is None:
        return rows, None
    unit, clamped, above = _normalize(rows.astype(jnp.float32), eps)
    return unit.astype(bank.dtype).astype(dtype), (clamped, above)


def gathered_contraction(
    x: jax.Array,
    bank_u: jax.Array,
    bank_v: jax.Array,
    indices: jax.Array,
    gates: jax.Array,
    eps: float | None = None,
) -> jax.Array:
    """``((x U_Iᵀ) ⊙ ẑ) V_I`` per token, over the gathered rows only.

    Args:
      x: ``[N, d]`` tokens (compute dtype).
      bank_u, bank_v: ``[M, d]``: unit-row banks in the compute dtype (``eps=None``), or the
        RAW banks (``eps`` given): then only the ``N·K`` gathered rows are normalised
        (``b_j / max(ε, ‖b_j‖)``), so no ``[M, d]`` unit bank is built and the forward work
        is O(N·K·d) whatever M; the tangent applies the normalisation's Jacobian per
        gathered row, ``(ḃ − û (û·ḃ)) / ‖b‖`` (``ḃ / ε`` below ``ε``), and the reverse pass,
        its transpose, applies it before the scatter-add.
      indices: ``[N, K]`` int32 selected atoms, in ``[0, M)``.
      gates: ``[N, K]`` float32 ``ẑ``.
      eps: ``ε`` of the row normalisation, or None for unit banks.

    Returns:
      ``[N, d]`` in ``x.dtype``.
    """
    return _contraction(x, bank_u, bank_v, indices, gates, eps)


#: :func:`gathered_contraction` on raw banks, ``(x, bank_u, bank_v, indices, gates, eps)``
#: (the name the raw-bank form has always had).
normalized_gathered_contraction = gathered_contraction


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _contraction(x, bank_u, bank_v, indices, gates, eps):
    return _forward(x, bank_u, bank_v, indices, gates, eps)[0]


def _forward(x, bank_u, bank_v, indices, gates, eps):
    unit_u = _gather_rows(bank_u, indices, eps, x.dtype)[0]
    unit_v = _gather_rows(bank_v, indices, eps, x.dtype)[0]
    projections = checkpoint_name(_project(x, unit_u), remat_names.DSC_LATENTS)  # [N, K] f32
    coefficients = (projections * gates).astype(x.dtype)
    return _combine(coefficients, unit_v, x.dtype), projections


@functools.partial(jax.checkpoint, static_argnums=(10,), prevent_cse=False)
def _tangent(x, bank_u, bank_v, indices, gates, projections, d_x, d_u, d_v, d_gates, eps):
    """:func:`_contraction_tangent` with the rows gathered (and normalised) here: under
    ``jax.checkpoint`` the reverse pass gathers them again instead of saving ``[N, K, d]``
    residuals (XLA may still share one gather between the two passes)."""
    unit_u, norms_u = _gather_rows(bank_u, indices, eps, x.dtype)
    unit_v, norms_v = _gather_rows(bank_v, indices, eps, x.dtype)
    du_rows = None if d_u is None else _tangent_rows(d_u, indices)
    dv_rows = None if d_v is None else _tangent_rows(d_v, indices)
    return _contraction_tangent(
        x,
        unit_u.astype(jnp.float32),
        unit_v.astype(jnp.float32),
        gates,
        projections,
        (d_x, du_rows, dv_rows, d_gates),
        norms=None if eps is None else (norms_u, norms_v),
    )


def _contraction_jvp(eps, primals, tangents):
    x, bank_u, bank_v, indices, gates = primals
    d_x, d_u, d_v, _, d_gates = map(_nonzero, tangents)
    out, projections = _forward(x, bank_u, bank_v, indices, gates, eps)
    tangent = _tangent(x, bank_u, bank_v, indices, gates, projections, d_x, d_u, d_v, d_gates, eps)
    return out, tangent


_contraction.defjvp(_contraction_jvp, symbolic_zeros=True)


@jax.custom_jvp
def sparse_logit_gradient(
    selected: jax.Array, inputs: jax.Array, kernel: jax.Array, bias: jax.Array, indices: jax.Array
) -> jax.Array:
    """Identity on ``selected = (inputs @ kernel + bias)[n, indices[n]]``, differentiated sparsely.

    The router computes all ``[N, M]`` logits densely (the top-K needs them), but only the K
    selected ones per token reach the output. Returning them through this function gives them
    the tangent ``ẋ_n·W[:, i] + x_n·Ẇ[:, i] + ḃ_i`` over the K selected columns only, so the
    reverse pass sends their gradient to ``inputs [N, d]``, ``kernel [d, M]`` and
    ``bias [M]`` in O(N·K·d) (a gather-combine and a scatter-add) instead of two dense
    ``[N, M]``-by-``d`` matmuls on a K-sparse ``[N, M]`` cotangent. The forward pass computes
    nothing.

    Pass ``selected`` WITH its gradient (not through ``stop_gradient``): its own tangent is
    ignored (so to first order nothing flows back through it, and XLA drops the dense work),
    but higher derivatives need its dependence on the parameters.

    Args:
      selected: ``[N, K]`` float32, the selected logits.
      inputs: ``[N, d]`` float32 router input; kernel: ``[d, M]``; bias: ``[M]``.
      indices: ``[N, K]`` int32 selected columns.

    Returns:
      ``selected``.
    """
    del inputs, kernel, bias, indices
    return selected


@functools.partial(jax.checkpoint, prevent_cse=False)
def _logit_tangent(inputs, kernel, indices, d_inputs, d_kernel, d_bias):
    """The selected logits' tangent ``[N, K]`` float32 (None: zero tangent), the kernel
    columns gathered here (re-gathered in the reverse pass, not saved)."""
    tangent = None
    if d_inputs is not None:
        columns = _rows(kernel.T.astype(jnp.float32), indices)  # [N, K, d]
        tangent = _slot_dot(d_inputs, columns)
    if d_kernel is not None:
        inputs32 = inputs.astype(jnp.float32)[:, None, :]
        tangent = _add(tangent, _row_dot(inputs32, _tangent_rows(d_kernel.T, indices)))
    if d_bias is not None:
        tangent = _add(tangent, _tangent_rows(d_bias, indices))
    return tangent


def _logit_jvp(primals, tangents):
    selected, inputs, kernel, _, indices = primals
    _, d_inputs, d_kernel, d_bias, _ = map(_nonzero, tangents)
    tangent = _logit_tangent(inputs, kernel, indices, d_inputs, d_kernel, d_bias)
    if tangent is None:
        tangent = jnp.zeros(selected.shape, selected.dtype)
    return selected, tangent.astype(selected.dtype)


sparse_logit_gradient.defjvp(_logit_jvp, symbolic_zeros=True)


def contract_raw_banks(
    x: jax.Array,
    bank_u: jax.Array,
    bank_v: jax.Array,
    indices: jax.Array,
    gates: jax.Array,
    eps: float,
) -> jax.Array:
    """The gather path on raw banks ``[M, d]``: ``((x U_Iᵀ) ⊙ ẑ) V_I`` with unit rows.

    Normalises whichever is less work: the whole bank once (``M ≤ N·K``, e.g. the paper's
    M=1523 at 4096 tokens) or only the ``N·K`` gathered rows (product-key banks of 65,536
    atoms). Both give the same values. A symbolic token count
    (``jax.export`` with a symbolic batch) normalises the gathered rows, whose cost scales
    with the tokens. ``x: [N, d]`` in the compute dtype.
    """
    slots = indices.size
    if not isinstance(slots, int) or bank_u.shape[0] > slots:
        return gathered_contraction(x, bank_u, bank_v, indices, gates, eps)
    unit_u = normalize_rows(bank_u, eps).astype(x.dtype)
    unit_v = normalize_rows(bank_v, eps).astype(x.dtype)
    return gathered_contraction(x, unit_u, unit_v, indices, gates)


def dense_contraction(
    x: jax.Array,
    bank_u: jax.Array,
    bank_v: jax.Array,
    indices: jax.Array,
    gates: jax.Array,
    eps: float,
) -> jax.Array:
    """The ``"dense"`` path: project ``x [N, d]`` onto every unit atom (``[N, M]``), keep the
    selected K through the K-sparse gate row (:func:`dsc_jax.layers.routing.dense_gates`),
    combine with every atom: two well-shaped matmuls, plain autodiff. Raw banks ``[M, d]``,
    normalised here; returns ``[N, d]`` in ``x.dtype``."""
    unit_u = normalize_rows(bank_u, eps).astype(x.dtype)
    unit_v = normalize_rows(bank_v, eps).astype(x.dtype)
    projections = jnp.einsum("nd,md->nm", x, unit_u, preferred_element_type=jnp.float32)
    coefficients = (projections * dense_gates(indices, gates, bank_u.shape[0])).astype(x.dtype)
    return jnp.einsum("nm,md->nd", coefficients, unit_v)


def contract(
    x: jax.Array,
    bank_u: jax.Array,
    bank_v: jax.Array,
    indices: jax.Array,
    gates: jax.Array,
    eps: float,
    path: str,
) -> jax.Array:
    """``((x U_Iᵀ) ⊙ ẑ) V_I`` with the unit rows of the raw banks ``[M, d]`` (the paper's
    Algorithm 2 contraction), on compute ``path`` ``"gather"`` (:func:`contract_raw_banks`)
    or ``"dense"`` (:func:`dense_contraction`). ``x: [N, d]`` in the compute dtype;
    ``indices``, ``gates``: ``[N, K]``; returns ``[N, d]``."""
    if path == "gather":
        return contract_raw_banks(x, bank_u, bank_v, indices, gates, eps)
    if path == "dense":
        return dense_contraction(x, bank_u, bank_v, indices, gates, eps)
    raise ValueError(f"contract: path={path!r} is invalid; expected one of {COMPUTE_PATHS}.")
