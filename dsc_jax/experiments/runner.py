"""Train methods × seeds at iso-active parameters into one results folder, resumably.

Layout: ``<results>/<study>/<variant>_seed<k>/`` is one trainer workdir per run; a run
that finished has ``done.json`` there (its final metrics and the config's fingerprint) and
is not trained again; an interrupted one (checkpoint before the last step) resumes, since
the trainer resumes a workdir. ``<results>/<study>/`` also gets ``comparison.md``,
``comparison.json``, ``convergence.png`` and (with DSC runs) ``dsc_bank.png``.

Settings (``dsc-compare --set KEY=VALUE``, :func:`plan`'s ``overrides``) take effect or are
refused (``ValueError``, one line naming the key): they are applied to the study's base
config before the FFNs are sized. A sized FFN field (:data:`SIZED_FIELDS`: ``num_bases``,
``hidden_dim``, ``num_experts``, ``rank``, ``top_k``) is a constraint: the solver keeps it and
sizes the others to the targets (:func:`dsc_jax.solve_iso_active`; a target it cannot fit
any more is reported); every other FFN field is applied as given. Refused: keys the runner
sets itself (:data:`RUNNER_OWNED`), keys a variant of the sweep sets itself (an ablation's
axis), an FFN group of a kind the sweep does not train, keys no run of the sweep reads
(:func:`dsc_jax.train.config.unread_settings`), unknown keys and bad values. A run that does
not read a setting (``bank_projection`` in a MoE run) keeps the study's value, so its config
and fingerprint do not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from dsc_jax import paper
from dsc_jax._storage import write_json_atomically
from dsc_jax.experiments.presets import METHODS, STUDIES, Study
from dsc_jax.layers.configs import FFN_CONFIGS
from dsc_jax.models.solver import (
    SIZED_FIELDS,
    IsoActiveSolution,
    budget_params,
    count_params,
    fixed_param_count,
    solve_iso_active,
)
from dsc_jax.train import config as config_lib
from dsc_jax.train import metrics as metrics_lib
from dsc_jax.train.workdir import CHECKPOINT_DIR, FolderLock, read_saved_config

logger = logging.getLogger("dsc_jax.experiments")

DONE_FILE = "done.json"
SWEEP_LOCK_FILE = ".sweep.lock"
#: Keys each run's config gets from the runner, and the option that sets them instead.
RUNNER_OWNED = {
    "seed": "each run's seed comes from --seeds",
    "name": "each run is named <study>/<variant>_seed<k>; name the study folder with --study",
    "model.ffn": "each run's FFN kind comes from --methods (or --ablation)",
}
ABLATIONS = (
    "none",
    "top_k",
    "regularisers",
    "variant",
    "bank_projection",
    "bank",
    "scale",
    "router",
)
TOP_K_VALUES = (2, 4, 8, 16)
SCALE_FACTORS = (0.5, 1.0, 2.0)
#: Raw bank-row radii of the ``bank`` axis (the default's first).
BANK_RADII = (paper.REFERENCE_BANK_INIT_SCALE, 0.05, 0.1, 1.0)
#: Product-key bank sizes of the ``router`` axis (perfect squares: √M × √M sub-keys).
PRODUCT_KEY_BASES = (4096, 65536)
#: The default-setting variant of each ablation axis: the reference its rows are compared to.
REFERENCE_VARIANTS = (
    "dsc",
    "dsc_k4",
    "dsc_all",
    "dsc_refined",
    "dsc_retract",
    "dsc_r0.02",
    "dsc_x1",
    "dsc_flat",
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a comparison: an FFN kind plus config overrides.

    ``overrides`` are dotted config keys (``"losses.aux": 0.0``) applied after the FFN is
    sized; ``ffn`` overrides the solved FFN fields (``{"top_k": 8}``); ``scale`` multiplies
    ``d_model`` and the parameter targets' FFN budget (d and M scaled together);
    ``match_active`` (FFN field overrides of a reference, ``{}`` for the study's solved
    ``kind`` variant) then re-sizes the FFN's ``hidden_dim`` (the static FFN, or the experts)
    so that the run has as many active parameters as that reference (e.g. a product-key
    router, whose weights are ``d·√M`` instead of ``d·M``, spends the difference on the
    static FFN)."""

    name: str
    kind: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ffn: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scale: float = 1.0
    match_active: Mapping[str, Any] | None = None


def method_variants(methods: Sequence[str]) -> list[Variant]:
    """The main comparison: one variant per FFN kind."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected among {METHODS}.")
    if len(set(methods)) < len(methods):
        raise ValueError(f"methods {list(methods)} name a method twice; give each once.")
    return [Variant(m, m) for m in methods]


def ablation_variants(axis: str) -> list[Variant]:
    """DSC variants along one ablation axis (the paper's open checks, spec §9)."""
    if axis == "top_k":  # K varies, M (and H) stay those solved for the default K = 4
        return [Variant(f"dsc_k{k}", "dsc", ffn={"top_k": k}) for k in TOP_K_VALUES]
    if axis == "regularisers":
        out = [Variant("dsc_all", "dsc")]
        return out + [
            Variant(f"dsc_no_{t}", "dsc", {f"losses.{t}": 0.0})
            for t in ("aux", "budget", "frame", "z")
        ]
    if axis == "variant":
        return [Variant(f"dsc_{v}", "dsc", ffn={"variant": v}) for v in ("refined", "basic")]
    if axis == "bank_projection":
        return [
            Variant(f"dsc_{p}", "dsc", {"bank_projection": p})
            for p in ("retract", "tangent", "none")
        ]
    if axis == "bank":  # how fast the atoms turn: raw-row radius, projection, the reference
        out = [Variant(f"dsc_r{r:g}", "dsc", ffn={"bank_radius": r}) for r in BANK_RADII]
        ref = {"bank_radius": paper.REFERENCE_BANK_INIT_SCALE, "bank_init": "orthogonal"}
        out.append(Variant("dsc_reference_bank", "dsc", {"bank_projection": "none"}, ffn=ref))
        r = paper.REFERENCE_BANK_INIT_SCALE
        out.append(
            Variant(
                f"dsc_r{r:g}_tangent", "dsc", {"bank_projection": "tangent"}, ffn={"bank_radius": r}
            )
        )
        return out
    if axis == "scale":
        return [Variant(f"dsc_x{s:g}", "dsc", scale=s) for s in SCALE_FACTORS]
    if axis == "router":  # the flat router vs product keys at bigger banks (issue 11)
        out = [Variant("dsc_flat", "dsc")]
        for bases in PRODUCT_KEY_BASES:
            pk = {"router": "product_key", "num_bases": bases}
            out.append(Variant(f"dsc_pk{bases}_same_ffn", "dsc", ffn=pk))
            out.append(Variant(f"dsc_pk{bases}", "dsc", ffn=pk, match_active={}))
        # balancing the atoms' top-K picks instead of each sub-key table's (issue 11 follow-up)
        pk = {"router": "product_key", "num_bases": PRODUCT_KEY_BASES[-1]}
        selection = {**pk, "product_key_aux": "selection"}
        name = f"dsc_pk{PRODUCT_KEY_BASES[-1]}_selection"
        out.append(Variant(name, "dsc", ffn=selection, match_active={}))
        # the pairing: flat at the paper's M=1523 (more active router weights than the
        # study's solved M) and product keys at 65,536 with as many active parameters
        flat_1523 = {"num_bases": paper.DSC_NUM_BASES}
        out.append(Variant(f"dsc_flat{paper.DSC_NUM_BASES}", "dsc", ffn=flat_1523))
        name = f"dsc_pk{PRODUCT_KEY_BASES[-1]}_as_flat{paper.DSC_NUM_BASES}"
        out.append(Variant(name, "dsc", ffn=pk, match_active=flat_1523))
        # the frame regulariser at M >> d: its cost is O(M d²) per call
        no_frame = {**pk, "frame_regularizer": False}
        name = f"dsc_pk{PRODUCT_KEY_BASES[-1]}_no_frame"
        out.append(Variant(name, "dsc", ffn=no_frame, match_active={}))
        return out
    raise ValueError(f"unknown ablation {axis!r}; expected one of {ABLATIONS}.")


def select_variants(variants: Sequence[Variant], names: Sequence[str]) -> list[Variant]:
    """The variants named in ``names`` (in ``variants``' order); an unknown name raises
    naming the known ones."""
    known = [v.name for v in variants]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected among {known}.")
    return [v for v in variants if v.name in names]


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Set one leaf, refusing unknown keys, groups and values of another type (one line)."""
    *path, leaf = dotted.split(".")
    node = config
    for depth, part in enumerate(path):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(path[:depth]) or "the config"
            raise ValueError(f"unknown config key {dotted!r}: no group {part!r} in {where}.")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f"unknown config key {dotted!r}; expected one of {known}.")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ValueError(f"{dotted!r} is a group of settings; set one of its keys.")
    if isinstance(node[leaf], tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except TypeError:
        raise ValueError(
            f"{dotted}={value!r} is invalid; expected the type of its current value "
            f"{node[leaf]!r} ({type(node[leaf]).__name__})."
        ) from None


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def vocab_size_of(config: ml_collections.ConfigDict) -> int:
    """The vocabulary a study's model has: ``model.vocab_size``, else the tokenizer's (256
    bytes, or GPT-2 BPE's padded 50,304)."""
    return config.model.vocab_size or (256 if config.data.tokenizer == "byte" else 50304)


def _transformer(base: ml_collections.ConfigDict, variant: Variant) -> dict[str, Any]:
    """The solver's transformer arguments of ``variant`` (``d`` scaled, whole heads)."""
    d = round(base.model.d_model * variant.scale / base.model.num_heads)
    return dict(
        d_model=d * base.model.num_heads,
        num_layers=base.model.num_layers,
        num_heads=base.model.num_heads,
        vocab_size=vocab_size_of(base),
        seq_len=base.model.max_seq_len or base.seq_len,
        tie_embeddings=base.model.tie_embeddings,
    )


def _targets(
    study: Study, base: ml_collections.ConfigDict, variant: Variant
) -> tuple[float, float]:
    """``(total, active)`` parameter targets of ``variant`` (dense: both the total)."""
    total, active = study.total_params, study.active_params
    if variant.scale != 1.0:  # same FFN budgets per unit of width: d and M scale together
        shape = _transformer(base, variant)
        layers, vocab, seq = shape["num_layers"], shape["vocab_size"], shape["seq_len"]
        f0 = fixed_param_count(base.model.d_model, layers, vocab, seq)
        f1 = fixed_param_count(shape["d_model"], layers, vocab, seq)
        s = shape["d_model"] / base.model.d_model
        total = f1 + (total - f0) * s * s
        active = f1 + (active - f0) * s * s
    return (total, total) if variant.kind == "dense" else (total, active)


def solve(
    study: Study,
    base: ml_collections.ConfigDict,
    variant: Variant,
    fixed: Mapping[str, int] | None = None,
) -> IsoActiveSolution:
    """Iso-active FFN sizes of ``variant`` under ``study``'s targets (dense: total); the
    ``fixed`` sizes (:data:`SIZED_FIELDS` of its kind) are kept, the others solved."""
    kw = {**_transformer(base, variant), **(fixed or {})}
    total, active = _targets(study, base, variant)
    if variant.kind == "dense":
        return solve_iso_active("dense", total_params=total, **kw)
    return solve_iso_active(variant.kind, total_params=total, active_params=active, **kw)


def method_config(
    study: Study,
    base: ml_collections.ConfigDict,
    variant: Variant,
    seed: int,
    steps: int | None = None,
    given: Mapping[str, set[str] | frozenset[str]] | None = None,
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The training config of one run and its parameter counts.

    ``base`` holds the settings (FFN fields included); ``given`` names, per FFN kind, the
    fields set on purpose (by ``--set`` or the preset): sized ones among them are kept by the
    solver, the other sized fields are solved. Then the variant's own FFN fields and
    overrides apply.
    """
    config = ml_collections.ConfigDict(base.to_dict())
    kind = variant.kind
    group = base.model[kind]
    fixed = {f: group[f] for f in (given or {}).get(kind, ()) if f in SIZED_FIELDS[kind]}
    sol = solve(study, base, variant, fixed)
    config.model.ffn = kind
    config.model.d_model = sol.config.d_model
    for key in SIZED_FIELDS[kind]:
        config.model[kind][key] = getattr(sol.ffn, key)
    for key, value in variant.ffn.items():
        config.model[kind][key] = value
    for key, value in variant.overrides.items():
        _set(config, key, value)
    config.seed = seed
    config.name = f"{study.name}/{variant.name}_seed{seed}"
    if steps is not None:
        config.num_train_steps = steps
    if variant.match_active is not None:
        reference = method_config(
            study,
            base,
            Variant("reference", kind, ffn=variant.match_active),
            seed,
            steps,
            given,
        )
        config.model[kind].hidden_dim = _match_active_hidden(
            config, kind, reference[1]["active_params"], sol.config.vocab_size
        )
    config_lib.validate_config(config)
    model = config_lib.model_config(config, vocab_size=sol.config.vocab_size)
    total, active = count_params(model)
    targets = _targets(study, base, variant)
    # The run's own FFN (a variant's router, M or matched H), not the solved default's.
    budget_total, budget_active = budget_params(model)
    sizes = {
        "total_params": total,
        "active_params": active,
        "budget_total_params": budget_total,
        "budget_active_params": budget_active,
        "target_total_params": round(targets[0]),
        "target_active_params": round(targets[1]),
        "unfitted": list(sol.unfitted),
        "ffn": config.model[kind].to_dict(),
    }
    return config, sizes


def _active_params(config: ml_collections.ConfigDict, vocab_size: int) -> int:
    return count_params(config_lib.model_config(config, vocab_size=vocab_size))[1]


def _match_active_hidden(
    config: ml_collections.ConfigDict, kind: str, target: int, vocab_size: int
) -> int:
    """The ``hidden_dim`` (>= 1) whose active parameter count is closest to ``target``
    (active parameters are affine in ``hidden_dim``: two exact counts give the slope)."""
    probe = ml_collections.ConfigDict(config.to_dict())
    start = probe.model[kind].hidden_dim
    base = _active_params(probe, vocab_size)
    probe.model[kind].hidden_dim = start + 1
    slope = _active_params(probe, vocab_size) - base
    return max(1, start + round((target - base) / slope))


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """Hash of the settings a run reads (:func:`dsc_jax.train.config.read_settings`: not,
    e.g., the ``model.dsc`` group of a MoE run); a finished run is only skipped when they
    are unchanged."""
    text = json.dumps(config_lib.read_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_warned_done: set[tuple[str, int, int]] = set()  # (path, mtime, size): one warning per damage


def read_done(workdir: str) -> dict[str, Any] | None:
    """The finished run's record (``done.json``), or ``None``: absent, or unreadable (empty,
    truncated, not a JSON object), which counts as unfinished with one warning per damaged
    file (the run resumes from its last checkpoint, which is the final one, and the record is
    written again)."""
    path = os.path.join(workdir, DONE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            done = json.load(f)
        if not isinstance(done, dict):
            raise ValueError(f"a JSON {type(done).__name__}, not an object")
        return done
    except (OSError, ValueError) as err:
        try:
            info = os.stat(path)
            seen = (path, info.st_mtime_ns, info.st_size)
        except OSError:
            seen = (path, 0, 0)
        if seen not in _warned_done:
            _warned_done.add(seen)
            logger.warning(
                "ignoring %s (%s: %s): treating the run as unfinished",
                path,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "unreadable",
            )
        return None


def sweep_lock(folder: str) -> FolderLock:
    """The lock that keeps a second sweep out of a results folder while one runs (a
    :class:`~dsc_jax.train.workdir.FolderLock` on ``folder``; acquire it, or use ``with``)."""
    return FolderLock(
        folder,
        lock_name=SWEEP_LOCK_FILE,
        what="results folder",
        holder="sweep",
        hint="wait for it to finish, stop it, or use another --results or --study",
    )


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The run's metric records (a line cut by a crash skipped); ``[]`` before it logged."""
    if not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE)):
        return []
    return metrics_lib.read_metrics(workdir)


@dataclasses.dataclass
class Run:
    """One planned run: ``settings`` are the ``--set`` keys it reads, with their values."""

    variant: Variant
    seed: int
    workdir: str
    config: ml_collections.ConfigDict
    sizes: dict[str, Any]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def config_changes(run: Run) -> list[str] | None:
    """``"key: saved -> now"`` for every setting ``run.config`` reads that differs from the
    run's saved ``config.json`` (:func:`dsc_jax.train.config.resume_changes`: keys added to
    the code since count as unchanged at their defaults, settings the run does not read are
    not compared); ``None`` when there is no ``config.json``."""
    saved = read_saved_config(run.workdir)
    if saved is None:
        return None
    allowed, refused = config_lib.resume_changes(saved, run.config)
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in sorted(allowed + refused)]


def same_finished_config(run: Run, done: Mapping[str, Any]) -> bool:
    """Whether the finished run in ``run.workdir`` was trained with ``run.config``: the same
    fingerprint, or a ``config.json`` without any change it reads (:func:`config_changes`)."""
    if done.get("fingerprint") == fingerprint(run.config):
        return True
    return config_changes(run) == []


def run_state(run: Run) -> tuple[str, str]:
    """``(state, detail)`` of a planned run's workdir: ``"finished"`` (skipped), ``"resume"``
    (a checkpoint, same settings), ``"train"`` (nothing there yet) or ``"conflict"`` (it
    finished, or is checkpointed, with other settings: ``detail`` says which)."""
    done = read_done(run.workdir)
    if done is not None:
        if same_finished_config(run, done):
            return "finished", ""
        changes = config_changes(run)
        detail = (
            "; ".join(changes)
            if changes
            else f"fingerprint {done.get('fingerprint')} != {fingerprint(run.config)}"
        )
        return "conflict", f"finished with another config ({detail})"
    folder = os.path.join(run.workdir, CHECKPOINT_DIR)
    if os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder)):
        # What the trainer would refuse to resume: a change against config.json or against
        # the settings recorded in the newest checkpoint (unread settings are not compared).
        from dsc_jax.train.checkpointing import newest_run_config

        sources = [read_saved_config(run.workdir)]
        newest = newest_run_config(folder)
        if newest is not None:
            sources.append(newest[1])
        for saved in sources:
            refused = [] if saved is None else config_lib.resume_changes(saved, run.config)[1]
            if refused:
                diff = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
                return "conflict", f"checkpointed with other settings ({diff})"
        return "resume", ""
    return "train", ""


def _ffn_given(study: Study, overrides: Mapping[str, Any]) -> dict[str, set[str]]:
    """Per FFN kind, the fields set on purpose: by ``overrides`` or by the study's base
    (where it differs from :func:`base_config`)."""
    preset, defaults = study.base(), config_lib.base_config()
    given = {
        kind: {f for f in preset.model[kind] if preset.model[kind][f] != defaults.model[kind][f]}
        for kind in FFN_CONFIGS
    }
    for key in overrides:
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "model" and parts[1] in FFN_CONFIGS:
            given[parts[1]].add(parts[2])
    return given


def _check_overrides(
    variants: Sequence[Variant], overrides: Mapping[str, Any], steps: int | None
) -> None:
    """Refuse settings the runner or a variant sets itself, and FFN groups of kinds the
    sweep does not train (before anything is sized)."""
    kinds = sorted({v.kind for v in variants})
    for key, value in overrides.items():
        given = f"--set {key}={value!r}"
        if key in RUNNER_OWNED:
            raise ValueError(f"{given}: {RUNNER_OWNED[key]}.")
        if key == "num_train_steps" and steps is not None:
            raise ValueError(f"{given}: --steps {steps} sets it too; give one of them.")
        parts = key.split(".")
        group = parts[1] if len(parts) >= 2 and parts[0] == "model" else None
        if group in FFN_CONFIGS and group not in kinds:
            raise ValueError(
                f"{given}: no run of this sweep has a {group} FFN (its FFN kinds: "
                f"{', '.join(kinds)}); add {group} to --methods or drop the setting."
            )
        owners = [v.name for v in variants if key in _variant_keys(v)]
        if owners:
            raise ValueError(
                f"{given}: variant(s) {', '.join(owners)} of this sweep set {key} themselves "
                "(the ablation's axis); drop the --set or run without --ablation."
            )


def _variant_keys(variant: Variant) -> set[str]:
    """The config keys ``variant`` sets itself after sizing."""
    group = f"model.{variant.kind}"
    keys = set(variant.overrides) | {f"{group}.{f}" for f in variant.ffn}
    if variant.match_active is not None:  # sizes hidden_dim to a reference of these fields
        keys |= {f"{group}.hidden_dim"} | {f"{group}.{f}" for f in variant.match_active}
    return keys


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
    config before the FFNs are sized; see the module docstring for what is refused.

    Raises:
      ValueError: a refused setting or bad value, or FFN targets no size fits (one line).
    """
    overrides = dict(overrides or {})
    _check_overrides(variants, overrides, steps)
    study_base, base = study.base(), study.base()
    for key, value in overrides.items():
        _set(base, key, value)
    given = _ffn_given(study, overrides)
    read_by = dict.fromkeys(overrides, False)
    runs = []
    for seed in seeds:
        for v in variants:
            # the other kinds' groups as the study has them: a setting of the moe group must
            # not make a DSC run invalid (it is validated, but not read, there)
            own = ml_collections.ConfigDict(base.to_dict())
            for kind in FFN_CONFIGS:
                if kind != v.kind:
                    own.model[kind] = ml_collections.ConfigDict(study_base.model[kind].to_dict())
            try:
                cfg, sizes = method_config(study, own, v, seed, steps, given)
            except ValueError as err:
                if not overrides:
                    raise
                text = str(err)  # "model.moe: ..." names the run already
                owner = "" if text.startswith(f"model.{v.name}:") else f"{v.name}: "
                given = " ".join(f"--set {k}={x!r}" for k, x in overrides.items())
                raise ValueError(f"{owner}{text} [{given}]") from None
            unread = config_lib.unread_settings(cfg)
            settings = {}
            for key in overrides:
                if config_lib.is_unread(key, unread):  # this run keeps the study's value
                    _set(cfg, key, _get(study_base, key))
                else:
                    settings[key], read_by[key] = _get(cfg, key), True
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


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


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
            f"{_fmt_time(time.time() - start)} | ETA {_fmt_time(eta)}"
        )
    return counts


def resolve_study(preset: str) -> Study:
    if preset not in STUDIES:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(STUDIES)}.")
    return STUDIES[preset]
