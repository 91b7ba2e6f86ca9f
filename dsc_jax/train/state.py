"""Train state whose optimiser keeps the DSC bank on its sphere, created sharded.

:meth:`TrainState.create` chains :func:`dsc_jax.bank_retraction` (``bank_projection``:
``"retract"``, ``"tangent"`` or ``"none"``, and ``bank_radius``; see :mod:`dsc_jax.bank`)
after the optimiser, so ``apply_gradients`` (flax's own) leaves every bank row at norm
``bank_radius``. With a projection it also puts the initial bank rows there, so
``‖û_j‖ = r`` holds at every step (the DSC layer's forward normalisation makes this a no-op
on the function the model computes; ``r`` sets the atoms' learning speed).
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
from dsc_jax.bank import BANK_PROJECTIONS, DEFAULT_BANK_RADIUS, bank_retraction, retract_bank
from dsc_jax.sharding import LOGICAL_AXIS_RULES, Rules, abstract_sharded, init_sharded


@functools.lru_cache(maxsize=32)
def with_bank_projection(
    tx: optax.GradientTransformation, bank_projection: str, bank_radius: float
) -> optax.GradientTransformation:
    """``optax.chain(tx, bank_retraction(bank_projection, bank_radius=r))``, the same object
    for the same arguments (a train state's ``tx`` is static jit metadata: the abstract state
    and the real one must carry the identical transformation)."""
    return optax.chain(tx, bank_retraction(bank_projection, bank_radius=bank_radius))


class TrainState(train_state.TrainState):
    """``flax`` train state (``step`` int32 scalar, ``params``, ``opt_state``) whose ``tx``
    ends with :func:`dsc_jax.bank_retraction`."""

    bank_projection: str = struct.field(pytree_node=False, default="retract")
    bank_radius: float = struct.field(pytree_node=False, default=DEFAULT_BANK_RADIUS)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        tx: optax.GradientTransformation,
        bank_projection: str = "retract",
        bank_radius: float = DEFAULT_BANK_RADIUS,
        **kwargs: Any,
    ) -> TrainState:
        """New state at step 0 with ``tx`` chained with the bank projection (``params``
        may be boxed; bank rows put at norm ``bank_radius`` unless ``bank_projection ==
        "none"``)."""
        check_choice("config", "bank_projection", bank_projection, BANK_PROJECTIONS)
        if bank_projection != "none":  # boxes (nn.Partitioned) are kept
            params = retract_bank(params, bank_radius=bank_radius)
        tx = with_bank_projection(tx, bank_projection, bank_radius)
        return cls(
            step=jnp.zeros((), jnp.int32),
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            opt_state=tx.init(params),
            bank_projection=bank_projection,
            bank_radius=bank_radius,
            **kwargs,
        )


def _init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_tokens: jax.ShapeDtypeStruct,
    bank_projection: str,
    bank_radius: float,
) -> Callable[[jax.Array], TrainState]:
    """``rng -> TrainState`` with boxed (``nn.Partitioned``) params and optimiser moments."""

    def init_fn(rng: jax.Array) -> TrainState:
        tokens = jnp.zeros(example_tokens.shape, example_tokens.dtype)
        params = model.init({"params": rng}, tokens)["params"]
        return TrainState.create(
            apply_fn=model.apply,
            params=params,
            tx=tx,
            bank_projection=bank_projection,
            bank_radius=bank_radius,
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
    bank_radius: float = DEFAULT_BANK_RADIUS,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> tuple[TrainState, TrainState]:
    """Shapes and shardings of the train state, without computing it
    (:func:`dsc_jax.sharding.abstract_sharded` of the boxed init: optimiser moments inherit
    their parameter's logical axis names).

    Args:
      model: the Flax model (``model.init({"params": key}, tokens)``).
      tx: the optimiser.
      init_rng: parameter-init key.
      example_tokens: ``[B, T]`` int32 shape of a model input (no data needed).
      mesh: device mesh.
      bank_projection, bank_radius: see the module docstring.
      rules: logical-axis rules.

    Returns:
      ``(abstract_state, shardings)``: a :class:`TrainState` of ``jax.ShapeDtypeStruct``
      leaves carrying their sharding (a restore target), and the same tree of
      ``NamedSharding`` (for ``jit`` in/out shardings).
    """
    init_fn = _init_fn(model, tx, example_tokens, bank_projection, bank_radius)
    return abstract_sharded(init_fn, mesh, rules, args=(init_rng,))


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    init_rng: jax.Array,
    example_tokens: jax.ShapeDtypeStruct,
    shardings: TrainState,
    *,
    bank_projection: str = "retract",
    bank_radius: float = DEFAULT_BANK_RADIUS,
) -> TrainState:
    """Initialise the state directly in its sharded layout
    (:func:`dsc_jax.sharding.init_sharded`: each device computes its own shards only)."""
    init_fn = _init_fn(model, tx, example_tokens, bank_projection, bank_radius)
    return init_sharded(init_fn, shardings, args=(init_rng,))


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    init_rng: jax.Array,
    example_tokens: jax.ShapeDtypeStruct,
    mesh: Mesh,
    *,
    bank_projection: str = "retract",
    bank_radius: float = DEFAULT_BANK_RADIUS,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> tuple[TrainState, TrainState]:
    """:func:`abstract_train_state` then :func:`init_train_state`.

    Returns:
      ``(state, shardings)``: the unboxed :class:`TrainState` and its ``NamedSharding`` tree.
    """
    bank = dict(bank_projection=bank_projection, bank_radius=bank_radius)
    _, shardings = abstract_train_state(
        model, tx, init_rng, example_tokens, mesh, rules=rules, **bank
    )
    state = init_train_state(model, tx, init_rng, example_tokens, shardings, **bank)
    return state, shardings
