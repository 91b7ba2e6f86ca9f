"""The unit-sphere bank (spec §4): row retraction, tangent projection and an optax transform.

Every DSC bank parameter (a leaf named ``basis_u`` or ``basis_v``, shape ``[M, d]``) keeps
unit rows when the optimiser is chained with :func:`bank_retraction`::

    tx = optax.chain(optax.adamw(3e-4), dsc_jax.bank_retraction())
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)   # bank rows are unit again

``projection``:

* ``"retract"`` (default): after the optimiser's update, ``û ← û / max(ε, ‖û‖)`` row-wise;
* ``"tangent"``: the update ``Δ`` of each row is first projected onto the sphere's tangent
  space at the current unit row ``u``, ``Δ ← Δ − (Δ·u) u`` (this removes the radial part,
  including decoupled weight decay), then the retraction;
* ``"none"``: the updates pass through; rows drift off the sphere (the layer's forward pass
  still normalises them).

``optax.projections.projection_l2_sphere`` projects a whole pytree onto one sphere and
divides by a zero norm; the bank needs each row on its own sphere with the spec's
``max(ε, ‖û‖)`` guard, so the row-wise math is
:func:`dsc_jax.layers.dsc_router.normalize_rows` (the same function the forward pass uses).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsc_jax import paper
from dsc_jax._checks import check_choice
from dsc_jax.layers.dsc_router import normalize_rows
from dsc_jax.param_groups import BANK_PARAM_NAMES, is_bank_path

BANK_PROJECTIONS: tuple[str, ...] = ("retract", "tangent", "none")
BANK_EPS = paper.EPS

__all__ = [
    "BANK_EPS",
    "BANK_PARAM_NAMES",
    "BANK_PROJECTIONS",
    "bank_retraction",
    "is_bank_path",
    "retract_bank",
    "tangent_project_bank",
]


def retract_bank(params: Any, eps: float = BANK_EPS) -> Any:
    """Every bank leaf ``[M, d]`` with rows scaled to unit norm (math in float32); other
    leaves unchanged. Works on boxed (``nn.Partitioned``) trees."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: normalize_rows(p, eps) if is_bank_path(path) else p, params
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
    projection: str = "retract", eps: float = BANK_EPS
) -> optax.GradientTransformation:
    """An ``optax.GradientTransformation`` that, chained after an optimiser, makes
    ``optax.apply_updates`` leave every bank row on the unit sphere.

    Args:
      projection: ``"retract"``, ``"tangent"`` or ``"none"`` (module docstring).
      eps: the ``ε`` of ``max(ε, ‖û‖)``.

    Returns:
      A transformation whose ``update(updates, state, params)`` needs ``params``. A bank
      leaf's update becomes ``retract(params + Δ) − params`` in float32 (kept float32, so
      bfloat16 parameters land on the rounded unit row, not on a twice-rounded one).
    """
    check_choice("bank_retraction", "projection", projection, BANK_PROJECTIONS)

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
            return normalize_rows(param32 + update.astype(jnp.float32), eps) - param32

        return jax.tree_util.tree_map_with_path(retract, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)
