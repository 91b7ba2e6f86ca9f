"""The training configuration: one commented base, validation before any compute.

Every preset (:mod:`dsc_jax.train.presets`, which ``configs/*.py`` return) starts from
:func:`base_config` and overrides fields, so the set of known keys lives here. The model
group holds one FFN group, ``model.ffn``: the chosen kind and its config type's fields
(:func:`ffn_group`, :func:`set_ffn_kind`). :func:`validate_config` raises a ``ValueError``
naming the key, the bad value and what is allowed, for unknown keys at every level and for
bad values. Which settings a run reads, and the resume check: :mod:`dsc_jax.train.settings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from dsc_jax import paper
from dsc_jax._checks import check_choice, check_positive_float, check_positive_int
from dsc_jax.bank import BANK_PROJECTIONS
from dsc_jax.data.config import default_data_config, validate_data_config
from dsc_jax.layers.configs import FFN_CONFIGS, FFN_KINDS, DSCConfig, FFNConfig, ffn_config
from dsc_jax.layers.losses import LossWeights
from dsc_jax.models.gpt import GPTConfig
from dsc_jax.sharding import MESH_AXES, default_mesh_config, parse_rule_overrides
from dsc_jax.train.optim import default_optim_config

# The settings a run reads and the resume check live in dsc_jax.train.settings; they are
# importable from here too (``config_lib.unread_settings``).
from dsc_jax.train.settings import (
    RESUME_MUTABLE_KEYS,
    check_resume_config,
    is_mutable_on_resume,
    is_unread,
    plain_config,
    read_settings,
    resume_changes,
    unread_changes,
    unread_reason,
    unread_settings,
    upgrade_saved,
)

OWNER = "config"


def ffn_group(kind: str, **fields: Any) -> ml_collections.ConfigDict:
    """The ``model.ffn`` group of one FFN kind: ``kind`` and every field of its config type
    (:data:`dsc_jax.layers.configs.FFN_CONFIGS`) at its default or as given in ``fields``
    (validated). ``None`` fields become typed placeholders so that
    ``--config.model.ffn.FIELD=value`` still works on them.

    Raises:
      ValueError: an unknown kind or field, or a bad value (naming it).
    """
    group = ml_collections.ConfigDict({"kind": kind})
    types = {f.name: str(f.type) for f in dataclasses.fields(FFN_CONFIGS[kind])}
    for name, value in ffn_config(kind, fields).to_dict().items():
        if value is None:  # e.g. out_init_std (float | None), bank_axis (str | None)
            value = ml_collections.config_dict.placeholder(
                str if types[name].startswith("str") else float
            )
        group[name] = value
    return group


def set_ffn_kind(
    config: ml_collections.ConfigDict, kind: str, **fields: Any
) -> ml_collections.ConfigDict:
    """Replace ``config.model.ffn`` with the group of ``kind`` (:func:`ffn_group`: its
    defaults, or ``fields``); returns ``config``. Presets and config files pick the FFN with
    it; on the command line the config file's ``get_config`` argument does
    (``--config=configs/tiny.py:moe``)."""
    group = ffn_group(kind, **fields)
    with config.model.unlocked():
        config.model.ffn = group
    return config


def default_model_config(ffn_kind: str = "dsc") -> ml_collections.ConfigDict:
    """The ``model`` group: every :class:`dsc_jax.GPTConfig` field with its default (the
    paper's model), except ``vocab_size = 0`` (take the data's vocabulary) and
    ``max_seq_len = 0`` (take ``seq_len``); ``ffn`` is the group of ``ffn_kind`` only
    (:func:`ffn_group`): ``--config.model.ffn.top_k=1``."""
    fields = GPTConfig().to_dict()
    cfg = ml_collections.ConfigDict({k: v for k, v in fields.items() if k != "ffn"})
    cfg.vocab_size = 0
    cfg.max_seq_len = 0
    cfg.ffn = ffn_group(ffn_kind)
    return cfg


def default_losses_config() -> ml_collections.ConfigDict:
    """The ``losses`` group: regulariser weights λ (the paper's Algorithm 1 losses)."""
    return ml_collections.ConfigDict(LossWeights().as_dict())


def base_config(ffn_kind: str = "dsc") -> ml_collections.ConfigDict:
    """Every known key with its default, with the FFN group of ``ffn_kind``; defaults
    follow the paper's training recipe."""
    c = ml_collections.ConfigDict()
    # Run name (free text, written to WORKDIR/config.json; lets result tables address runs).
    c.name = ""
    # Seed of parameter init and dropout/jitter randomness (the data windows use it too).
    c.seed = 42
    # Optimiser steps of the whole run (a resumed run continues up to this step).
    c.num_train_steps = 2000
    # Global batch: sequences per optimiser step, over all devices and processes.
    c.batch_size = 128
    # Tokens per training sequence T (each batch row holds T + 1 tokens).
    c.seq_len = 256
    # Gradient accumulation: the batch is processed as this many micro-batches (divides
    # batch_size); activation memory is that of one micro-batch.
    c.micro_batches = 8
    # Evaluate every this many steps, and at the last step (0: only at the last step).
    c.eval_every_steps = 250
    # Fixed validation batches per evaluation (0: no evaluation).
    c.eval_batches = 50
    # Sequences per validation batch (0: batch_size // micro_batches).
    c.eval_batch_size = 0
    # Write metrics (metrics.jsonl, TensorBoard, console) every this many steps (and at
    # step 1, at evaluations and at the last step).
    c.log_every_steps = 10
    # Save a checkpoint every this many steps (0: only at the end and on SIGTERM/SIGINT).
    c.checkpoint_every_steps = 250
    # Checkpoints kept on disk (the newest ones; >= 2 lets a corrupt latest fall back).
    c.keep_checkpoints = 3
    # Write checkpoints in a background thread (training continues while files are written).
    c.async_checkpointing = True
    # Router learning rate = this × the base learning rate, at every step (paper: 5; its
    # reference code ran 1×; 5× measured better for DSC, MoE and MoLoRA, see the README).
    c.router_lr_multiplier = paper.ROUTER_LR_MULTIPLIER
    # DSC bank after each update: "retract" (rows back at norm model.ffn.bank_radius),
    # "tangent" (tangent-space update, then retract) or "none" (rows drift; the reference
    # code's bank). The radius sets how fast the atoms turn (README: the bank's speed).
    c.bank_projection = "retract"
    # JAX persistent compilation cache folder ("": off). Speeds up restarts and resumes.
    c.compilation_cache_dir = ""
    # Set the previous run in WORKDIR aside (moved to WORKDIR/abandoned-<time>/) and start from
    # step 1. Needed when the old run cannot be resumed (unreadable checkpoints, changed
    # settings). One-off: drop it again, or every restart of the job starts over.
    c.start_over = False
    c.model = default_model_config(ffn_kind)  # GPT and FFN hyper-parameters (dsc_jax.gpt.GPTConfig)
    c.optim = default_optim_config()  # AdamW, schedule, clipping (dsc_jax.train.optim)
    c.data = default_data_config()  # corpus, tokenizer, pipeline (dsc_jax.data.config)
    c.losses = default_losses_config()  # λ of the regularisers (dsc_jax.losses.LossWeights)
    c.mesh = default_mesh_config()  # device mesh and sharding rules (dsc_jax.sharding)
    return c


GROUPS = ("model", "optim", "data", "losses", "mesh")


def _as_dict(value: Any) -> dict[str, Any]:
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _check_keys(where: str, given: Any, known: Any) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected keys among {sorted(known)}.")
    missing = sorted(set(known) - set(given))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; start from base_config().")


def _check_unit_interval(owner: str, field: str, value: Any) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1
    if not ok:
        raise ValueError(f"{owner}.{field}={value!r} is invalid; expected 0 <= value < 1.")


def bank_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The train state's bank arguments of a run: ``bank_projection`` and ``bank_radius``
    (the radius is the DSC layer's ``model.ffn.bank_radius``, one setting for the layer's
    init and the retraction; models without a bank take the layer's default, unused)."""
    return {
        "bank_projection": config.bank_projection,
        "bank_radius": config.model.ffn.get("bank_radius", DSCConfig.bank_radius),
    }


def ffn_kind_of(group: Any) -> str | None:
    """The FFN kind whose config type has exactly the fields of ``group`` (less ``kind``)."""
    keys = set(group) - {"kind"}
    for kind, cls in FFN_CONFIGS.items():
        if keys == {f.name for f in dataclasses.fields(cls)}:
            return kind
    return None


def _ffn_of(group: Any) -> FFNConfig:
    """The FFN config of a ``model.ffn`` group (ValueError naming the bad key or value)."""
    if not isinstance(group, Mapping):
        raise ValueError(
            f"model.ffn={group!r} is invalid; expected the group of one FFN kind, e.g. "
            "--config=configs/tiny.py:moe or dsc_jax.train.config.set_ffn_kind(config, 'moe')."
        )
    fields = dict(group)
    kind = fields.pop("kind", None)
    if kind not in FFN_CONFIGS:
        raise ValueError(f"model.ffn.kind={kind!r} is not allowed; expected one of {FFN_KINDS}.")
    held = ffn_kind_of(group)
    if held is not None and held != kind:
        raise ValueError(
            f"model.ffn.kind={kind!r} is invalid: model.ffn holds the fields of a {held!r} FFN. "
            f"Pick the kind when the config is built: --config=FILE:{kind} (configs/*.py take "
            f"it as their argument) or set_ffn_kind(config, {kind!r})."
        )
    try:
        _check_keys("model.ffn", fields, {f.name for f in dataclasses.fields(FFN_CONFIGS[kind])})
        return ffn_config(kind, fields)
    except ValueError as err:
        text = str(err).removeprefix("model.ffn: ")
        raise ValueError(f"model.ffn: {text}") from None


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> GPTConfig:
    """The :class:`GPTConfig` of a run: ``model.vocab_size = 0`` takes ``vocab_size`` (the
    data's; 256 when unknown) and ``model.max_seq_len = 0`` takes ``config.seq_len``.

    Raises:
      ValueError: bad model fields, or an explicit vocabulary smaller than the data's.
    """
    fields = _as_dict(config.model)
    fields["ffn"] = _ffn_of(fields.get("ffn"))
    data_vocab = vocab_size or 256
    if fields.get("vocab_size") == 0:
        fields["vocab_size"] = data_vocab
    elif vocab_size is not None and fields.get("vocab_size", 0) < vocab_size:
        raise ValueError(
            f"model.vocab_size={fields['vocab_size']!r} is invalid; the data's tokenizer "
            f"needs at least {vocab_size} (or use 0 to take it from the data)."
        )
    if fields.get("max_seq_len") == 0:
        fields["max_seq_len"] = config.seq_len
    try:
        cfg = GPTConfig.from_dict(fields)
    except ValueError as err:
        raise ValueError(f"model: {err}") from None
    if cfg.max_seq_len < config.seq_len:
        raise ValueError(
            f"model.max_seq_len={cfg.max_seq_len!r} is invalid; expected >= seq_len="
            f"{config.seq_len!r} (or 0 to take seq_len)."
        )
    return cfg


def run_record(config: ml_collections.ConfigDict, vocab_size: int | None) -> dict[str, Any]:
    """What the trainer writes to ``WORKDIR/config.json``: ``config`` as given and ``model``,
    the :class:`GPTConfig` it builds (:func:`model_config`: vocabulary and context resolved,
    the ``model.ffn`` group as the FFN)."""
    return {"config": config.to_dict(), "model": model_config(config, vocab_size).to_dict()}


def _validate_optim(optim: Any, num_train_steps: int) -> None:
    owner = "optim"
    _check_keys(owner, _as_dict(optim), default_optim_config().to_dict())
    check_positive_float(owner, "learning_rate", optim.learning_rate)
    check_positive_float(owner, "min_learning_rate", optim.min_learning_rate, allow_zero=True)
    if optim.min_learning_rate > optim.learning_rate:
        raise ValueError(
            f"optim.min_learning_rate={optim.min_learning_rate!r} is invalid; expected "
            f"<= optim.learning_rate={optim.learning_rate!r}."
        )
    check_positive_int(owner, "warmup_steps", optim.warmup_steps, minimum=0)
    check_positive_int(owner, "decay_steps", optim.decay_steps, minimum=0)
    decay_steps = optim.decay_steps or num_train_steps
    if decay_steps <= optim.warmup_steps:
        raise ValueError(
            f"optim.warmup_steps={optim.warmup_steps!r} is invalid; expected fewer than the "
            f"cosine end step {decay_steps} (optim.decay_steps, or num_train_steps when 0)."
        )
    check_positive_float(owner, "weight_decay", optim.weight_decay, allow_zero=True)
    _check_unit_interval(owner, "b1", optim.b1)
    _check_unit_interval(owner, "b2", optim.b2)
    check_positive_float(owner, "eps", optim.eps)
    check_positive_float(owner, "grad_clip_norm", optim.grad_clip_norm, allow_zero=True)
    check_choice(owner, "decay_gamma", optim.decay_gamma, (True, False))


def _validate_mesh(mesh: Any) -> None:
    _check_keys("mesh", _as_dict(mesh), default_mesh_config().to_dict())
    shape = mesh.shape
    ok = isinstance(shape, tuple | list) and len(shape) == len(MESH_AXES)
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ok = ok and all(s >= 1 or s == -1 for s in shape) and list(shape).count(-1) <= 1
    if not ok:
        raise ValueError(
            f"mesh.shape={shape!r} is invalid; expected {len(MESH_AXES)} sizes over "
            f"{MESH_AXES}, each >= 1 or one of them -1 (all remaining devices)."
        )
    rules = mesh.logical_axis_rules
    if isinstance(rules, str):
        try:
            parse_rule_overrides(rules)
        except ValueError as err:
            raise ValueError(f"mesh.logical_axis_rules={rules!r} is invalid: {err}") from None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check every key and value of a training config (no data, no devices, no compute).

    Raises:
      ValueError: naming the key, the bad value and what is allowed.
    """
    base = base_config()
    _check_keys(OWNER, config.keys(), base.keys())
    if not isinstance(config.name, str):
        raise ValueError(f"config.name={config.name!r} is invalid; expected a string.")
    check_positive_int(OWNER, "seed", config.seed, minimum=0)
    for key in ("num_train_steps", "batch_size", "seq_len", "micro_batches", "log_every_steps"):
        check_positive_int(OWNER, key, config[key])
    for key in ("eval_every_steps", "eval_batches", "eval_batch_size", "checkpoint_every_steps"):
        check_positive_int(OWNER, key, config[key], minimum=0)
    check_positive_int(OWNER, "keep_checkpoints", config.keep_checkpoints)
    if config.batch_size % config.micro_batches:
        raise ValueError(
            f"config.micro_batches={config.micro_batches!r} is invalid; expected a divisor of "
            f"batch_size={config.batch_size!r}."
        )
    check_choice(OWNER, "async_checkpointing", config.async_checkpointing, (True, False))
    check_choice(OWNER, "start_over", config.start_over, (True, False))
    check_positive_float(OWNER, "router_lr_multiplier", config.router_lr_multiplier)
    check_choice(OWNER, "bank_projection", config.bank_projection, BANK_PROJECTIONS)
    if not isinstance(config.compilation_cache_dir, str):
        raise ValueError(
            f"config.compilation_cache_dir={config.compilation_cache_dir!r} is invalid; "
            "expected a folder path or ''."
        )
    model_config(config)
    _validate_optim(config.optim, config.num_train_steps)
    if config.model.param_dtype == "float16" and config.optim.eps < 1e-4:
        raise ValueError(
            f"optim.eps={config.optim.eps!r} is invalid with model.param_dtype='float16': the "
            "Adam state is float16 too, where it rounds to 0; expected optim.eps >= 1e-4."
        )
    validate_data_config(config.data)
    losses = _as_dict(config.losses)
    _check_keys("losses", losses, default_losses_config().to_dict())
    try:
        LossWeights(**losses)
    except ValueError as err:
        raise ValueError(f"losses: {err}") from None
    _validate_mesh(config.mesh)
    _validate_bank_axis(config.model.ffn)


def _validate_bank_axis(ffn: Any) -> None:
    """``model.ffn.bank_axis`` (DSC): the trainer does not run its step under
    ``jax.set_mesh`` yet, which the bank-parallel layer needs; refuse it before any compute
    (an axis the mesh lacks is named as such)."""
    bank_axis = ffn.get("bank_axis")
    if bank_axis is None:
        return
    if bank_axis not in MESH_AXES:
        raise ValueError(
            f"model.ffn.bank_axis={bank_axis!r} is invalid; expected None or one of the "
            f"trainer's mesh axes {MESH_AXES}."
        )
    raise ValueError(
        f"model.ffn.bank_axis={bank_axis!r}: the trainer does not support bank parallelism "
        "yet (its step does not run under jax.set_mesh); use DSCLayer(bank_axis=...) in your "
        "own jitted step under jax.set_mesh, or leave model.ffn.bank_axis unset (None)."
    )


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
    """Sequences per validation batch (``eval_batch_size``, or the micro-batch size if 0)."""
    return config.eval_batch_size or config.batch_size // config.micro_batches


__all__ = [
    "GROUPS",
    "RESUME_MUTABLE_KEYS",
    "bank_settings",
    "base_config",
    "check_resume_config",
    "default_losses_config",
    "default_model_config",
    "eval_batch_size",
    "ffn_group",
    "ffn_kind_of",
    "is_mutable_on_resume",
    "is_unread",
    "model_config",
    "plain_config",
    "read_settings",
    "resume_changes",
    "run_record",
    "set_ffn_kind",
    "unread_changes",
    "unread_reason",
    "unread_settings",
    "upgrade_saved",
    "validate_config",
]
