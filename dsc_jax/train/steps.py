"""Pure train and eval steps (jit them with :func:`functools.partial` over the keyword args).

A batch is ``[B, T + 1]`` int32 token windows: inputs are ``batch[:, :-1]``, targets
``batch[:, 1:]``. The training loss is ``CE + Σ_terms λ_term Σ_layers L_term``
(:func:`dsc_jax.regularization_loss` over the sown ``"losses"`` collection).

Gradient accumulation: ``batch`` is split into ``micro_batches`` micro-batches of
``B / micro_batches`` rows and a ``lax.scan`` sums their gradients, so activation memory is
that of one micro-batch. Micro-batch ``i`` takes rows ``i, i + k, i + 2k, ...`` (a strided
split keeps each micro-batch spread over all data-parallel shards of a batch-sharded array).
The step's gradient, loss and metrics are the means over micro-batches; for the
cross-entropy this equals one batch of ``B`` rows, for the regularisers (which are
non-linear in per-batch means) it is the mean of the micro-batch values, as in the
PyTorch reference's accumulation.

Randomness: micro-batch ``i`` of the step at ``state.step = s`` uses the ``"dropout"`` key
``fold_in(fold_in(rng, s), i)``, so a run resumed at step ``s`` draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dsc_jax.layers.losses import TERM_NAMES, LossWeights, regularization_loss
from dsc_jax.train.diagnostics import routing_statistics
from dsc_jax.train.state import TrainState

Metrics = dict[str, jax.Array]


def split_tokens(batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[B, T + 1]`` windows -> ``(inputs [B, T], targets [B, T])``."""
    return batch[:, :-1], batch[:, 1:]


def split_micro_batches(batch: jax.Array, micro_batches: int) -> jax.Array:
    """``[B, T + 1]`` -> ``[k, B / k, T + 1]``; micro-batch ``i`` holds rows ``i::k``."""
    rows = batch.shape[0]
    if rows % micro_batches:
        raise ValueError(f"batch of {rows} rows is not divisible by micro_batches={micro_batches}.")
    return batch.reshape(rows // micro_batches, micro_batches, *batch.shape[1:]).swapaxes(0, 1)


def loss_fn(
    params: Any,
    apply_fn: Callable[..., Any],
    batch: jax.Array,
    dropout_rng: jax.Array,
    loss_weights: LossWeights,
) -> tuple[jax.Array, Metrics]:
    """Training objective of one (micro-)batch ``[b, T + 1]``.

    Returns:
      ``(loss, metrics)``: the float32 scalar ``CE + Σ λ·L`` and ``{"train_loss",
      "train_ce", "reg_aux", "reg_budget", "reg_frame", "reg_z"}`` (weighted terms, summed
      over layers; zero for terms the model does not produce).
    """
    inputs, targets = split_tokens(batch)
    logits, mutated = apply_fn(
        {"params": params},
        inputs,
        deterministic=False,
        rngs={"dropout": dropout_rng},
        mutable=["losses"],
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
    # allow_empty: a dense GPT sows no regulariser (the GPT's own nn.scan keeps "losses").
    reg_total, terms = regularization_loss(mutated.get("losses"), loss_weights, allow_empty=True)
    loss = ce + reg_total
    metrics = {"train_loss": loss, "train_ce": ce}
    metrics.update({f"reg_{name}": terms[name] for name in TERM_NAMES})
    return loss, metrics


def compute_gradients(
    params: Any,
    apply_fn: Callable[..., Any],
    batch: jax.Array,
    step_rng: jax.Array,
    *,
    loss_weights: LossWeights,
    micro_batches: int = 1,
) -> tuple[Any, Metrics]:
    """Mean gradient and metrics over ``micro_batches`` micro-batches of ``batch [B, T + 1]``.

    Gradients accumulate in float32 (cast back to each parameter's dtype at the end).
    Micro-batch ``i`` uses the dropout key ``fold_in(step_rng, i)``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (_, metrics), grads = grad_fn(
            params, apply_fn, batch, jax.random.fold_in(step_rng, 0), loss_weights
        )
        return grads, metrics

    def body(carry: tuple[Any, Metrics], xs: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
        grad_sum, metric_sum = carry
        micro, index = xs
        (_, metrics), grads = grad_fn(
            params, apply_fn, micro, jax.random.fold_in(step_rng, index), loss_weights
        )
        grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sum, grads)
        metric_sum = jax.tree.map(jnp.add, metric_sum, metrics)
        return (grad_sum, metric_sum), None

    micro = split_micro_batches(batch, micro_batches)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    metric_shapes = jax.eval_shape(
        lambda: loss_fn(params, apply_fn, micro[0], step_rng, loss_weights)[1]
    )
    zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grad_sum, metric_sum), _ = jax.lax.scan(
        body, (zero_grads, zero_metrics), (micro, jnp.arange(micro_batches))
    )
    scale = 1.0 / micro_batches
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grad_sum, params)
    metrics = jax.tree.map(lambda m: m * scale, metric_sum)
    return grads, metrics


def train_step(
    state: TrainState,
    batch: jax.Array,
    rng: jax.Array,
    *,
    loss_weights: LossWeights,
    micro_batches: int = 1,
    lr_schedule: optax.Schedule | None = None,
    router_lr_multiplier: float = 1.0,
) -> tuple[TrainState, Metrics]:
    """One optimiser step on ``batch [B, T + 1]`` int32.

    Args:
      state: the train state (its ``step`` selects the randomness and the learning rate).
      batch: the global batch.
      rng: the run's base dropout key (constant over the run; folded with the step here).
      loss_weights: regulariser weights λ.
      micro_batches: gradient-accumulation micro-batches (static).
      lr_schedule: the base learning-rate schedule, only for the ``lr`` metrics.
      router_lr_multiplier: only for the ``router_lr`` metric.

    Returns:
      ``(new_state, metrics)``: metrics of :func:`loss_fn` (micro-batch means) plus
      ``grad_norm`` (global norm before clipping) and, with ``lr_schedule``, ``lr`` and
      ``router_lr`` (the rates this update used).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    grads, metrics = compute_gradients(
        state.params,
        state.apply_fn,
        batch,
        step_rng,
        loss_weights=loss_weights,
        micro_batches=micro_batches,
    )
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    if lr_schedule is not None:
        lr = jnp.asarray(lr_schedule(state.step), jnp.float32)
        metrics.update(lr=lr, router_lr=lr * router_lr_multiplier)
    return state.apply_gradients(grads=grads), metrics


def eval_step(params: Any, batch: jax.Array, *, apply_fn: Callable[..., Any]) -> dict[str, Any]:
    """Sums for validation on ``batch [B, T + 1]`` (deterministic forward, no regularisers).

    Returns:
      ``{"loss_sum": Σ token NLL, "tokens": token count, "routing": per-layer sums}``
      (float32; see :func:`dsc_jax.train.diagnostics.routing_statistics`). Add the results
      of several batches leaf-wise, then call :func:`dsc_jax.train.diagnostics.finalize_eval`.
    """
    inputs, targets = split_tokens(batch)
    logits, mutated = apply_fn(
        {"params": params}, inputs, deterministic=True, mutable=["intermediates"]
    )
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return {
        "loss_sum": jnp.sum(nll),
        "tokens": jnp.asarray(nll.size, jnp.float32),
        "routing": routing_statistics(mutated.get("intermediates", {}), params),
    }
