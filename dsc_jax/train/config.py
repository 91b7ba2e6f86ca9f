"""The training configuration: one commented base, validation before any compute.

Every config file in ``configs/`` starts from :func:`base_config` and overrides fields, so the
set of known keys lives here. :func:`validate_config` raises a ``ValueError`` naming the key,
the bad value and what is allowed, for unknown keys at every level and for bad values.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from dsc_jax import paper
from dsc_jax._checks import check_choice, check_positive_float, check_positive_int
from dsc_jax.bank import BANK_PROJECTIONS
from dsc_jax.data.config import default_data_config, unread_keys, validate_data_config
from dsc_jax.layers.configs import FFN_CONFIGS, FFN_KINDS, DSCConfig, FFNConfig, ffn_config
from dsc_jax.layers.losses import LossWeights
from dsc_jax.models.gpt import GPTConfig
from dsc_jax.sharding import MESH_AXES, default_mesh_config, parse_rule_overrides
from dsc_jax.train.optim import default_optim_config

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
    for name, value in ffn_config(kind, fields).to_dict().items():
        group[name] = ml_collections.config_dict.placeholder(float) if value is None else value
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


def unread_settings(config: Any) -> dict[str, str]:
    """The settings of a (valid) config that its run does not read, as ``{key: reason}``.

    A key is a dotted leaf (``"bank_projection"``) or a whole group. The config holds the
    group of its own FFN kind only (``model.ffn``), so what is left follows from that kind:
    ``bank_projection`` and the ``budget``/``frame`` regularisers act on DSC layers only
    (``losses.frame`` also needs ``model.ffn.frame_regularizer``); a dense FFN has no router
    (``router_lr_multiplier``, ``losses.aux``, ``losses.z``). The data keys are
    :func:`dsc_jax.data.config.unread_keys` (``data.paths`` unless the source is
    ``text_files``, ...). Their values cannot change what the run computes, so:

    * :func:`read_settings` (a finished run's fingerprint) and :func:`resume_changes` (resume,
      reuse of a finished run) leave them out;
    * ``dsc-train`` refuses them as ``--config.KEY=VALUE`` overrides and ``dsc-compare`` as
      ``--set`` (a setting given there is meant to take effect); a config file may hold them
      (e.g. a preset's ``bank_projection`` in a MoE run), and the trainer logs those that
      differ from the defaults (:func:`unread_changes`).
    """
    plain = plain_config(config)
    ffn, out = plain["model"].get("ffn"), {}
    kind = ffn.get("kind") if isinstance(ffn, dict) else None
    if kind in FFN_CONFIGS:
        if kind != "dsc":
            reason = f"it acts on DSC layers only (model.ffn.kind={kind!r})"
            for key in ("bank_projection", "losses.budget", "losses.frame"):
                out[key] = reason
        elif not ffn.get("frame_regularizer", True):
            out["losses.frame"] = "model.ffn.frame_regularizer=False: no frame loss"
        if kind == "dense":
            reason = "a dense FFN has no router (model.ffn.kind='dense')"
            for key in ("router_lr_multiplier", "losses.aux", "losses.z"):
                out[key] = reason
    out.update({f"data.{key}": reason for key, reason in unread_keys(plain["data"]).items()})
    return out


def unread_reason(key: str, unread: Mapping[str, str]) -> str | None:
    """Why the dotted ``key`` is not read, when it is (under) one of the ``unread`` keys
    (:func:`unread_settings`); else ``None``."""
    for prefix, reason in unread.items():
        if key == prefix or key.startswith(prefix + "."):
            return reason
    return None


def is_unread(key: str, unread: Mapping[str, str]) -> bool:
    """Whether the dotted ``key`` is (under) one of the :func:`unread_settings` keys."""
    return unread_reason(key, unread) is not None


def read_settings(config: Any) -> dict[str, Any]:
    """``config`` as JSON types without its :func:`unread_settings`: what the run reads."""
    unread = unread_settings(config)

    def keep(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for key, value in tree.items():
            path = prefix + key
            if is_unread(path, unread):
                continue
            out[key] = keep(value, path + ".") if isinstance(value, dict) and value else value
        return out

    return keep(plain_config(config), "")


def unread_changes(config: Any) -> list[tuple[str, Any, str]]:
    """``(key, value, reason)`` for every leaf that differs from :func:`base_config` and is
    not read by the run (:func:`unread_settings`), keys sorted."""
    unread = unread_settings(config)
    values, defaults = _flatten(plain_config(config)), _defaults_of(config)
    out = []
    for key, value in sorted(values.items()):
        reason = unread_reason(key, unread)
        if reason is not None and defaults.get(key, _ABSENT) != value:
            out.append((key, value, reason))
    return out


def _defaults_of(config: Any) -> dict[str, Any]:
    """:func:`base_config` of ``config``'s FFN kind, flattened to dotted keys."""
    ffn = plain_config(config)["model"].get("ffn")
    kind = ffn.get("kind") if isinstance(ffn, dict) else None
    return _flatten(plain_config(base_config(kind if kind in FFN_CONFIGS else "dsc")))


def upgrade_saved(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config (``config.json``, a checkpoint's record) in today's layout.

    Older runs saved one group per FFN kind (``model.dense``, ``model.moe``,
    ``model.molora``, ``model.dsc``) next to ``model.ffn``, the kind's name; the run read
    only the group of that kind, which becomes ``model.ffn`` (with ``kind``). Fields added
    since count as unchanged at their defaults (:func:`resume_changes`).

    Raises:
      ValueError: an older-layout ``model.ffn`` naming no FFN kind or without its group.
    """
    model = saved.get("model")
    if not isinstance(model, Mapping) or isinstance(model.get("ffn"), Mapping):
        return dict(saved)
    kind = model.get("ffn")
    if kind not in FFN_CONFIGS or not isinstance(model.get(kind), Mapping):
        raise ValueError(
            f"the saved config has model.ffn={kind!r} without a model.ffn group or the group "
            f"of a known FFN kind {FFN_KINDS}; it cannot be compared with this run (use "
            "another --workdir, or --config.start_over=True to start from step 1)."
        )
    upgraded = {k: v for k, v in model.items() if k not in FFN_CONFIGS and k != "ffn"}
    upgraded["ffn"] = {"kind": kind, **model[kind]}
    return {**saved, "model": upgraded}


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
    """Sequences per validation batch (``eval_batch_size``, or the micro-batch size if 0)."""
    return config.eval_batch_size or config.batch_size // config.micro_batches


# Settings that may differ between a run and its resumption (dotted key paths, fnmatch
# patterns: ``*`` also matches dots, so ``model.*compute`` survives nesting the model
# section). Everything else must equal the saved config.json: a new key is refused by default.
RESUME_MUTABLE_KEYS: tuple[str, ...] = (
    "name",  # free text
    "num_train_steps",  # extend (or shorten) the run
    "log_every_steps",  # cadences: when things are written, not what is computed
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "async_checkpointing",
    "compilation_cache_dir",  # where compiled programs are cached
    "start_over",  # the one-off "set the old run aside" switch
    "mesh.shape",  # checkpoints restore onto any mesh
    "mesh.logical_axis_rules",  # and any sharding of the same arrays
    "data.cache_dir",  # where the same tokens, datasets and files are found
    "data.tfds_data_dir",
    "data.wikitext_dir",
    "data.wikitext_download",
    "data.gpt2_bpe_dir",
    "model.*compute",  # DSC kernel choice (same function, another algorithm)
)
_ABSENT = "<absent>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def plain_config(config: Any) -> dict[str, Any]:
    """``config`` as JSON types (what ``config.json`` stores): tuples become lists."""
    return json.loads(json.dumps(_as_dict(config)))


def is_mutable_on_resume(key: str) -> bool:
    """Whether the dotted config key may change when a run is resumed."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MUTABLE_KEYS)


def resume_changes(
    saved: dict[str, Any], config: Any
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """Differences between a saved config (``config.json``) and ``config``.

    A key the saved config lacks (added to the code since) counts as unchanged when the new
    value is :func:`base_config`'s default. Settings the run does not read
    (:func:`unread_settings` of ``config``, e.g. ``bank_projection`` in a MoE run) are not
    compared: they may differ, or exist on one side only.

    Returns:
      ``(allowed, refused)``: ``(key, old, new)`` triples, keys sorted.
    ``saved`` may have the older layout (:func:`upgrade_saved`).
    """
    old, new = _flatten(upgrade_saved(saved)), _flatten(plain_config(config))
    defaults = _defaults_of(config)
    unread = unread_settings(config)
    allowed, refused = [], []
    for key in sorted(set(old) | set(new)):
        if is_unread(key, unread):
            continue
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before == after or (before is _ABSENT and defaults.get(key, _ABSENT) == after):
            continue
        (allowed if is_mutable_on_resume(key) else refused).append((key, before, after))
    return allowed, refused


def check_resume_config(
    saved: dict[str, Any], config: Any, workdir: str, source: str = "its config.json"
) -> list[str]:
    """Refuse a resumption whose settings change the meaning of the run.

    Args:
      saved: the settings the run was trained with.
      config: the settings of this start.
      workdir: the run folder (for the message).
      source: where ``saved`` comes from, for the message (``"its checkpoint 8"``).

    Returns:
      One ``"key: old -> new"`` line per allowed change (for the log).

    Raises:
      ValueError: listing every refused ``key: old -> new`` and what to do instead.
    """
    allowed, refused = resume_changes(saved, config)
    if refused:
        diff = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in refused)
        raise ValueError(
            f"cannot resume the run in {workdir}: these settings differ from {source} "
            f"(saved -> now):\n{diff}\nUse the saved values, another --workdir, or "
            "--config.start_over=True to set the old run aside and start from step 1."
        )
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in allowed]
