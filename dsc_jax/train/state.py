"""Train state whose optimiser keeps the DSC bank on the unit sphere (spec §4), created sharded.

:meth:`TrainState.create` chains :func:`dsc_jax.bank_retraction` (``bank_projection``:
``"retract"``, ``"tangent"`` or ``"none"``; see :mod:`dsc_jax.bank`) after the optimiser, so
``apply_gradients`` (flax's own) leaves every bank row unit. With a projection it also
normalises the initial bank rows, so ``‖û_j‖ = 1`` holds at every step (the DSC layer's
forward normalisation makes this a no-op on the function the model computes).
"""

from __future__ import annotations

import functools
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
from dsc_jax.bank import BANK_PROJECTIONS, bank_retraction, retract_bank
from dsc_jax.sharding import LOGICAL_AXIS_RULES, Rules, logical_to_shardings


@functools.lru_cache(maxsize=64)
def _with_bank_retraction(
    tx: optax.GradientTransformation, bank_projection: str
) -> optax.GradientTransformation:
    """``optax.chain(tx, bank_retraction(...))``, the same object for the same ``tx``: the
    state's ``tx`` is static pytree metadata, so abstract and concrete states (and jit
    in/out shardings) must hold an equal one."""
    return optax.chain(tx, bank_retraction(bank_projection))


class TrainState(train_state.TrainState):
    """``flax`` train state (``step`` int32 scalar, ``params``, ``opt_state``) whose ``tx``
    ends with :func:`dsc_jax.bank_retraction`."""

    bank_projection: str = struct.field(pytree_node=False, default="retract")

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
        """New state at step 0 with ``tx`` chained with the bank projection (``params``
        may be boxed; bank rows normalised unless ``bank_projection == "none"``)."""
        check_choice("config", "bank_projection", bank_projection, BANK_PROJECTIONS)
        if bank_projection != "none":
            params = retract_bank(params)  # boxes (nn.Partitioned) are kept
        tx = _with_bank_retraction(tx, bank_projection)
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
