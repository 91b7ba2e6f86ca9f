"""Optimiser of the paper's recipe (its Table 2): AdamW with parameter groups, warm-up +
cosine schedule, clipping.

Parameter groups are :func:`dsc_jax.param_groups.param_labels`: ``"router"`` (learning
rate ``router_lr_multiplier × lr(step)`` at every step, no weight decay), ``"bank"`` and
``"decay"`` (AdamW weight decay), ``"no_decay"`` (none). DSC ``gamma`` is not decayed
unless ``optim.decay_gamma`` (the paper's reference code decays it; the paper decays only
≥2-D parameters).

The whole chain is ``clip_by_global_norm`` (over all parameters, like PyTorch's
``clip_grad_norm_``) followed by one Adam (β₁, β₂, ε outside the square root, bias-corrected)
per group, decoupled weight decay ``lr·λ·θ`` on the ``"decay"`` group, and the group's
learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from dsc_jax import paper
from dsc_jax.param_groups import ROUTER_MODULE_NAMES, param_labels


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
        ``grad_clip_norm`` (0: no clipping), ``decay_gamma``.
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
    groups["bank"] = groups["decay"]  # one Adam per group of GROUPS; the bank decays too

    def labels(params: Any) -> Any:
        return param_labels(params, router_names=router_names, decay_gamma=optim.decay_gamma)

    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(optax.multi_transform(groups, labels))
    return optax.chain(*parts), schedule


def default_optim_config() -> ml_collections.ConfigDict:
    """The ``optim`` config group with the paper's values (its Table 2)."""
    cfg = ml_collections.ConfigDict()
    cfg.learning_rate = paper.LEARNING_RATE  # peak learning rate after warm-up
    cfg.min_learning_rate = paper.MIN_LEARNING_RATE  # end value of the cosine decay
    cfg.warmup_steps = paper.WARMUP_STEPS  # linear warm-up from 0 over this many steps
    cfg.decay_steps = 0  # step where the cosine reaches min_learning_rate; 0 = num_train_steps
    cfg.weight_decay = paper.WEIGHT_DECAY  # decoupled AdamW decay on >=2-D non-router params
    cfg.decay_gamma = False  # also decay DSC gamma (paper's reference code: yes; paper: no)
    cfg.b1 = paper.ADAM_B1  # Adam β1
    cfg.b2 = paper.ADAM_B2  # Adam β2
    cfg.eps = paper.ADAM_EPS  # Adam ε (added to sqrt of the second moment)
    cfg.grad_clip_norm = paper.GRAD_CLIP_NORM  # global-norm gradient clipping; 0 disables
    return cfg
