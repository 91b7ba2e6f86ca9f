"""Training losses: token cross-entropy and the weighted sum of the paper's sown regularisers.

Every FFN layer sows *unweighted* scalars into the ``"losses"`` collection under the term
names ``aux``, ``budget``, ``frame`` and ``z``. :func:`regularization_loss` sums each term over
all layers of a model and applies the weights of :class:`LossWeights`::

    logits, state = model.apply({"params": p}, tokens, mutable=["losses"], ...)
    total, terms = regularization_loss(state["losses"], LossWeights())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dsc_jax import paper
from dsc_jax._checks import check_positive_float

TERM_NAMES = ("aux", "budget", "frame", "z")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights ``λ`` of the regularisers (the paper's defaults); each must be ``>= 0``."""

    aux: float = paper.LOSS_WEIGHTS["aux"]
    budget: float = paper.LOSS_WEIGHTS["budget"]
    frame: float = paper.LOSS_WEIGHTS["frame"]
    z: float = paper.LOSS_WEIGHTS["z"]

    def __post_init__(self) -> None:
        for name in TERM_NAMES:
            check_positive_float(type(self).__name__, name, getattr(self, name), allow_zero=True)

    def as_dict(self) -> dict[str, float]:
        """``{"aux": λ_aux, "budget": λ_budget, "frame": λ_frame, "z": λ_z}``."""
        return {name: float(getattr(self, name)) for name in TERM_NAMES}


def _sum_values(value: Any, path: str) -> jax.Array:
    """Float32 sum of everything sown under one term name (a tuple of scalars, or arrays
    stacked by ``nn.scan``)."""
    leaves = jax.tree.leaves(value)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    for leaf in leaves:
        if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            raise ValueError(
                f"regularization_loss: value sown at {path!r} has dtype {jnp.asarray(leaf).dtype}; "
                "expected floating scalars."
            )
    return sum(jnp.sum(jnp.asarray(leaf, jnp.float32)) for leaf in leaves)


def sum_loss_terms(losses: Mapping[str, Any] | None) -> dict[str, jax.Array]:
    """Unweighted per-term totals over all layers of a sown ``"losses"`` collection.

    Args:
      losses: the ``"losses"`` collection (nested mappings whose leaf entries are the tuples
        that ``Module.sow`` stores), or ``None``/empty.

    Returns:
      ``{name: float32 scalar}`` for every name in :data:`TERM_NAMES` (zeros where absent).

    Raises:
      ValueError: for a term name outside :data:`TERM_NAMES` (the message gives its path).
    """
    totals = {name: jnp.zeros((), jnp.float32) for name in TERM_NAMES}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(value, path)
            elif key in totals:
                totals[key] = totals[key] + _sum_values(value, path)
            else:
                raise ValueError(
                    f"regularization_loss: unknown loss term {key!r} at {path!r}; "
                    f"expected one of {TERM_NAMES}."
                )

    if losses:
        walk(losses, "")
    return totals


def _count_terms(losses: Mapping[str, Any] | None) -> int:
    if not losses:
        return 0
    return sum(
        _count_terms(value) if isinstance(value, Mapping) else len(jax.tree.leaves(value))
        for value in losses.values()
    )


def regularization_loss(
    losses: Mapping[str, Any] | None,
    weights: LossWeights | None = None,
    *,
    allow_empty: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted regulariser total ``Σ_terms λ_term · Σ_layers L_term``.

    Args:
      losses: the sown ``"losses"`` collection of a whole model (see :func:`sum_loss_terms`).
      weights: the ``λ`` per term; :class:`LossWeights` defaults when ``None``.
      allow_empty: return zeros for a collection with no regulariser term. By default that
        raises: it is what a Linen model gets when ``"losses"`` was not mutable, or when
        ``nn.scan`` dropped the collection (``variable_axes`` without ``"losses"``). Pass
        ``True`` for models that have no routed layer (a dense GPT). (An NNX model's
        :func:`dsc_jax.nnx.collect_regularizers` is never empty: after a deterministic call
        its terms are zeros.)

    Returns:
      ``(total, terms)``: a float32 scalar and ``{"aux", "budget", "frame", "z"}`` -> weighted
      float32 scalars (zero for terms the model's layers do not produce).

    Raises:
      ValueError: an empty collection without ``allow_empty``, or an unknown term name.
    """
    if not allow_empty and _count_terms(losses) == 0:
        raise ValueError(
            "regularization_loss: the 'losses' collection holds no regulariser term "
            f"(got {losses!r}). Linen: apply the model with mutable=['losses'] (the layers "
            "sow them whatever `deterministic`); under nn.scan / nn.vmap add 'losses' to "
            "variable_axes (e.g. {'params': 0, 'losses': 0}). NNX (dsc_jax.nnx): pass "
            "dsc_jax.nnx.collect_regularizers(model) after a deterministic=False call (a "
            "deterministic call leaves zeros). For a model without routed layers pass "
            "allow_empty=True."
        )
    weights = LossWeights() if weights is None else weights
    lambdas = weights.as_dict()
    terms = {name: lambdas[name] * value for name, value in sum_loss_terms(losses).items()}
    total = sum(terms.values(), jnp.zeros((), jnp.float32))
    return total, terms


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean token cross-entropy in float32.

    Args:
      logits: ``[..., V]`` (any float dtype; computed in float32).
      targets: ``[...]`` integer class ids in ``[0, V)``.
      mask: optional ``[...]`` weights (bool or float); the mean is over masked-in tokens
        (0 when the mask is all zero).

    Returns:
      float32 scalar.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy_loss: logits shape {tuple(logits.shape)} does not match targets "
            f"shape {tuple(targets.shape)} (expected logits = targets + [V])."
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"cross_entropy_loss: targets dtype {targets.dtype} is not allowed; expected integers."
        )
    logits = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    nll = log_norm - target_logits[..., 0]
    if mask is None:
        return jnp.mean(nll)
    mask = jnp.broadcast_to(mask, nll.shape).astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
