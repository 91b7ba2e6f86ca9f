"""Validation helpers shared by every module: clear ``ValueError``s, never deep XLA tracebacks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp


def check_choice(owner: str, field: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise if ``value`` is not one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{owner}.{field}={value!r} is not allowed; expected one of {allowed}.")


def check_positive_int(owner: str, field: str, value: Any, minimum: int = 1) -> None:
    """Raise unless ``value`` is a Python int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{field}={value!r} is invalid; expected an integer >= {minimum}.")


def check_positive_float(owner: str, field: str, value: Any, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite real number > 0 (or >= 0 when ``allow_zero``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{field}={value!r} is invalid; expected a finite number {bound}.")


def check_probability(owner: str, field: str, value: Any) -> None:
    """Raise unless ``0 <= value < 1``."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.{field}={value!r} is invalid; expected 0 <= value < 1.")


def check_float_input(owner: str, x: Any, features: int | None = None) -> None:
    """Raise unless ``x`` is a floating array with at least one axis (and ``features`` last)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{owner}: input dtype {dtype} is not allowed; expected a floating array "
            "(float32, bfloat16, float16 or float64)."
        )
    if getattr(x, "ndim", 0) < 1:
        raise ValueError(
            f"{owner}: input of shape {getattr(x, 'shape', None)} has no feature axis."
        )
    if features is not None and x.shape[-1] != features:
        raise ValueError(
            f"{owner}: input last dimension {x.shape[-1]} (shape {tuple(x.shape)}) does not match "
            f"the parameters' model dimension {features}."
        )
