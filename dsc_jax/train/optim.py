"""Optimiser of spec §7: AdamW with parameter groups, warm-up + cosine schedule, clipping.

Parameter groups are chosen by path rules on the parameter tree (only the dict keys of the
path count, so boxed ``nn.Partitioned`` trees label the same as unboxed ones):

* ``"router"``: any path component equals one of :data:`ROUTER_MODULE_NAMES`
  (``router``, ``router_norm``, ``gate``): the DSC/MoLoRA router kernel and bias, the router
  LayerNorm of DSC (refined) and MoE, the MoE gate. Learning rate
  ``router_lr_multiplier × lr(step)`` at every step, no weight decay.
* ``"decay"``: every other parameter with ``ndim >= 2`` (embeddings, attention and FFN
  kernels, the DSC bank ``basis_u``/``basis_v``, expert weights): AdamW weight decay.
* ``"no_decay"``: every other parameter (LayerNorm scales/biases, biases, DSC ``gamma``).

The whole chain is ``clip_by_global_norm`` (over all parameters, like PyTorch's
``clip_grad_norm_``) followed by one Adam (β₁, β₂, ε outside the square root, bias-corrected)
per group, decoupled weight decay ``lr·λ·θ`` on the ``"decay"`` group, and the group's
learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

ROUTER_MODULE_NAMES: tuple[str, ...] = ("router", "router_norm", "gate")
GROUPS: tuple[str, ...] = ("decay", "no_decay", "router")


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """The dict keys of a ``jax.tree_util`` key path, as strings (other key kinds dropped)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_group(
    path: Sequence[Any], leaf: Any, router_names: Sequence[str] = ROUTER_MODULE_NAMES
) -> str:
    """Group label (one of :data:`GROUPS`) of one parameter from its key path and array."""
    if any(name in router_names for name in path_names(path)):
        return "router"
    return "decay" if jnp.ndim(leaf) >= 2 else "no_decay"


def param_groups(params: Any, router_names: Sequence[str] = ROUTER_MODULE_NAMES) -> Any:
    """Tree of group labels with the structure of ``params`` (boxed or unboxed)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_group(path, leaf, router_names), params
    )


def lr_schedule(peak: float, minimum: float, warmup_steps: int, decay_steps: int) -> optax.Schedule:
    """Linear warm-up ``0 → peak`` over ``warmup_steps``, cosine ``peak → minimum`` until step
    ``decay_steps`` (counted from 0, warm-up included), then ``minimum``.

    ``lr(0) = 0``; ``lr(warmup_steps) = peak``; ``lr(s) = minimum`` for ``s >= decay_steps``.
    """
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(peak, decay_steps, alpha=minimum / peak)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        end_value=minimum,
    )


def _adam_group(
    schedule: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float
) -> optax.GradientTransformation:
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def make_optimizer(
    optim: ml_collections.ConfigDict,
    *,
    num_train_steps: int,
    router_lr_multiplier: float,
    router_names: Sequence[str] = ROUTER_MODULE_NAMES,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build the optimiser from the ``optim`` config group.

    Args:
      optim: fields ``learning_rate`` (peak), ``min_learning_rate``, ``warmup_steps``,
        ``decay_steps`` (0: ``num_train_steps``), ``weight_decay``, ``b1``, ``b2``, ``eps``,
        ``grad_clip_norm`` (0: no clipping).
      num_train_steps: default end of the cosine decay.
      router_lr_multiplier: router-group learning rate / base learning rate (every step).
      router_names: module names that mark router parameters (see the module docstring).

    Returns:
      ``(tx, schedule)``: the optax transformation and the base learning-rate schedule
      (``step -> lr``; the router group uses ``router_lr_multiplier × schedule``).
    """
    decay_steps = optim.decay_steps or num_train_steps
    schedule = lr_schedule(
        optim.learning_rate, optim.min_learning_rate, optim.warmup_steps, decay_steps
    )

    def router_schedule(step: jax.Array) -> jax.Array:
        return router_lr_multiplier * schedule(step)

    common = dict(b1=optim.b1, b2=optim.b2, eps=optim.eps)
    groups = {
        "decay": _adam_group(schedule, weight_decay=optim.weight_decay, **common),
        "no_decay": _adam_group(schedule, weight_decay=0.0, **common),
        "router": _adam_group(router_schedule, weight_decay=0.0, **common),
    }
    labels: Callable[[Any], Any] = lambda params: param_groups(params, router_names)  # noqa: E731
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(optax.multi_transform(groups, labels))
    return optax.chain(*parts), schedule


def default_optim_config() -> ml_collections.ConfigDict:
    """The ``optim`` config group with spec §7 values."""
    cfg = ml_collections.ConfigDict()
    cfg.learning_rate = 6e-4  # peak learning rate after warm-up
    cfg.min_learning_rate = 6e-5  # end value of the cosine decay
    cfg.warmup_steps = 150  # linear warm-up from 0 over this many steps
    cfg.decay_steps = 0  # step where the cosine reaches min_learning_rate; 0 = num_train_steps
    cfg.weight_decay = 0.02  # decoupled AdamW decay on >=2-D non-router parameters
    cfg.b1 = 0.9  # Adam β1
    cfg.b2 = 0.95  # Adam β2
    cfg.eps = 1e-8  # Adam ε (added to sqrt of the second moment)
    cfg.grad_clip_norm = 1.0  # global-norm gradient clipping; 0 disables
    return cfg
