"""Which settings a run reads, and which may change when it is resumed.

:func:`unread_settings` lists the keys of a config its run does not read (they follow from
the FFN kind and the data source); :func:`resume_changes` / :func:`check_resume_config`
compare a saved config (``config.json``, a checkpoint's record; older layouts upgraded by
:func:`upgrade_saved`) with a new start, ignoring those keys.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from typing import Any

from dsc_jax.data.config import unread_keys
from dsc_jax.layers.configs import FFN_CONFIGS, FFN_KINDS


def plain_config(config: Any) -> dict[str, Any]:
    """``config`` as JSON types (what ``config.json`` stores): tuples become lists."""
    return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))


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
    from dsc_jax.train.config import base_config  # the config module imports this one

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
