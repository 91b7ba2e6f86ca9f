"""Helpers for the tests that give every setting through an entry point: the leaves of a
config, and a changed value for each, derived from the config itself (no hand-made list)."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

import ml_collections

from dsc_jax.train.config import base_config, is_unread, unread_settings, validate_config

_PROBE = "__probe__"
_CHOICES = re.compile(r"expected one of (\(.*?\))\.")


def leaf_keys(config: ml_collections.ConfigDict | None = None) -> list[str]:
    """Every dotted leaf key of ``config`` (default :func:`base_config`), sorted."""

    def walk(node: ml_collections.ConfigDict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                out += walk(value, f"{prefix}{key}.")
            else:
                out.append(prefix + key)
        return out

    return sorted(walk(base_config() if config is None else config, ""))


def get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def put(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *path, leaf = key.split(".")
    node = config
    for part in path:
        node = node[part]
    with node.ignore_type():
        node[leaf] = value


def plain(value: Any) -> Any:
    """JSON types (tuples become lists), as config.json stores a value."""
    return json.loads(json.dumps(value))


def _choices(config: ml_collections.ConfigDict, key: str) -> tuple[Any, ...] | None:
    """The allowed values that validation names for a string setting (None: free text)."""
    cache_key = (json.dumps(config.to_dict(), sort_keys=True, default=str), key)
    if cache_key not in _CHOICES_SEEN:
        _CHOICES_SEEN[cache_key] = _probe_choices(config, key)
    return _CHOICES_SEEN[cache_key]


_CHOICES_SEEN: dict[tuple[str, str], tuple[Any, ...] | None] = {}


def _probe_choices(config: ml_collections.ConfigDict, key: str) -> tuple[Any, ...] | None:
    probe = ml_collections.ConfigDict(config.to_dict())
    put(probe, key, _PROBE)
    try:
        validate_config(probe)
    except ValueError as err:
        found = _CHOICES.search(str(err))
        if found and _PROBE in str(err):
            return ast.literal_eval(found.group(1))
    return None


def changed_values(config: ml_collections.ConfigDict, key: str) -> list[Any]:
    """Values of ``key`` that differ from its value in ``config``, the most telling first
    (numbers: doubled, then halved or one more; strings: every other allowed choice, or an
    edited text). Not all need to be valid: a test tries them in turn and accepts a
    refusal of each."""
    value = get(config, key)
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value * 2, value // 2, value + 1] if value > 0 else [512, 1]
    if isinstance(value, float):
        return [value / 2, value * 2] if value > 0 else [0.5]
    if isinstance(value, tuple | list):
        return [type(value)(1 if v == -1 else v * 2 for v in value)]
    if value is None:
        *path, leaf = key.split(".")
        try:  # the type of the placeholder in base_config() (a copy of a config drops it)
            kind = get(base_config(), ".".join(path)).get_ref(leaf).get_type()
        except ValueError:  # a plain None there too: such settings hold paths
            kind = str
        return [{float: 0.01, int: 7, str: "/tmp/changed"}.get(kind, ["changed.txt"])]
    if isinstance(value, str):
        choices = _choices(config, key)
        if choices is None:
            return [(value + "_changed") if value else "changed"]
        return [c for c in _concrete(choices) if c != value]
    raise TypeError(f"no changed value for {key}={value!r}")


def _concrete(choices: tuple[Any, ...]) -> list[Any]:
    """Choices with a pattern made concrete (``"tfds:<name>"`` -> ``"tfds:changed"``)."""
    return [re.sub(r"<\w+>", "changed", c) if isinstance(c, str) else c for c in choices]


def enabling_settings(
    config: ml_collections.ConfigDict, key: str, value: Any
) -> list[tuple[str, Any]] | None:
    """The choices with which a run of ``config`` reads ``key`` and accepts ``value`` there:
    ``[]`` when it does as it is; else one or two ``(choice key, choice)`` (e.g.
    ``data.source='text_files'`` for ``data.paths``; ``model.ffn.dispatch='capacity'`` for
    ``model.ffn.capacity_factor`` in a MoE run), found by trying the
    alternatives of every choice-valued setting; ``None`` when there are none."""

    def copy(changes: list[tuple[str, Any]]) -> ml_collections.ConfigDict:
        trial = ml_collections.ConfigDict(config.to_dict())
        for other, choice in changes:
            put(trial, other, choice)
        put(trial, key, value)
        return trial

    def reads(trial: ml_collections.ConfigDict) -> bool:
        return not is_unread(key, unread_settings(trial))

    def valid(trial: ml_collections.ConfigDict) -> bool:
        try:
            validate_config(trial)
        except ValueError:
            return False
        return True

    singles = [
        (other, choice)
        for other in leaf_keys(config)
        if other != key and isinstance(get(config, other), str)
        for choice in _concrete(_choices(config, other) or ())
        if choice != get(config, other)
    ]
    # read already: one choice may make the value valid; else first a choice that makes the
    # run read it, then maybe one that makes the value valid
    enabling = [[single] for single in singles if reads(copy([single]))]
    firsts = [[]] if reads(copy([])) else enabling
    for first in firsts:
        for second in [[]] + [[single] for single in singles]:
            trial = copy(first + second)
            if reads(trial) and valid(trial):
                return first + second
    return None


def cli_text(value: Any) -> str:
    """``value`` as ml_collections parses it from ``--config.KEY=TEXT``."""
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ")"
    return value if isinstance(value, str) else repr(value)
