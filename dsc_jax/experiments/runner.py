"""Train methods × seeds at iso-active parameters into one results folder, resumably.

Layout: ``<results>/<study>/<variant>_seed<k>/`` is one trainer workdir per run; a run
that finished has ``done.json`` there (its final metrics and the config's fingerprint) and
is not trained again; an interrupted one (checkpoint before the last step) resumes, since
the trainer resumes a workdir. ``<results>/<study>/`` also gets ``comparison.md``,
``comparison.json``, ``convergence.png`` and (with DSC runs) ``dsc_bank.png``.
"""

from __future__ import annotations

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
from dsc_jax.experiments.presets import METHODS, STUDIES, Study
from dsc_jax.models.solver import (
    IsoActiveSolution,
    budget_params,
    count_params,
    fixed_param_count,
    solve_iso_active,
)
from dsc_jax.train import config as config_lib
from dsc_jax.train.workdir import CHECKPOINT_DIR, read_saved_config

logger = logging.getLogger("dsc_jax.experiments")

DONE_FILE = "done.json"
ABLATIONS = ("none", "top_k", "regularisers", "variant", "bank_projection", "scale", "router")
TOP_K_VALUES = (2, 4, 8, 16)
SCALE_FACTORS = (0.5, 1.0, 2.0)
#: Product-key bank sizes of the ``router`` axis (perfect squares: √M × √M sub-keys).
PRODUCT_KEY_BASES = (4096, 65536)
#: The default-setting variant of each ablation axis: the reference its rows are compared to.
REFERENCE_VARIANTS = (
    "dsc",
    "dsc_k4",
    "dsc_all",
    "dsc_refined",
    "dsc_retract",
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
        return out
    raise ValueError(f"unknown ablation {axis!r}; expected one of {ABLATIONS}.")


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    node = config
    for part in path:
        node = node[part]
    if leaf not in node:
        raise ValueError(f"unknown config key {dotted!r}")
    node[leaf] = value


def solve(study: Study, base: ml_collections.ConfigDict, variant: Variant) -> IsoActiveSolution:
    """Iso-active FFN sizes of ``variant`` under ``study``'s targets (dense: total)."""
    d = round(base.model.d_model * variant.scale / base.model.num_heads)
    d *= base.model.num_heads
    vocab = base.model.vocab_size or (256 if base.data.tokenizer == "byte" else 50304)
    fixed_kw = dict(
        d_model=d,
        num_layers=base.model.num_layers,
        num_heads=base.model.num_heads,
        vocab_size=vocab,
        seq_len=base.model.max_seq_len or base.seq_len,
        tie_embeddings=base.model.tie_embeddings,
    )
    total, active = study.total_params, study.active_params
    if variant.scale != 1.0:  # same FFN budgets per unit of width: d and M scale together
        f0 = fixed_param_count(
            base.model.d_model, fixed_kw["num_layers"], vocab, fixed_kw["seq_len"]
        )
        f1 = fixed_param_count(d, fixed_kw["num_layers"], vocab, fixed_kw["seq_len"])
        s = d / base.model.d_model
        total = f1 + (total - f0) * s * s
        active = f1 + (active - f0) * s * s
    if variant.kind == "dense":
        return solve_iso_active("dense", total_params=total, **fixed_kw)
    return solve_iso_active(variant.kind, total_params=total, active_params=active, **fixed_kw)


def method_config(
    study: Study,
    base: ml_collections.ConfigDict,
    variant: Variant,
    seed: int,
    steps: int | None = None,
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The training config of one run and its parameter counts."""
    config = ml_collections.ConfigDict(base.to_dict())
    sol = solve(study, base, variant)
    config.model.ffn = variant.kind
    config.model.d_model = sol.config.d_model
    ffn = {**sol.ffn.to_dict(), **variant.ffn}
    for key, value in ffn.items():
        if key in config.model[variant.kind]:
            config.model[variant.kind][key] = value
    for key, value in variant.overrides.items():
        _set(config, key, value)
    config.seed = seed
    config.name = f"{study.name}/{variant.name}_seed{seed}"
    if steps is not None:
        config.num_train_steps = steps
    if variant.match_active is not None:
        reference = method_config(
            study, base, Variant("reference", variant.kind, ffn=variant.match_active), seed, steps
        )
        ffn["hidden_dim"] = _match_active_hidden(
            config, variant.kind, reference[1]["active_params"], sol.config.vocab_size
        )
        config.model[variant.kind].hidden_dim = ffn["hidden_dim"]
    config_lib.validate_config(config)
    model = config_lib.model_config(config, vocab_size=sol.config.vocab_size)
    total, active = count_params(model)
    # The run's own FFN (a variant's router, M or matched H), not the solved default's.
    budget_total, budget_active = budget_params(model)
    sizes = {
        "total_params": total,
        "active_params": active,
        "budget_total_params": budget_total,
        "budget_active_params": budget_active,
        "ffn": ffn,
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
    """Hash of a config (a finished run is only skipped when its config is unchanged)."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_done(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class Run:
    variant: Variant
    seed: int
    workdir: str
    config: ml_collections.ConfigDict
    sizes: dict[str, Any]


def same_finished_config(run: Run, done: Mapping[str, Any]) -> bool:
    """Whether the finished run in ``run.workdir`` was trained with ``run.config``: the same
    fingerprint, or a ``config.json`` that differs only by keys added to the code since, at
    their defaults (the rule a resumed run follows, :func:`config_lib.resume_changes`)."""
    if done.get("fingerprint") == fingerprint(run.config):
        return True
    saved = read_saved_config(run.workdir)
    if saved is None:
        return False
    allowed, refused = config_lib.resume_changes(saved, run.config)
    return not allowed and not refused


def plan(
    study: Study,
    results: str,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    steps: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Run]:
    """Every run of the sweep, seeds outermost so a partial sweep has every method."""
    base = study.base()
    for key, value in (overrides or {}).items():
        _set(base, key, value)
    runs = []
    for seed in seeds:
        for v in variants:
            cfg, sizes = method_config(study, base, v, seed, steps)
            runs.append(Run(v, seed, os.path.join(results, f"{v.name}_seed{seed}"), cfg, sizes))
    return runs


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def execute(runs: Sequence[Run], log=print) -> dict[str, int]:
    """Train every run not finished yet; a progress line after each. Stops at an
    interrupted run (SIGINT/SIGTERM: the trainer saved a checkpoint; rerun to resume)."""
    from dsc_jax.train.trainer import train_and_evaluate

    counts = {"trained": 0, "skipped": 0, "interrupted": 0}
    start, durations = time.time(), []
    for i, run in enumerate(runs):
        done = read_done(run.workdir)
        fp = fingerprint(run.config)
        if done is not None and same_finished_config(run, done):
            counts["skipped"] += 1
            log(f"[dsc-compare] skip finished run {run.workdir}")
        else:
            if done is not None:
                raise ValueError(
                    f"{run.workdir} finished with another config (fingerprint "
                    f"{done.get('fingerprint')} != {fp}); use another --results folder."
                )
            t0 = time.time()
            resumed = os.path.exists(os.path.join(run.workdir, CHECKPOINT_DIR))
            log(f"[dsc-compare] {'resume' if resumed else 'train'} {run.workdir}")
            result = train_and_evaluate(run.config, run.workdir)
            if result["status"] != "completed":
                counts["interrupted"] += 1
                log(f"[dsc-compare] interrupted at step {result['step']}: rerun to resume")
                break
            with open(os.path.join(run.workdir, DONE_FILE), "w") as f:
                json.dump(
                    {
                        "fingerprint": fp,
                        "step": result["step"],
                        "final": result["final"],
                        "seconds": time.time() - t0,
                    },
                    f,
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
