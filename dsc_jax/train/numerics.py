"""The numerics gate: no NaN or Inf is logged as a result or saved as a checkpoint.

Every step's training loss and a flag computed inside the jitted step (every parameter and
optimiser-state value is finite, :func:`checked_train_step`) stay on device until the next
log, evaluation or checkpoint; :meth:`NonFiniteGate.check` then reads them at once and
raises for the first bad step: :class:`NonFiniteLossError` for the loss,
:class:`NonFiniteStateError` for the state. No checkpoint of a bad state is ever written, so
the last good one stays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsc_jax.train import steps
from dsc_jax.train.checkpointing import Checkpointer
from dsc_jax.train.state import TrainState


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


class NonFiniteStateError(NonFiniteLossError):
    """A parameter or optimiser-state value became NaN or Inf."""


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every floating value of ``tree`` is finite (one fused reduction)."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def checked_train_step(
    state: TrainState, batch: jax.Array, rng: jax.Array, **kwargs: Any
) -> tuple[TrainState, dict[str, jax.Array]]:
    """:func:`steps.train_step` on ``batch [B, T + 1]`` plus ``metrics["state_finite"]``
    (the new params and optimiser state are all finite), which gates every checkpoint."""
    new_state, metrics = steps.train_step(state, batch, rng, **kwargs)
    finite = all_finite((new_state.params, new_state.opt_state))
    return new_state, dict(metrics, state_finite=finite)


Pending = list[tuple[int, jax.Array, jax.Array]]


def first_nonfinite(pending: Pending) -> tuple[int, type[NonFiniteLossError], str] | None:
    """``(step, error class, what)`` of the first ``(step, loss, state_finite)`` whose loss
    is not finite or whose state is not all finite, or ``None``."""
    values = jax.device_get([(loss, finite) for _, loss, finite in pending])
    for (step, _, _), (loss, finite) in zip(pending, values, strict=True):
        if not np.isfinite(loss):
            return step, NonFiniteLossError, f"training loss is {float(loss)}"
        if not bool(finite):
            return step, NonFiniteStateError, "a parameter or optimiser-state value is NaN or Inf"
    return None


class NonFiniteGate:
    """The per-step values not checked yet, and the check.

    Args:
      checkpointer: named in the error (its newest checkpoint is the last good one).
    """

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer
        self.pending: Pending = []

    def add(self, step: int, loss: jax.Array, state_finite: jax.Array) -> None:
        """Keep step ``step``'s scalar loss and finiteness flag (device arrays, not read)."""
        self.pending.append((step, loss, state_finite))

    def check(self) -> None:
        """Read every pending value (one transfer) and forget them.

        Raises:
          NonFiniteLossError: the loss of a pending step is NaN/Inf.
          NonFiniteStateError: the state after a pending step holds a NaN/Inf.
        """
        bad = first_nonfinite(self.pending) if self.pending else None
        self.pending.clear()
        if bad is None:
            return
        step, error, what = bad
        raise error(
            f"{what} at step {step}; stopping. The last good checkpoint "
            f"({self.checkpointer.latest_step_text()}) in {self.checkpointer.directory} is "
            "kept; lower the learning rate or check the data before resuming."
        )
