"""The bank on its sphere (the paper's projected-gradient normalisation): row retraction,
tangent projection and an optax transform.

Every DSC bank parameter (a leaf named ``basis_u`` or ``basis_v``, shape ``[M, d]``) keeps
its rows at norm ``bank_radius`` when the optimiser is chained with :func:`bank_retraction`::

    tx = optax.chain(optax.adamw(3e-4), dsc_jax.bank_retraction())
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)   # bank rows are back at norm r

``projection``:

* ``"retract"`` (default): after the optimiser's update, ``û ← r · û / max(ε, ‖û‖)``
  row-wise;
* ``"tangent"``: the update ``Δ`` of each row is first projected onto the sphere's tangent
  space at the current row direction ``u``, ``Δ ← Δ − (Δ·u) u`` (this removes the radial
  part, including decoupled weight decay), then the retraction;
* ``"none"``: the updates pass through; rows drift off the sphere (the layer's forward pass
  still normalises them). The reference code's bank.

Why a radius. The layer normalises the rows in its forward pass, so ``r`` changes nothing
the model computes; it sets the atoms' angular learning rate. The gradient of a raw row
is ``(I − u uᵀ) g / r``; Adam divides by its running scale, so every raw coordinate moves
by about the learning rate whatever ``r`` is, and the direction ``u`` turns by about
``lr·√d / r`` radians per step. Rows held at ``r = 1`` turn 50× slower than rows at the
reference code's 0.02. :data:`dsc_jax.layers.dsc.DEFAULT_BANK_RADIUS` is the default of the
layer and of this transform; pass the layer's ``bank_radius`` here when you change it.

``optax.projections.projection_l2_sphere`` projects a whole pytree onto one sphere and
divides by a zero norm; the bank needs each row on its own sphere with the paper's
``max(ε, ‖û‖)`` guard, so the row-wise math is
:func:`dsc_jax.layers.dsc_contract.normalize_rows` (the same function the forward pass uses).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsc_jax import paper
from dsc_jax._checks import check_choice, check_positive_float
from dsc_jax.layers.dsc import DEFAULT_BANK_RADIUS
from dsc_jax.layers.dsc_contract import normalize_rows
from dsc_jax.param_groups import BANK_PARAM_NAMES, is_bank_path

BANK_PROJECTIONS: tuple[str, ...] = ("retract", "tangent", "none")
BANK_EPS = paper.EPS

__all__ = [
    "BANK_EPS",
    "BANK_PARAM_NAMES",
    "BANK_PROJECTIONS",
    "DEFAULT_BANK_RADIUS",
    "bank_retraction",
    "is_bank_path",
    "retract_bank",
    "tangent_project_bank",
]


def _on_sphere(rows: jax.Array, bank_radius: float, eps: float) -> jax.Array:
    """``r · b_j / max(ε, ‖b_j‖)`` row-wise in float32, in ``rows``' dtype."""
    return (bank_radius * normalize_rows(rows.astype(jnp.float32), eps)).astype(rows.dtype)


def retract_bank(
    params: Any, eps: float = BANK_EPS, *, bank_radius: float = DEFAULT_BANK_RADIUS
) -> Any:
    """Every bank leaf ``[M, d]`` with rows scaled to norm ``bank_radius`` (math in float32);
    other leaves unchanged. Works on boxed (``nn.Partitioned``) trees."""
    check_positive_float("retract_bank", "bank_radius", bank_radius)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: _on_sphere(p, bank_radius, eps) if is_bank_path(path) else p, params
    )


def tangent_project_bank(params: Any, updates: Any, eps: float = BANK_EPS) -> Any:
    """Bank updates with their radial part removed: ``Δ_j − (Δ_j·u_j) u_j`` row-wise, where
    ``u_j`` is the unit direction of the current row ``û_j``. Other updates pass through."""

    def project(path: Any, update: Any, param: Any) -> Any:
        if not is_bank_path(path):
            return update
        unit = normalize_rows(param, eps).astype(jnp.float32)
        upd = update.astype(jnp.float32)
        radial = jnp.sum(upd * unit, axis=-1, keepdims=True)
        return (upd - radial * unit).astype(update.dtype)

    return jax.tree_util.tree_map_with_path(project, updates, params)


class BankRetractionState(NamedTuple):
    """:func:`bank_retraction` keeps no state."""


def bank_retraction(
    projection: str = "retract",
    eps: float = BANK_EPS,
    *,
    bank_radius: float = DEFAULT_BANK_RADIUS,
) -> optax.GradientTransformation:
    """An ``optax.GradientTransformation`` that, chained after an optimiser, makes
    ``optax.apply_updates`` leave every bank row on the sphere of radius ``bank_radius``.

    Args:
      projection: ``"retract"``, ``"tangent"`` or ``"none"`` (module docstring).
      eps: the ``ε`` of ``max(ε, ‖û‖)``.
      bank_radius: the rows' norm ``r``; use the layer's ``bank_radius`` (the module
        docstring says why it sets the atoms' learning rate).

    Returns:
      A transformation whose ``update(updates, state, params)`` needs ``params``. A bank
      leaf's update becomes ``retract(params + Δ) − params`` in float32 (kept float32, so
      bfloat16 parameters land on the rounded row, not on a twice-rounded one).
    """
    check_choice("bank_retraction", "projection", projection, BANK_PROJECTIONS)
    check_positive_float("bank_retraction", "bank_radius", bank_radius)

    def init_fn(params: Any) -> BankRetractionState:
        del params
        return BankRetractionState()

    def update_fn(
        updates: Any, state: BankRetractionState, params: Any = None
    ) -> tuple[Any, BankRetractionState]:
        if projection == "none":
            return updates, state
        if params is None:
            raise ValueError(
                "bank_retraction needs the parameters: call tx.update(grads, state, params)."
            )
        if projection == "tangent":
            updates = tangent_project_bank(params, updates, eps)

        def retract(path: Any, update: Any, param: Any) -> Any:
            if not is_bank_path(path):
                return update
            param32 = param.astype(jnp.float32)
            return _on_sphere(param32 + update.astype(jnp.float32), bank_radius, eps) - param32

        return jax.tree_util.tree_map_with_path(retract, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)
