"""Train state with the projected-gradient bank normalisation of spec §4, created sharded.

After every optimiser update each row of every DSC bank parameter (leaf named ``basis_u`` or
``basis_v``, shape ``[M, d]``) is retracted onto the unit sphere, ``û ← û / max(ε, ‖û‖)``.
``bank_projection``:

* ``"retract"`` (default): optax update, then the retraction;
* ``"tangent"``: the optax update ``Δ`` of each bank row is first projected onto the
  sphere's tangent space at the current unit row ``u``, ``Δ ← Δ − (Δ·u) u`` (this removes
  the radial part, including decoupled weight decay), then the retraction;
* ``"none"``: plain optax update; rows drift off the sphere (the forward pass still
  normalises them).

With a projection, :meth:`TrainState.create` also normalises the initial bank rows, so the
invariant ``‖û_j‖ = 1`` holds at every step (the DSC layer's forward normalisation makes this
a no-op on the function the model computes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh

from dsc_jax._checks import check_choice
from dsc_jax.router import normalize_rows
from dsc_jax.sharding import LOGICAL_AXIS_RULES, Rules, logical_to_shardings
from dsc_jax.train.optim import path_names

BANK_PROJECTIONS: tuple[str, ...] = ("retract", "tangent", "none")
BANK_PARAM_NAMES: tuple[str, ...] = ("basis_u", "basis_v")
BANK_EPS = 1e-6  # ε of spec §2 step 6 / §4


def is_bank_path(path: Any) -> bool:
    """Whether a key path ends in a bank parameter name (``basis_u`` / ``basis_v``)."""
    names = path_names(path)
    return bool(names) and names[-1] in BANK_PARAM_NAMES


def retract_bank(params: Any, eps: float = BANK_EPS) -> Any:
    """Every bank leaf ``[M, d]`` with rows scaled to unit norm (math in float32)."""
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


class TrainState(train_state.TrainState):
    """``flax`` train state (``step`` int32 scalar, ``params``, ``opt_state``) whose
    :meth:`apply_gradients` applies the optax update and then the bank projection."""

    bank_projection: str = struct.field(pytree_node=False, default="retract")

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """One optimiser step; returns the new state with ``step + 1``."""
        updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params)
        if self.bank_projection == "tangent":
            updates = tangent_project_bank(self.params, updates)
        new_params = optax.apply_updates(self.params, updates)
        if self.bank_projection != "none":
            new_params = retract_bank(new_params)
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs
        )

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        tx: optax.GradientTransformation,
        bank_projection: str = "retract",
        **kwargs: Any,
    ) -> TrainState:
        """New state at step 0 (``params`` may be boxed; bank rows normalised unless
        ``bank_projection == "none"``)."""
        check_choice("config", "bank_projection", bank_projection, BANK_PROJECTIONS)
        if bank_projection != "none":
            params = retract_bank(params)  # boxes (nn.Partitioned) are kept
        return cls(
            step=jnp.zeros((), jnp.int32),
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            opt_state=tx.init(params),
            bank_projection=bank_projection,
            **kwargs,
        )


def _init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_tokens: jax.ShapeDtypeStruct,
    bank_projection: str,
) -> Callable[[jax.Array], TrainState]:
    """``rng -> TrainState`` with boxed (``nn.Partitioned``) params and optimiser moments."""

    def init_fn(rng: jax.Array) -> TrainState:
        tokens = jnp.zeros(example_tokens.shape, example_tokens.dtype)
        params = model.init({"params": rng}, tokens)["params"]
        return TrainState.create(
            apply_fn=model.apply, params=params, tx=tx, bank_projection=bank_projection
        )

    return init_fn


def abstract_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    init_rng: jax.Array,
    example_tokens: jax.ShapeDtypeStruct,
    mesh: Mesh,
    *,
    bank_projection: str = "retract",
    rules: Rules = LOGICAL_AXIS_RULES,
) -> tuple[TrainState, TrainState]:
    """Shapes and shardings of the train state, without computing it.

    ``jax.eval_shape`` of the boxed init gives the logical axis names of every parameter
    (optimiser moments inherit their parameter's boxes); they become ``NamedSharding``\\ s
    on ``mesh`` through :func:`dsc_jax.sharding.logical_to_shardings`.

    Args:
      model: the Flax model (``model.init({"params": key}, tokens)``).
      tx: the optimiser.
      init_rng: parameter-init key.
      example_tokens: ``[B, T]`` int32 shape of a model input (no data needed).
      mesh: device mesh.
      bank_projection: see the module docstring.
      rules: logical-axis rules.

    Returns:
      ``(abstract_state, shardings)``: a :class:`TrainState` of ``jax.ShapeDtypeStruct``
      leaves carrying their sharding (a restore target), and the same tree of
      ``NamedSharding`` (for ``jit`` in/out shardings).
    """
    boxed = jax.eval_shape(_init_fn(model, tx, example_tokens, bank_projection), init_rng)
    shardings = logical_to_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    init_rng: jax.Array,
    example_tokens: jax.ShapeDtypeStruct,
    shardings: TrainState,
    *,
    bank_projection: str = "retract",
) -> TrainState:
    """Initialise the state directly in its sharded layout (jitted init with
    ``out_shardings``: each device computes its shards only)."""
    init_fn = _init_fn(model, tx, example_tokens, bank_projection)
    return jax.jit(lambda rng: nn.unbox(init_fn(rng)), out_shardings=shardings)(init_rng)


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    init_rng: jax.Array,
    example_tokens: jax.ShapeDtypeStruct,
    mesh: Mesh,
    *,
    bank_projection: str = "retract",
    rules: Rules = LOGICAL_AXIS_RULES,
) -> tuple[TrainState, TrainState]:
    """:func:`abstract_train_state` then :func:`init_train_state`.

    Returns:
      ``(state, shardings)``: the unboxed :class:`TrainState` and its ``NamedSharding`` tree.
    """
    _, shardings = abstract_train_state(
        model, tx, init_rng, example_tokens, mesh, bank_projection=bank_projection, rules=rules
    )
    state = init_train_state(
        model, tx, init_rng, example_tokens, shardings, bank_projection=bank_projection
    )
    return state, shardings
