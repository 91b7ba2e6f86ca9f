"""Sizing one run: the solver's iso-active FFN of a variant, then its training config.

:func:`method_config` turns a study's base config and a :class:`Variant` into the config of
one run: the FFN group of the variant's kind (``model.ffn``) sized by
:func:`dsc_jax.models.solver.solve_iso_active` to the study's targets (sizes set on purpose
are kept as constraints), then the variant's own FFN fields and overrides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from dsc_jax.experiments.presets import Study
from dsc_jax.experiments.variants import Variant
from dsc_jax.models.param_count import budget_params, count_params, fixed_param_count
from dsc_jax.models.solver import SIZED_FIELDS, IsoActiveSolution, solve_iso_active
from dsc_jax.train import config as config_lib


def set_setting(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
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


def get_setting(config: ml_collections.ConfigDict, dotted: str) -> Any:
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
    given: set[str] | frozenset[str] = frozenset(),
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The training config of one run and its parameter counts.

    ``base`` holds the settings; its FFN group is used when it is of the variant's kind
    (else the kind's defaults). ``given`` names the FFN fields set on purpose (by ``--set``
    or the study's preset): sized ones among them are kept by the solver, the other sized
    fields are solved. Then the variant's own FFN fields and overrides apply.
    """
    config = ml_collections.ConfigDict(base.to_dict())
    kind = variant.kind
    if config.model.ffn.kind != kind:
        config_lib.set_ffn_kind(config, kind)
        given = frozenset()
    fixed = {f: config.model.ffn[f] for f in given if f in SIZED_FIELDS[kind]}
    sol = solve(study, config, variant, fixed)
    config.model.d_model = sol.config.d_model
    for key in SIZED_FIELDS[kind]:
        config.model.ffn[key] = getattr(sol.ffn, key)
    for key, value in variant.ffn.items():
        config.model.ffn[key] = value
    for key, value in variant.overrides.items():
        set_setting(config, key, value)
    config.seed = seed
    config.name = f"{study.name}/{variant.name}_seed{seed}"
    if steps is not None:
        config.num_train_steps = steps
    if variant.match_active is not None:
        reference = Variant("reference", kind, ffn=variant.match_active)
        _, ref_sizes = method_config(study, base, reference, seed, steps, given)
        config.model.ffn.hidden_dim = _match_active_hidden(
            config, ref_sizes["active_params"], sol.config.vocab_size
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
        "ffn": {k: v for k, v in config.model.ffn.to_dict().items() if k != "kind"},
    }
    return config, sizes


def _active_params(config: ml_collections.ConfigDict, vocab_size: int) -> int:
    return count_params(config_lib.model_config(config, vocab_size=vocab_size))[1]


def _match_active_hidden(config: ml_collections.ConfigDict, target: int, vocab_size: int) -> int:
    """The ``hidden_dim`` (>= 1) whose active parameter count is closest to ``target``
    (active parameters are affine in ``hidden_dim``: two exact counts give the slope)."""
    probe = ml_collections.ConfigDict(config.to_dict())
    start = probe.model.ffn.hidden_dim
    base = _active_params(probe, vocab_size)
    probe.model.ffn.hidden_dim = start + 1
    slope = _active_params(probe, vocab_size) - base
    return max(1, start + round((target - base) / slope))
