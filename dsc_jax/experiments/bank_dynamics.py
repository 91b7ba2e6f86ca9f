"""How fast the DSC atoms turn: the raw bank-row radius ``r`` sets the atoms' angular rate.

    python -m dsc_jax.experiments.bank_dynamics --preset cpu_embedded --steps 600 --seed 0 \\
        --out results/bank_dynamics
    python -m dsc_jax.experiments.bank_dynamics --preset tiny --steps 20 --out /tmp/bank_dyn

The DSC layer normalises every bank row (``basis_u``, ``basis_v`` ``[M, d]``) in its forward
pass, so the raw row norm ``r`` changes nothing the model computes. With Adam it sets how fast
the atoms' directions move: Adam moves each raw coordinate by about the learning rate whatever
the gradient's scale, so a direction turns by about ``lr·√d / r`` radians per step. This script
trains the same DSC model (the ``dsc-compare`` sizing of ``--preset``:
:func:`dsc_jax.experiments.runner.method_config`) under three of the ``bank`` ablation's
variants (:func:`dsc_jax.experiments.runner.ablation_variants`):

* ``dsc_r1``: the old default, rows retracted to norm 1 after every step;
* ``dsc_reference_bank``: the reference code's bank, ``0.02 ×`` orthogonal init, never
  re-projected (``bank_projection="none"``; the norms drift, mostly growing);
* ``dsc_r0.02``: the new default, rows retracted to norm 0.02.

Training uses the library's pieces (:func:`dsc_jax.train.trainer.build_run` for data, model
and optimiser, :class:`dsc_jax.train.state.TrainState` with the run's bank projection,
:func:`dsc_jax.train.steps.train_step`, the trainer's evaluator) in a plain single-process
loop without checkpoints. The only addition is a pass-through optax stage chained after the
run's optimiser and before the bank retraction, which keeps the last update in the optimiser
state: the raw Adam step before retraction.

Series in ``<out>/bank_dynamics.json`` (``runs[<variant>]``), per bank ``u`` / ``v`` (mean
over layers; ``per_layer`` has each layer's):

* every ``--delta`` (10) steps, at the interval's end step ``t`` (``dynamics.step``):

  - ``angle_per_step``: mean over atoms of the angle (rad) between a row's direction at
    ``t - Δ`` and at ``t``, divided by ``Δ`` (net turning; a random walk's steps partly
    cancel, so this is at most the per-step angle);
  - ``step_angle``: mean over atoms and over the interval's steps of the angle between a
    row's direction before and after one step (gross turning per step);
  - ``row_norm``: mean raw row norm ``‖û_j‖`` at ``t`` (``row_norm_init``: at step 0);
  - ``update_abs``: mean over the interval's steps of the mean ``|Δ|`` per raw coordinate
    of the optimiser's update before the retraction (clipping, Adam, weight decay, lr);
  - ``update_over_norm``: mean over atoms and steps of ``‖Δ_j‖ / ‖û_j‖`` (the turn that
    update would make if it were all tangent: the ``lr·√d / r`` estimate, measured);
  - ``lr``: mean base learning rate of the interval's updates; ``train_loss``: mean loss.

* every ``--eval-every`` (50) steps and at steps 0 and the last, on the fixed validation
  windows (the trainer's evaluator, :mod:`dsc_jax.train.diagnostics`), means over the DSC
  layers (``eval.step``): ``eval_loss``, ``used_frac`` (atoms picked at least once),
  ``usage_entropy_norm`` (selection entropy / log M), ``signal_collapse_frac`` (tokens with
  gate ``S < 0.1``, "gated off"), ``mean_signal``, ``erank_u``/``erank_v``.

``lr_schedule`` lists the base learning rate of every update (entry ``i``: update ``i + 1``);
``configs`` holds each run's full training config. ``<out>/bank_dynamics.png`` plots angular
rate, row norm, coordinate step (with the learning rate), used fraction, gated-off fraction
and validation loss; the end of the output is a summary table.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax._storage import save_figure_atomically, write_json_atomically
from dsc_jax.experiments import runner
from dsc_jax.experiments.presets import STUDIES
from dsc_jax.layers.losses import LossWeights
from dsc_jax.param_groups import is_bank_path
from dsc_jax.sharding import shard_batch
from dsc_jax.train import config as config_lib
from dsc_jax.train import steps as steps_lib
from dsc_jax.train import trainer
from dsc_jax.train.state import TrainState, abstract_train_state, init_train_state

#: The ``bank`` ablation variants compared here: old default, reference code, new default.
VARIANTS = ("dsc_r1", "dsc_reference_bank", "dsc_r0.02")
LABELS = {
    "dsc_r1": "r=1, retract (old default)",
    "dsc_reference_bank": "0.02×orthogonal, no projection (reference)",
    "dsc_r0.02": "r=0.02, retract (new default)",
}
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
TABLE_WINDOW = 100  # steps averaged for the table's first/last angular rate
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


def _per_layer(name: str, value: Any) -> dict[str, float]:
    """``{"block_0/ffn/u": x}`` for one bank leaf's statistic (``layer_i`` when stacked)."""
    head, leaf = name.rsplit("/", 1)
    value = np.asarray(value, np.float64)
    if value.ndim == 0:
        return {f"{head}/{BANKS[leaf]}": float(value)}
    return {f"{head}/layer_{i}/{BANKS[leaf]}": float(v) for i, v in enumerate(value.ravel())}


def _by_bank(per_layer: Mapping[str, float]) -> dict[str, float]:
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
        out.update(_per_layer(name, angle.mean(axis=-1)))
    return out


def mean_row_norms(banks: Mapping[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, b in banks.items():
        norms = np.linalg.norm(np.asarray(b, np.float64), axis=-1)
        out.update(_per_layer(name, norms.mean(axis=-1)))
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


# --------------------------------------------------------------------------- one run


def run_config(
    preset: str, variant_name: str, seed: int, steps: int
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The ``dsc-compare`` training config of one ``bank`` ablation variant."""
    study = runner.resolve_study(preset)
    variants = {v.name: v for v in runner.ablation_variants("bank")}
    if variant_name not in variants:
        raise ValueError(f"unknown bank variant {variant_name!r}; expected one of {variants}")
    return runner.method_config(study, study.base(), variants[variant_name], seed, steps)


def train_and_measure(
    config: ml_collections.ConfigDict,
    *,
    name: str,
    delta: int,
    eval_every: int,
    log: Callable[[str], None] = print,
    progress_every: int = 100,
) -> dict[str, Any]:
    """Train ``config`` for ``config.num_train_steps`` steps and record the series of the
    module docstring."""
    run = trainer.build_run(config, workdir=os.devnull)  # writes nothing
    bank = config_lib.bank_settings(config)
    tx = optax.chain(run.tx, keep_last_update())  # one object: jit metadata of the state
    _, shardings = abstract_train_state(run.model, tx, run.init_rng, run.example, run.mesh, **bank)
    state: TrainState = init_train_state(
        run.model, tx, run.init_rng, run.example, shardings, **bank
    )
    replicated = NamedSharding(run.mesh, P())
    rng = jax.jit(jax.random.wrap_key_data, out_shardings=replicated)(
        np.asarray(jax.random.key_data(run.dropout_rng))
    )
    train_step = functools.partial(
        steps_lib.train_step,
        loss_weights=LossWeights(**config.losses.to_dict()),
        micro_batches=config.micro_batches,
        lr_schedule=run.schedule,
        router_lr_multiplier=config.router_lr_multiplier,
    )

    def step_fn(state: TrainState, batch: jax.Array, rng: jax.Array):
        new_state, metrics = train_step(state, batch, rng)
        stats = step_statistics(state.params, new_state.params, last_update(new_state.opt_state))
        return new_state, metrics, stats

    step = jax.jit(
        step_fn,
        in_shardings=(shardings, trainer.shard_batch_spec(run.mesh), replicated),
        out_shardings=(shardings, replicated, replicated),
        donate_argnums=0,
    )
    get_banks = jax.jit(bank_leaves, in_shardings=(shardings.params,), out_shardings=replicated)
    evaluate = trainer._make_evaluator(config, run.bundle, run.model, run.mesh, shardings.params)

    total = config.num_train_steps
    lrs = [float(x) for x in np.asarray(run.schedule(jnp.arange(total)))]
    banks = jax.device_get(get_banks(state.params))
    norm0 = mean_row_norms(banks)
    dyn: dict[str, list] = {"step": [], "lr": [], "train_loss": []}
    per_layer: dict[str, dict[str, list[float]]] = {}
    evals: list[dict[str, Any]] = [{"step": 0, **eval_summary(evaluate(state.params))}]

    def add(series: str, values: Mapping[str, float]) -> None:
        for bank_key, v in _by_bank(values).items():
            dyn.setdefault(series, {}).setdefault(bank_key, []).append(v)
        for layer_key, v in values.items():
            per_layer.setdefault(series, {}).setdefault(layer_key, []).append(v)

    acc: dict[str, dict[str, float]] = {}
    losses: list[float] = []
    t0 = time.time()
    log(f"[bank_dynamics] {name}: {total} steps, row norm at init {_by_bank(norm0)['all']:.4g}")
    for s in range(1, total + 1):
        batch = shard_batch(next(run.bundle.train), run.mesh)
        state, metrics, stats = step(state, batch, rng)
        stats, loss = jax.device_get((stats, metrics["train_loss"]))
        if not np.isfinite(loss):
            raise trainer.NonFiniteLossError(f"{name}: training loss is {loss} at step {s}")
        losses.append(float(loss))
        for leaf, values in stats.items():
            for stat, value in values.items():
                for key, v in _per_layer(leaf, value).items():
                    acc.setdefault(stat, {}).setdefault(key, 0.0)
                    acc[stat][key] += v
        if s % delta == 0 or s == total:
            n = s - (dyn["step"][-1] if dyn["step"] else 0)
            new_banks = jax.device_get(get_banks(state.params))
            add("angle_per_step", {k: v / n for k, v in interval_angles(banks, new_banks).items()})
            add("row_norm", mean_row_norms(new_banks))
            for stat in ROW_STATS:
                add(stat, {k: v / n for k, v in acc[stat].items()})
            dyn["step"].append(s)
            dyn["lr"].append(float(np.mean(lrs[s - n : s])))
            dyn["train_loss"].append(float(np.mean(losses)))
            banks, acc, losses = new_banks, {}, []
        if (eval_every and s % eval_every == 0) or s == total:
            evals.append({"step": s, **eval_summary(evaluate(state.params))})
        if s % progress_every == 0 or s == total:
            last_eval = evals[-1]
            log(
                f"[bank_dynamics] {name} step {s}/{total} | train loss "
                f"{dyn['train_loss'][-1]:.3f} | angle/step {dyn['angle_per_step']['all'][-1]:.3g}"
                f" rad (1-step {dyn['step_angle']['all'][-1]:.3g}) | row norm "
                f"{dyn['row_norm']['all'][-1]:.4g} | |Δ|/coord "
                f"{dyn['update_abs']['all'][-1]:.3g} (lr {dyn['lr'][-1]:.3g}) | val loss "
                f"{last_eval['eval_loss']:.3f} @ {last_eval['step']} | "
                f"{time.time() - t0:.0f}s"
            )
    return {
        "label": LABELS.get(name, name),
        "bank_radius": config.model.dsc.bank_radius,
        "bank_init": config.model.dsc.bank_init,
        "bank_projection": config.bank_projection,
        "d_model": config.model.d_model,
        "num_bases": config.model.dsc.num_bases,
        "row_norm_init": _by_bank(norm0),
        "row_norm_init_per_layer": norm0,
        "dynamics": dyn,
        "dynamics_per_layer": per_layer,
        "eval": evals,
        "lr_schedule": lrs,
        "seconds": time.time() - t0,
    }


# --------------------------------------------------------------------------- summary, plot


def _window_mean(dyn: Mapping[str, Any], series: str, lo: int, hi: int) -> float:
    values = [
        v
        for s, v in zip(dyn["step"], dyn[series]["all"], strict=True)
        if lo < s <= hi  # intervals ending in (lo, hi]
    ]
    return float(np.mean(values)) if values else float("nan")


def summarise(runs: Mapping[str, Any], total: int) -> list[dict[str, Any]]:
    """One row per run: mean angular rate over the first and last :data:`TABLE_WINDOW` steps,
    final row norm, last evaluation's used / gated-off fractions and validation loss."""
    window = min(TABLE_WINDOW, total)
    rows = []
    for name, r in runs.items():
        dyn, last = r["dynamics"], r["eval"][-1]
        rows.append(
            {
                "variant": name,
                "first_window": [0, window],
                "last_window": [total - window, total],
                "angle_first": _window_mean(dyn, "angle_per_step", 0, window),
                "angle_last": _window_mean(dyn, "angle_per_step", total - window, total),
                "step_angle_first": _window_mean(dyn, "step_angle", 0, window),
                "step_angle_last": _window_mean(dyn, "step_angle", total - window, total),
                "update_abs_first": _window_mean(dyn, "update_abs", 0, window),
                "update_abs_last": _window_mean(dyn, "update_abs", total - window, total),
                "row_norm_init": r["row_norm_init"]["all"],
                "row_norm_final": dyn["row_norm"]["all"][-1],
                "used_frac": last["used_frac"],
                "gated_off_frac": last["signal_collapse_frac"],
                "usage_entropy_norm": last["usage_entropy_norm"],
                "eval_loss": last["eval_loss"],
            }
        )
    return rows


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a fixed-width text table."""
    if not rows:
        return ""
    (a0, a1), (b0, b1) = rows[0]["first_window"], rows[0]["last_window"]
    head = (
        f"{'variant':<20} {f'rad/step {a0}-{a1}':>16} {f'rad/step {b0}-{b1}':>16} "
        f"{'1-step rad':>11} {f'|Δ|/coord {a0}-{a1}':>17} {f'|Δ|/coord {b0}-{b1}':>17} "
        f"{'norm init':>9} {'norm final':>10} {'used':>6} {'gated off':>9} {'val loss':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<20} {r['angle_first']:>16.4g} {r['angle_last']:>16.4g} "
            f"{r['step_angle_last']:>11.4g} {r['update_abs_first']:>17.3g} "
            f"{r['update_abs_last']:>17.3g} {r['row_norm_init']:>9.4g} "
            f"{r['row_norm_final']:>10.4g} {r['used_frac']:>6.3f} {r['gated_off_frac']:>9.3f} "
            f"{r['eval_loss']:>8.4f}"
        )
    lines.append(
        "rad/step: mean over atoms of angle(row at t-Δ, row at t)/Δ, averaged over the window; "
        "1-step rad: mean single-step angle over the last window; |Δ|/coord: mean |Adam "
        "update| per raw coordinate before retraction; used, gated off (S < 0.1), val loss: "
        "last evaluation."
    )
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: str) -> str:
    """The six-panel figure (one line per run; dotted: single-step angle, learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ax_angle, ax_norm, ax_step, ax_used, ax_gate, ax_loss = axes.ravel()
    for i, (name, r) in enumerate(result["runs"].items()):
        color = f"C{i}"
        dyn = r["dynamics"]
        label = r["label"]
        ax_angle.plot(dyn["step"], dyn["angle_per_step"]["all"], color=color, label=label)
        ax_angle.plot(dyn["step"], dyn["step_angle"]["all"], color=color, ls=":", lw=1.2)
        norm_steps = [0, *dyn["step"]]
        for bank, ls in (("u", "-"), ("v", "--")):
            norms = [r["row_norm_init"][bank], *dyn["row_norm"][bank]]
            ax_norm.plot(norm_steps, norms, color=color, ls=ls, label=f"{name} {bank}")
        ax_step.plot(dyn["step"], dyn["update_abs"]["all"], color=color, label=name)
        ev = r["eval"]
        steps = [e["step"] for e in ev]
        ax_used.plot(steps, [e["used_frac"] for e in ev], color=color, marker="o", ms=3, label=name)
        ax_gate.plot(steps, [e["signal_collapse_frac"] for e in ev], color=color, marker="o", ms=3)
        ax_loss.plot(steps, [e["eval_loss"] for e in ev], color=color, marker="o", ms=3)
    one = next(iter(result["runs"].values()))
    first = one["dynamics"]
    ax_step.plot(first["step"], first["lr"], color="k", ls=":", label="learning rate")
    ax_angle.set_yscale("log")
    ax_angle.set_title(
        f"atom turning rate (rad/step; solid: over Δ={result['delta']}, dotted: 1 step)"
    )
    ax_angle.legend(fontsize=8)
    ax_norm.set_yscale("log")
    ax_norm.set_title("mean raw row norm ‖û_j‖ (solid u, dashed v)")
    ax_norm.legend(fontsize=7, ncol=2)
    ax_step.set_yscale("log")
    ax_step.set_title("mean |Adam update| per raw coordinate (pre-retraction)")
    ax_step.legend(fontsize=8)
    ax_used.set_title("fraction of atoms used (validation)")
    ax_used.set_ylim(0, 1.02)
    ax_used.legend(fontsize=8)
    ax_gate.set_title("fraction of tokens gated off (S < 0.1)")
    ax_gate.set_ylim(-0.02, 1.02)
    ax_loss.set_title("validation loss (nats/token)")
    for ax in axes.ravel():
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(
        f"DSC bank dynamics, preset {result['preset']}, seed {result['seed']} (d={one['d_model']}, "
        f"M={one['num_bases']} atoms; means over atoms, layers and the u, v banks)"
    )
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dsc_jax.experiments.bank_dynamics",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", required=True, choices=tuple(STUDIES))
    p.add_argument("--steps", type=int, default=None, help="train steps (default: preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bank_dynamics", help="output folder")
    p.add_argument("--delta", type=int, default=10, help="steps between bank snapshots")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated bank ablation variants (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.delta < 1 or (args.steps is not None and args.steps < 1) or args.eval_every < 0:
        p.error("--delta and --steps must be >= 1, --eval-every >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train every variant, write ``<out>/bank_dynamics.{json,png}``, print the table.

    Returns:
      The JSON content.
    """
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.variants.split(",") if n]
    result: dict[str, Any] = {
        "command": " ".join(
            ["python -m dsc_jax.experiments.bank_dynamics", *(argv or sys.argv[1:])]
        ),
        "preset": args.preset,
        "seed": args.seed,
        "delta": args.delta,
        "eval_every": args.eval_every,
        "devices": [str(d) for d in jax.devices()],
        "configs": {},
        "sizes": {},
        "runs": {},
    }
    total = None
    for name in names:
        config, sizes = run_config(args.preset, name, args.seed, args.steps)
        total = config.num_train_steps
        result["configs"][name] = config.to_dict()
        result["sizes"][name] = sizes
        result["runs"][name] = train_and_measure(
            config, name=name, delta=args.delta, eval_every=args.eval_every
        )
    result["lr_schedule"] = next(r.pop("lr_schedule") for r in result["runs"].values())
    result["summary"] = summarise(result["runs"], total)
    json_path = os.path.join(args.out, "bank_dynamics.json")
    write_json_atomically(json_path, result, indent=None, default=_json_default)
    png_path = plot(result, os.path.join(args.out, "bank_dynamics.png"))
    print(table(result["summary"]))
    print(f"[bank_dynamics] wrote {json_path} and {png_path}")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
