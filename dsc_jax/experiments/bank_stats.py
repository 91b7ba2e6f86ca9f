"""Bank statistics of the DSC atoms' motion (:mod:`dsc_jax.experiments.bank_dynamics`):
an optax tap that keeps the raw update, and per-bank angles, norms and update sizes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsc_jax.param_groups import is_bank_path

BANKS = {"basis_u": "u", "basis_v": "v"}
ROW_STATS = ("step_angle", "update_over_norm", "update_abs", "post_abs")
EVAL_STATS = (
    "used_frac",
    "usage_entropy_norm",
    "signal_collapse_frac",
    "mean_signal",
    "erank_u",
    "erank_v",
)
EPS = 1e-12


# --------------------------------------------------------------------------- optimiser tap


class LastUpdate(NamedTuple):
    """Optimiser state of :func:`keep_last_update`: the update it last passed on."""

    updates: Any


def keep_last_update() -> optax.GradientTransformation:
    """A pass-through optax stage that keeps the update it saw in its state (chained after the
    optimiser and before the bank retraction: the raw step before the retraction)."""

    def init_fn(params: Any) -> LastUpdate:
        return LastUpdate(jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates: Any, state: LastUpdate, params: Any = None) -> tuple[Any, LastUpdate]:
        del state, params
        return updates, LastUpdate(updates)

    return optax.GradientTransformation(init_fn, update_fn)


def last_update(opt_state: Any) -> Any:
    """The :class:`LastUpdate` updates inside an optimiser state."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LastUpdate))
        if isinstance(s, LastUpdate)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one LastUpdate in the optimiser state, found {len(found)}")
    return found[0].updates


# --------------------------------------------------------------------------- bank statistics


def _path_name(path: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def bank_leaves(tree: Any) -> dict[str, jax.Array]:
    """``{"block_0/ffn/basis_u": [..., M, d], ...}``: the bank leaves of a params-like tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_bank_path(path):
            out[_path_name(path)] = leaf
    return out


def _row_norms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))


def unit_angle(a: jax.Array, b: jax.Array) -> jax.Array:
    """Row-wise angle between the directions of ``a`` and ``b`` ``[..., d]``, as
    ``2·atan2(‖â − b̂‖, ‖â + b̂‖)`` (accurate for tiny angles, unlike ``arccos``)."""
    xp = jnp if isinstance(a, jax.Array) else np
    na = a / xp.maximum(xp.linalg.norm(a, axis=-1, keepdims=True), EPS)
    nb = b / xp.maximum(xp.linalg.norm(b, axis=-1, keepdims=True), EPS)
    diff = xp.linalg.norm(na - nb, axis=-1)
    total = xp.linalg.norm(na + nb, axis=-1)
    return 2.0 * xp.arctan2(diff, total)


def step_statistics(old: Any, new: Any, update: Any) -> dict[str, dict[str, jax.Array]]:
    """Per bank leaf, means over its atoms (a scanned ``[L, M, d]`` leaf gives ``[L]``):
    ``step_angle`` (old → new direction), ``update_over_norm`` (``‖Δ_j‖ / ‖û_j‖``),
    ``update_abs`` (mean ``|Δ|`` per coordinate, pre-retraction), ``post_abs`` (mean
    ``|new − old|`` per coordinate)."""
    old_b, new_b, upd_b = bank_leaves(old), bank_leaves(new), bank_leaves(update)
    out = {}
    for name, o in old_b.items():
        o = o.astype(jnp.float32)
        n = new_b[name].astype(jnp.float32)
        u = upd_b[name].astype(jnp.float32)
        out[name] = {
            "step_angle": jnp.mean(unit_angle(o, n), axis=-1),
            "update_over_norm": jnp.mean(_row_norms(u) / jnp.maximum(_row_norms(o), EPS), -1),
            "update_abs": jnp.mean(jnp.abs(u), axis=(-2, -1)),
            "post_abs": jnp.mean(jnp.abs(n - o), axis=(-2, -1)),
        }
    return out


def layer_values(name: str, value: Any) -> dict[str, float]:
    """``{"block_0/ffn/u": x}`` for one bank leaf's statistic (``layer_i`` when stacked)."""
    head, leaf = name.rsplit("/", 1)
    value = np.asarray(value, np.float64)
    if value.ndim == 0:
        return {f"{head}/{BANKS[leaf]}": float(value)}
    return {f"{head}/layer_{i}/{BANKS[leaf]}": float(v) for i, v in enumerate(value.ravel())}


def bank_means(per_layer: Mapping[str, float]) -> dict[str, float]:
    """Means over layers of each bank ``u``/``v`` (and ``all``: both)."""
    out = {}
    for bank in ("u", "v"):
        values = [v for k, v in per_layer.items() if k.endswith(f"/{bank}")]
        out[bank] = float(np.mean(values)) if values else float("nan")
    out["all"] = float(np.mean([out["u"], out["v"]]))
    return out


def interval_angles(start: Mapping[str, np.ndarray], end: Mapping[str, np.ndarray]):
    """Per-layer mean over atoms of the angle between ``start`` and ``end`` rows (host,
    float64)."""
    out: dict[str, float] = {}
    for name, a in start.items():
        angle = unit_angle(np.asarray(a, np.float64), np.asarray(end[name], np.float64))
        out.update(layer_values(name, angle.mean(axis=-1)))
    return out


def mean_row_norms(banks: Mapping[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, b in banks.items():
        norms = np.linalg.norm(np.asarray(b, np.float64), axis=-1)
        out.update(layer_values(name, norms.mean(axis=-1)))
    return out


def eval_summary(record: Mapping[str, float]) -> dict[str, Any]:
    """The evaluator's record reduced to ``eval_loss`` and means over DSC layers of
    :data:`EVAL_STATS` (``per_layer``: each layer's)."""
    out: dict[str, Any] = {"eval_loss": float(record["eval_loss"])}
    per_layer: dict[str, float] = {}
    for stat in EVAL_STATS:
        values = []
        for key, value in record.items():
            if key.startswith("diag/") and key.rsplit("/", 1)[-1] == stat:
                per_layer[key.removeprefix("diag/")] = float(value)
                values.append(float(value))
        out[stat] = float(np.mean(values)) if values else None
    out["per_layer"] = per_layer
    return out
