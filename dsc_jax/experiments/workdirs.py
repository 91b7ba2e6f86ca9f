"""The state of one planned run's workdir: finished, to resume, to train, or in conflict.

A run that finished has ``done.json`` in its workdir (its final metrics and the config's
:func:`fingerprint`) and is not trained again when the settings it reads are unchanged;
an interrupted one resumes from its checkpoint when they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from dsc_jax.experiments.variants import Variant
from dsc_jax.train import config as config_lib
from dsc_jax.train import metrics as metrics_lib
from dsc_jax.train.workdir import CHECKPOINT_DIR, FolderLock, read_saved_config

logger = logging.getLogger("dsc_jax.experiments")

DONE_FILE = "done.json"
SWEEP_LOCK_FILE = ".sweep.lock"


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
