"""The DSC bank contraction ``y_n = Σ_k ẑ_nk (x_n·u_{i_nk}) v_{i_nk}`` over gathered atoms.

:func:`gathered_contraction` is the ``compute="gather"`` path of :class:`dsc_jax.DSCLayer`:
O(N·K·d) work, the ``[M, d]`` banks read through the ``[N, K]`` indices. It has a custom VJP:

* the sum over ``k`` runs as K fused multiply-adds instead of a batched ``[1,K]×[K,d]``
  matmul per token (on XLA:CPU the batched form costs ~5× more);
* the backward pass re-gathers the selected rows from the banks instead of keeping two
  ``[N, K, d]`` residuals alive (it saves the ``[N, K]`` projections only), and scatter-adds
  the row gradients into the banks (a segment sum over the selected ids).

Numerics: projections and coefficients in float32 (``preferred_element_type``), the
coefficient cast to the compute dtype before the combine (as the einsum form did), the sum
over ``k`` accumulated in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsc_jax.layers.dsc_router import normalize_rows


def _rows(bank: jax.Array, indices: jax.Array) -> jax.Array:
    """``bank[indices]``: ``[M, d]`` rows at ``[N, K]`` ids -> ``[N, K, d]`` (ids in range)."""
    return jnp.take(bank, indices, axis=0, mode="clip")


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


@jax.custom_vjp
def gathered_contraction(
    x: jax.Array,
    unit_u: jax.Array,
    unit_v: jax.Array,
    indices: jax.Array,
    gates: jax.Array,
) -> jax.Array:
    """``((x U_Iᵀ) ⊙ ẑ) V_I`` per token.

    Args:
      x: ``[N, d]`` tokens (compute dtype).
      unit_u, unit_v: ``[M, d]`` unit-row banks (compute dtype).
      indices: ``[N, K]`` int32 selected atoms, in ``[0, M)``.
      gates: ``[N, K]`` float32 ``ẑ``.

    Returns:
      ``[N, d]`` in ``x.dtype``.
    """
    return _forward(x, unit_u, unit_v, indices, gates)[0]


def _forward(x, unit_u, unit_v, indices, gates):
    projections = _project(x, _rows(unit_u, indices))  # [N, K] float32
    coefficients = (projections * gates).astype(x.dtype)
    out = _combine(coefficients, _rows(unit_v, indices), x.dtype)
    return out, (x, unit_u, unit_v, indices, gates, projections)


def _backward(residuals, cotangent):
    x, unit_u, unit_v, indices, gates, projections = residuals
    coefficients = (projections * gates).astype(x.dtype)
    d_coefficients = _project(cotangent, _rows(unit_v, indices))  # [N, K] float32
    d_projections = d_coefficients * gates
    d_gates = d_coefficients * projections
    d_x = _combine(d_projections, _rows(unit_u, indices), x.dtype)
    num_rows = unit_u.shape[0]
    d_u = _scatter_rows(d_projections, x, indices, num_rows).astype(unit_u.dtype)
    d_v = _scatter_rows(coefficients, cotangent, indices, num_rows).astype(unit_v.dtype)
    return d_x, d_u, d_v, None, d_gates.astype(gates.dtype)


gathered_contraction.defvjp(_forward, _backward)


def _scatter_rows(weights: jax.Array, vectors: jax.Array, indices: jax.Array, num_rows: int):
    """``G[j] = Σ_{(n,k): i_nk = j} weights_nk vectors_n`` in float32 -> ``[num_rows, d]``."""
    updates = weights.astype(jnp.float32)[:, :, None] * vectors.astype(jnp.float32)[:, None]
    return (
        jnp.zeros((num_rows, vectors.shape[-1]), jnp.float32)
        .at[indices.reshape(-1)]
        .add(updates.reshape(-1, vectors.shape[-1]), mode="promise_in_bounds")
    )


@jax.custom_vjp
def sparse_logit_gradient(
    selected: jax.Array, inputs: jax.Array, kernel: jax.Array, bias: jax.Array, indices: jax.Array
) -> jax.Array:
    """Identity on ``selected = (inputs @ kernel + bias)[n, indices[n]]``, differentiated sparsely.

    The router computes all ``[N, M]`` logits densely (the top-K needs them), but only the K
    selected ones per token reach the output. Returning them through this function sends
    their gradient to ``inputs [N, d]``, ``kernel [d, M]`` and ``bias [M]`` over the selected
    columns only (O(N·K·d): a gather-combine and a scatter-add), instead of two dense
    ``[N, M]``-by-``d`` matmuls on a K-sparse ``[N, M]`` cotangent. ``selected`` itself gets a
    zero cotangent, so pass it with its gradient stopped, or let other terms (the aux and z
    losses) differentiate the dense logits. The forward pass computes nothing.
    """
    del inputs, kernel, bias, indices
    return selected


def _logit_forward(selected, inputs, kernel, bias, indices):
    return selected, (inputs, kernel, bias, indices)


def _logit_backward(residuals, cotangent):
    inputs, kernel, bias, indices = residuals
    columns = kernel.T  # [M, d]: the selected columns as rows
    d_inputs = _combine(cotangent, _rows(columns, indices), inputs.dtype)
    d_kernel = _scatter_rows(cotangent, inputs, indices, kernel.shape[1]).T.astype(kernel.dtype)
    d_bias = (
        jnp.zeros(bias.shape, jnp.float32)
        .at[indices.reshape(-1)]
        .add(cotangent.reshape(-1).astype(jnp.float32), mode="promise_in_bounds")
        .astype(bias.dtype)
    )
    return jnp.zeros_like(cotangent), d_inputs, d_kernel, d_bias, None


sparse_logit_gradient.defvjp(_logit_forward, _logit_backward)


def _unit_rows(bank: jax.Array, indices: jax.Array, eps: float, dtype: jnp.dtype):
    """Gathered rows normalised like :func:`dsc_router.normalize_rows` (float32 math, cast to
    the bank dtype, then ``dtype``) and their float32 norms ``max(ε, ‖row‖)``: ``[N, K, d]``,
    ``[N, K, 1]``."""
    rows32 = _rows(bank, indices).astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(jnp.square(rows32), axis=-1, keepdims=True))
    clamped = jnp.maximum(norms, eps)
    unit = (rows32 / clamped).astype(bank.dtype).astype(dtype)
    return unit, clamped, norms > eps


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalized_gathered_contraction(
    x: jax.Array,
    bank_u: jax.Array,
    bank_v: jax.Array,
    indices: jax.Array,
    gates: jax.Array,
    eps: float,
) -> jax.Array:
    """:func:`gathered_contraction` on the RAW banks, normalising only the ``N·K`` gathered
    rows (``b_j / max(ε, ‖b_j‖)``), so no ``[M, d]`` unit bank is built: the work is
    O(N·K·d) in the forward pass whatever M (at M=65,536, d=384 normalising both banks costs
    more than the whole layer). The backward pass applies the normalisation's Jacobian per
    gathered row, ``(g − û (û·g)) / ‖b‖`` (``g / ε`` below ``ε``), before the scatter-add.

    Args:
      x: ``[N, d]``; bank_u, bank_v: ``[M, d]`` raw banks; indices: ``[N, K]`` int32;
      gates: ``[N, K]`` float32; eps: ``ε``.
    """
    return _normalized_forward(x, bank_u, bank_v, indices, gates, eps)[0]


def _normalized_forward(x, bank_u, bank_v, indices, gates, eps):
    unit_u = _unit_rows(bank_u, indices, eps, x.dtype)[0]
    unit_v = _unit_rows(bank_v, indices, eps, x.dtype)[0]
    projections = _project(x, unit_u)
    coefficients = (projections * gates).astype(x.dtype)
    out = _combine(coefficients, unit_v, x.dtype)
    return out, (x, bank_u, bank_v, indices, gates, projections)


def _normalized_backward(eps, residuals, cotangent):
    x, bank_u, bank_v, indices, gates, projections = residuals
    unit_u, norm_u, above_u = _unit_rows(bank_u, indices, eps, x.dtype)
    unit_v, norm_v, above_v = _unit_rows(bank_v, indices, eps, x.dtype)
    coefficients = (projections * gates).astype(x.dtype)
    d_coefficients = _project(cotangent, unit_v)  # [N, K] = cot · v̂
    d_projections = d_coefficients * gates
    d_gates = d_coefficients * projections
    d_x = _combine(d_projections, unit_u, x.dtype)
    x32, cot32 = x.astype(jnp.float32)[:, None], cotangent.astype(jnp.float32)[:, None]
    # d û = d_proj · x and d v̂ = coef · cot per slot; û·x = proj, v̂·cot = d_coef.
    tangent_u = x32 - jnp.where(above_u, unit_u.astype(jnp.float32) * projections[..., None], 0)
    tangent_v = cot32 - jnp.where(
        above_v, unit_v.astype(jnp.float32) * d_coefficients[..., None], 0
    )
    rows_u = d_projections[..., None] * tangent_u / norm_u
    rows_v = coefficients.astype(jnp.float32)[..., None] * tangent_v / norm_v
    d_u = _scatter_slots(rows_u, indices, bank_u.shape[0]).astype(bank_u.dtype)
    d_v = _scatter_slots(rows_v, indices, bank_v.shape[0]).astype(bank_v.dtype)
    return d_x, d_u, d_v, None, d_gates.astype(gates.dtype)


normalized_gathered_contraction.defvjp(_normalized_forward, _normalized_backward)


def _scatter_slots(rows: jax.Array, indices: jax.Array, num_rows: int) -> jax.Array:
    """``G[j] = Σ_{(n,k): i_nk = j} rows_nk``: ``[N, K, d]`` float32 -> ``[num_rows, d]``."""
    return (
        jnp.zeros((num_rows, rows.shape[-1]), jnp.float32)
        .at[indices.reshape(-1)]
        .add(rows.reshape(-1, rows.shape[-1]), mode="promise_in_bounds")
    )


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
    M=1523 at 4096 tokens: 10× fewer rows) or only the ``N·K`` gathered rows (product-key
    banks of 65,536 atoms). Both give the same values. ``x: [N, d]`` in the compute dtype.
    """
    if bank_u.shape[0] > indices.size:
        return normalized_gathered_contraction(x, bank_u, bank_v, indices, gates, eps)
    unit_u = normalize_rows(bank_u, eps).astype(x.dtype)
    unit_v = normalize_rows(bank_v, eps).astype(x.dtype)
    return gathered_contraction(x, unit_u, unit_v, indices, gates)
