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

Training uses the library's pieces (:func:`dsc_jax.train.run.build_run` for data, model
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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax._storage import write_json_atomically
from dsc_jax.experiments import runner
from dsc_jax.experiments.bank_report import plot, summarise, table
from dsc_jax.experiments.bank_stats import (
    ROW_STATS,
    bank_leaves,
    bank_means,
    eval_summary,
    interval_angles,
    keep_last_update,
    last_update,
    layer_values,
    mean_row_norms,
    step_statistics,
)
from dsc_jax.experiments.presets import STUDIES
from dsc_jax.layers.losses import LossWeights
from dsc_jax.sharding import batch_sharding, shard_batch
from dsc_jax.train import config as config_lib
from dsc_jax.train import evaluation, numerics
from dsc_jax.train import run as run_lib
from dsc_jax.train import steps as steps_lib
from dsc_jax.train.state import TrainState, abstract_train_state, init_train_state

#: The ``bank`` ablation variants compared here: old default, reference code, new default.
VARIANTS = ("dsc_r1", "dsc_reference_bank", "dsc_r0.02")
LABELS = {
    "dsc_r1": "r=1, retract (old default)",
    "dsc_reference_bank": "0.02×orthogonal, no projection (reference)",
    "dsc_r0.02": "r=0.02, retract (new default)",
}


# --------------------------------------------------------------------------- one run


def run_config(
    preset: str, variant_name: str, seed: int, steps: int
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The ``dsc-compare`` training config of one ``bank`` ablation variant."""
    study = runner.resolve_study(preset)
    variants = {v.name: v for v in runner.ablation_variants("bank")}
    if variant_name not in variants:
        raise ValueError(f"unknown bank variant {variant_name!r}; expected one of {variants}")
    return runner.method_config(study, study.base("dsc"), variants[variant_name], seed, steps)


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
    run = run_lib.build_run(config, workdir=os.devnull)  # writes nothing
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
        in_shardings=(shardings, batch_sharding(run.mesh), replicated),
        out_shardings=(shardings, replicated, replicated),
        donate_argnums=0,
    )
    get_banks = jax.jit(bank_leaves, in_shardings=(shardings.params,), out_shardings=replicated)
    evaluate = evaluation.make_evaluator(config, run.bundle, run.model, run.mesh, shardings.params)

    total = config.num_train_steps
    lrs = [float(x) for x in np.asarray(run.schedule(jnp.arange(total)))]
    banks = jax.device_get(get_banks(state.params))
    norm0 = mean_row_norms(banks)
    dyn: dict[str, list] = {"step": [], "lr": [], "train_loss": []}
    per_layer: dict[str, dict[str, list[float]]] = {}
    evals: list[dict[str, Any]] = [{"step": 0, **eval_summary(evaluate(state.params))}]

    def add(series: str, values: Mapping[str, float]) -> None:
        for bank_key, v in bank_means(values).items():
            dyn.setdefault(series, {}).setdefault(bank_key, []).append(v)
        for layer_key, v in values.items():
            per_layer.setdefault(series, {}).setdefault(layer_key, []).append(v)

    acc: dict[str, dict[str, float]] = {}
    losses: list[float] = []
    t0 = time.time()
    log(f"[bank_dynamics] {name}: {total} steps, row norm at init {bank_means(norm0)['all']:.4g}")
    for s in range(1, total + 1):
        batch = shard_batch(next(run.bundle.train), run.mesh)
        state, metrics, stats = step(state, batch, rng)
        stats, loss = jax.device_get((stats, metrics["train_loss"]))
        if not np.isfinite(loss):
            raise numerics.NonFiniteLossError(f"{name}: training loss is {loss} at step {s}")
        losses.append(float(loss))
        for leaf, values in stats.items():
            for stat, value in values.items():
                for key, v in layer_values(leaf, value).items():
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
        "bank_radius": config.model.ffn.bank_radius,
        "bank_init": config.model.ffn.bank_init,
        "bank_projection": config.bank_projection,
        "d_model": config.model.d_model,
        "num_bases": config.model.ffn.num_bases,
        "row_norm_init": bank_means(norm0),
        "row_norm_init_per_layer": norm0,
        "dynamics": dyn,
        "dynamics_per_layer": per_layer,
        "eval": evals,
        "lr_schedule": lrs,
        "seconds": time.time() - t0,
    }


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
