"""Train methods × seeds at iso-active parameters into one results folder, resumably.

Layout: ``<results>/<study>/<variant>_seed<k>/`` is one trainer workdir per run; a run
that finished has ``done.json`` there (its final metrics and the config's fingerprint) and
is not trained again; an interrupted one (checkpoint before the last step) resumes, since
the trainer resumes a workdir. ``<results>/<study>/`` also gets ``comparison.md``,
``comparison.json``, ``convergence.png`` and (with DSC runs) ``dsc_bank.png``.

Settings (``dsc-compare --set KEY=VALUE``, :func:`plan`'s ``overrides``) take effect or are
refused (``ValueError``, one line naming the key): they are applied to the study's base
config before the FFNs are sized. Each run's config holds the FFN group of its own kind
(``model.ffn``), so a setting of an FFN field names the kind: ``model.<kind>.<field>``
(``--set model.dsc.top_k=8``) applies to the runs of that kind. A sized FFN field
(:data:`SIZED_FIELDS`: ``num_bases``, ``hidden_dim``, ``num_experts``, ``rank``, ``top_k``)
is a constraint: the solver keeps it and sizes the others to the targets
(:func:`dsc_jax.solve_iso_active`; a target it cannot fit any more is reported); every
other FFN field is applied as given. Refused: keys the runner sets itself
(:data:`RUNNER_OWNED`), keys a variant of the sweep sets itself (an ablation's axis), an
FFN group of a kind the sweep does not train, keys no run of the sweep reads
(:func:`dsc_jax.train.config.unread_settings`), unknown keys and bad values. A run that does
not read a setting (``bank_projection`` in a MoE run) keeps the study's value, so its config
and fingerprint do not change. Run folders and their state: :mod:`.workdirs`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from dsc_jax._storage import write_json_atomically
from dsc_jax.experiments.presets import STUDIES, Study
from dsc_jax.experiments.sizing import (
    get_setting,
    method_config,
    set_setting,
    vocab_size_of,
)
from dsc_jax.experiments.variants import (
    ABLATION_TABLE,
    ABLATIONS,
    REFERENCE_VARIANTS,
    Ablation,
    Variant,
    ablation_variants,
    method_variants,
    select_variants,
)
from dsc_jax.experiments.workdirs import (
    DONE_FILE,
    SWEEP_LOCK_FILE,
    Run,
    config_changes,
    fingerprint,
    read_done,
    read_metrics,
    run_state,
    same_finished_config,
    sweep_lock,
)
from dsc_jax.layers.configs import FFN_CONFIGS
from dsc_jax.models.solver import SIZED_FIELDS
from dsc_jax.train import config as config_lib
from dsc_jax.train.metrics import format_duration

__all__ = [  # the sweep, and the names of its parts that callers import from here
    "ABLATIONS",
    "ABLATION_TABLE",
    "DONE_FILE",
    "REFERENCE_VARIANTS",
    "SWEEP_LOCK_FILE",
    "Ablation",
    "Run",
    "Variant",
    "ablation_variants",
    "config_changes",
    "describe",
    "execute",
    "fingerprint",
    "method_config",
    "method_variants",
    "plan",
    "read_done",
    "read_metrics",
    "resolve_study",
    "run_state",
    "same_finished_config",
    "select_variants",
    "sweep_lock",
    "vocab_size_of",
]

#: Keys each run's config gets from the runner, and the option that sets them instead.
RUNNER_OWNED = {
    "seed": "each run's seed comes from --seeds",
    "name": "each run is named <study>/<variant>_seed<k>; name the study folder with --study",
    "model.ffn": "each run's FFN comes from --methods (or --ablation); set its fields as "
    "model.<kind>.FIELD (e.g. model.dsc.top_k)",
}


def _ffn_key(key: str) -> tuple[str, str] | None:
    """``(kind, field)`` of an FFN setting ``model.<kind>.<field>``; ``None`` for others.

    Raises:
      ValueError: ``model.<kind>`` (a group) or a deeper key.
    """
    parts = key.split(".")
    if len(parts) < 2 or parts[0] != "model" or parts[1] not in FFN_CONFIGS:
        return None
    if len(parts) == 2:
        raise ValueError(f"{key!r} is a group of settings; set one of its keys.")
    if len(parts) > 3:
        raise ValueError(f"unknown config key {key!r}; expected model.{parts[1]}.FIELD.")
    return parts[1], parts[2]


def _set_ffn(config: ml_collections.ConfigDict, kind: str, field: str, value: Any) -> None:
    """``--set model.<kind>.<field>=value`` on a config whose ``model.ffn`` is ``kind``'s."""
    fields = sorted(f for f in config.model.ffn if f != "kind")
    if field not in fields:
        raise ValueError(f"unknown config key 'model.{kind}.{field}'; expected one of {fields}.")
    try:
        set_setting(config, f"model.ffn.{field}", value)
    except ValueError as err:
        raise ValueError(str(err).replace("model.ffn.", f"model.{kind}.")) from None


def _ffn_given(study: Study, kind: str, overrides: Mapping[str, Any]) -> set[str]:
    """The fields of ``kind``'s FFN set on purpose: by ``overrides`` or by the study's base
    (where it differs from :func:`base_config`)."""
    preset, defaults = study.base(kind).model.ffn, config_lib.base_config(kind).model.ffn
    given = {f for f in preset if f != "kind" and preset[f] != defaults[f]}
    return given | {ffn[1] for key in overrides if (ffn := _ffn_key(key)) and ffn[0] == kind}


def _check_overrides(
    variants: Sequence[Variant], overrides: Mapping[str, Any], steps: int | None
) -> None:
    """Refuse settings the runner or a variant sets itself, and FFN groups of kinds the
    sweep does not train (before anything is sized)."""
    kinds = sorted({v.kind for v in variants})
    for key, value in overrides.items():
        given = f"--set {key}={value!r}"
        owned = next((k for k in RUNNER_OWNED if key == k or key.startswith(k + ".")), None)
        if owned is not None:
            raise ValueError(f"{given}: {RUNNER_OWNED[owned]}.")
        if key == "num_train_steps" and steps is not None:
            raise ValueError(f"{given}: --steps {steps} sets it too; give one of them.")
        ffn = _ffn_key(key)
        if ffn is not None and ffn[0] not in kinds:
            raise ValueError(
                f"{given}: no run of this sweep has a {ffn[0]} FFN (its FFN kinds: "
                f"{', '.join(kinds)}); add {ffn[0]} to --methods or drop the setting."
            )
        owners = [v.name for v in variants if key in _variant_keys(v)]
        if owners:
            raise ValueError(
                f"{given}: variant(s) {', '.join(owners)} of this sweep set {key} themselves "
                "(the ablation's axis); drop the --set or run without --ablation."
            )


def _variant_keys(variant: Variant) -> set[str]:
    """The settings (``--set`` keys: ``model.<kind>.<field>`` for FFN fields) that
    ``variant`` sets itself after sizing."""
    group = f"model.{variant.kind}"
    keys = set(variant.overrides) | {f"{group}.{f}" for f in variant.ffn}
    if variant.match_active is not None:  # sizes hidden_dim to a reference of these fields
        keys |= {f"{group}.hidden_dim"} | {f"{group}.{f}" for f in variant.match_active}
    return keys


def _kind_bases(
    study: Study, kinds: set[str], overrides: Mapping[str, Any]
) -> dict[str, tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, set[str]]]:
    """Per FFN kind: the study's base config, that base with ``overrides`` (the FFN ones of
    this kind only) and the FFN fields given on purpose (:func:`_ffn_given`)."""
    out = {}
    for kind in sorted(kinds):
        study_base, base = study.base(kind), study.base(kind)
        for key, value in overrides.items():
            ffn = _ffn_key(key)
            if ffn is None:
                set_setting(base, key, value)
            elif ffn[0] == kind:
                _set_ffn(base, kind, ffn[1], value)
        out[kind] = (study_base, base, _ffn_given(study, kind, overrides))
    return out


def _run_error(err: ValueError, variant: Variant, overrides: Mapping[str, Any]) -> ValueError:
    """``err`` of sizing ``variant`` under ``overrides``, naming the run and the settings."""
    text = str(err).replace("model.ffn", f"model.{variant.kind}")
    owner = "" if text.startswith(f"model.{variant.name}:") else f"{variant.name}: "
    given = " ".join(f"--set {k}={x!r}" for k, x in overrides.items())
    return ValueError(f"{owner}{text} [{given}]")


def plan(
    study: Study,
    results: str,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    steps: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Run]:
    """Every run of the sweep, seeds outermost so a partial sweep has every method.

    ``overrides`` (dotted key -> value, ``dsc-compare --set``) apply to the study's base
    config before the FFNs are sized; an FFN field is ``model.<kind>.<field>`` and applies
    to the runs of that kind. See the module docstring for what is refused.

    Raises:
      ValueError: a refused setting or bad value, or FFN targets no size fits (one line).
    """
    overrides = dict(overrides or {})
    _check_overrides(variants, overrides, steps)
    bases = _kind_bases(study, {v.kind for v in variants}, overrides)
    read_by = dict.fromkeys(overrides, False)
    runs = []
    for seed in seeds:
        for v in variants:
            study_base, base, given = bases[v.kind]
            try:
                cfg, sizes = method_config(study, base, v, seed, steps, given)
            except ValueError as err:
                if not overrides:
                    raise
                raise _run_error(err, v, overrides) from None
            unread = config_lib.unread_settings(cfg)
            settings = {}
            for key in overrides:
                ffn = _ffn_key(key)
                if ffn is not None:
                    if ffn[0] == v.kind:
                        settings[key], read_by[key] = cfg.model.ffn[ffn[1]], True
                elif config_lib.is_unread(key, unread):  # this run keeps the study's value
                    set_setting(cfg, key, get_setting(study_base, key))
                else:
                    settings[key], read_by[key] = get_setting(cfg, key), True
            workdir = os.path.join(results, f"{v.name}_seed{seed}")
            runs.append(Run(v, seed, workdir, cfg, sizes, settings))
    for key, read in read_by.items():
        if not read and runs:
            reason = config_lib.unread_reason(key, config_lib.unread_settings(runs[0].config))
            raise ValueError(
                f"--set {key}={overrides[key]!r}: no run of this sweep reads it ({reason})."
            )
    return runs


def describe(run: Run) -> str:
    """One line of a planned variant: its FFN's effective sizes and every field off the
    defaults, the parameter counts, and the targets the given sizes left unfitted."""
    kind = run.variant.kind
    defaults = FFN_CONFIGS[kind]().to_dict()
    ffn = run.sizes["ffn"]
    fields = [
        f"{k}={v!r}" for k, v in ffn.items() if k in SIZED_FIELDS[kind] or v != defaults.get(k)
    ]
    line = (
        f"{run.variant.name}: {kind} {' '.join(fields)} | total "
        f"{run.sizes['total_params']:,} active {run.sizes['active_params']:,}"
    )
    for target in run.sizes.get("unfitted", ()):
        got, want = run.sizes[f"budget_{target}_params"], run.sizes[f"target_{target}_params"]
        line += f" | {target} not fitted (sizes given): {got:,} vs target {want:,}"
    return line


def execute(runs: Sequence[Run], log=print) -> dict[str, int]:
    """Train every run not finished yet; a progress line after each. Stops at an
    interrupted run (SIGINT/SIGTERM: the trainer saved a checkpoint; rerun to resume).

    The runs' results folders are locked for the sweep (:func:`sweep_lock`): a second sweep
    on the same folder fails at once with :class:`~dsc_jax.train.workdir.WorkdirLockedError`.
    """
    with contextlib.ExitStack() as stack:
        for folder in sorted({os.path.dirname(run.workdir) for run in runs}):
            stack.enter_context(sweep_lock(folder))
        return _execute(runs, log)


def _execute(runs: Sequence[Run], log) -> dict[str, int]:
    from dsc_jax.train.trainer import train_and_evaluate

    counts = {"trained": 0, "skipped": 0, "interrupted": 0}
    start, durations = time.time(), []
    for i, run in enumerate(runs):
        state, detail = run_state(run)
        if state == "finished":
            counts["skipped"] += 1
            log(f"[dsc-compare] skip finished run {run.workdir}")
        else:
            if state == "conflict":
                raise ValueError(f"{run.workdir} {detail}; use another --results folder.")
            t0 = time.time()
            log(f"[dsc-compare] {state} {run.workdir}")
            result = train_and_evaluate(run.config, run.workdir)
            if result["status"] != "completed":
                counts["interrupted"] += 1
                log(f"[dsc-compare] interrupted at step {result['step']}: rerun to resume")
                break
            done = {
                "fingerprint": fingerprint(run.config),
                "step": result["step"],
                "final": result["final"],
                "seconds": time.time() - t0,
            }
            if run.settings:  # the --set values this run read
                done["settings"] = run.settings
            write_json_atomically(
                os.path.join(run.workdir, DONE_FILE), done, indent=None, default=str
            )
            counts["trained"] += 1
            durations.append(time.time() - t0)
        left = len(runs) - i - 1
        eta = (sum(durations) / len(durations) * left) if durations else 0.0
        log(
            f"[dsc-compare] progress {i + 1}/{len(runs)} runs done "
            f"({counts['trained']} trained, {counts['skipped']} skipped) | elapsed "
            f"{format_duration(time.time() - start)} | ETA {format_duration(eta)}"
        )
    return counts


def resolve_study(preset: str) -> Study:
    if preset not in STUDIES:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(STUDIES)}.")
    return STUDIES[preset]
