"""Timing harness: ahead-of-time compilation and interleaved round-robin timing.

Every timed function is compiled first (:func:`compile_runner`);
:func:`dsc_jax.timing.time_round_robin` (re-exported here) then calls blocks of runners round
after round (a layer's passes next to its GEMM-equivalent's), rotating and reversing the block
order so machine load hits every block alike; :func:`paired_ratio` is the median over rounds of
same-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax.layers.losses import LossWeights, regularization_loss
from dsc_jax.timing import time_round_robin

__all__ = [
    "FAST_COMPILE_OPTIONS",
    "Key",
    "compile_runner",
    "gemm_functions",
    "layer_functions",
    "paired_ratio",
    "time_round_robin",
    "vjp_function",
]

FAST_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def layer_functions(
    module: nn.Module, with_losses: bool
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted ``fwd(params, x, key)`` and ``fwd_bwd(params, x, key, cotangent)`` of a layer.

    ``fwd_bwd`` returns the parameter and input gradients of ``Σ y ⊙ cotangent`` (+ the weighted
    regulariser total with ``with_losses``).
    """

    def forward(params: Any, x: jax.Array, key: jax.Array) -> Any:
        if not with_losses:  # inference path: "losses" immutable, nothing computed
            return module.apply({"params": params}, x)
        y, state = module.apply(
            {"params": params},
            x,
            deterministic=False,
            rngs={"dropout": key},
            mutable=["losses"],
        )
        total, _ = regularization_loss(state.get("losses"), LossWeights(), allow_empty=True)
        return y, total

    def forward_backward(params: Any, x: jax.Array, key: jax.Array, cotangent: jax.Array) -> Any:
        out, vjp = jax.vjp(lambda p, inputs: forward(p, inputs, key), params, x)
        if with_losses:
            y, total = out
            return vjp((cotangent.astype(y.dtype), jnp.ones_like(total)))
        return vjp(cotangent.astype(out.dtype))

    return jax.jit(forward), jax.jit(forward_backward)


def gemm_functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted ``fwd(x, w) = x @ w`` and ``fwd_bwd(x, w, cotangent)`` (gradients of ``x`` and
    ``w`` of ``Σ (x @ w) ⊙ cotangent``)."""

    def forward(x: jax.Array, w: jax.Array) -> jax.Array:
        return x @ w

    def forward_backward(x: jax.Array, w: jax.Array, cotangent: jax.Array) -> Any:
        out, vjp = jax.vjp(forward, x, w)
        return vjp(cotangent.astype(out.dtype))

    return jax.jit(forward), jax.jit(forward_backward)


def compile_runner(
    fn: Callable[..., Any], *args: Any, options: dict[str, Any] | None = None
) -> tuple[Callable[[], Any], float]:
    """Ahead-of-time compile ``fn(*args)`` (XLA ``options``); returns a no-argument runner and
    the compile seconds."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options=options)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - start
    return (lambda: compiled(*args)), seconds


def vjp_function(fn: Callable[..., Any], argnums: Sequence[int]) -> Callable[..., Any]:
    """Jitted ``f(*args, cotangent)``: the VJP of ``fn`` w.r.t. ``args[argnums]``."""

    def forward_backward(*args_and_cotangent: Any) -> Any:
        *args, cotangent = args_and_cotangent

        def partial(*diff: Any) -> Any:
            full = list(args)
            for index, value in zip(argnums, diff, strict=True):
                full[index] = value
            return fn(*full)

        out, vjp = jax.vjp(partial, *(args[i] for i in argnums))
        return vjp(jax.tree.map(lambda o, c: c.astype(o.dtype), out, cotangent))

    return jax.jit(forward_backward)


Key = tuple[str, str]  # (timer name, pass)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
