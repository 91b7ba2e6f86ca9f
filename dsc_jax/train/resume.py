"""Whether a workdir may take this run: lock it, then resume, set aside or refuse.

:func:`prepare_workdir` is the first start-up phase of the trainer; it writes nothing but
the lock file (and the moves below).

* ``config.start_over``: the earlier run's outputs are moved to ``abandoned-<time>/``.
* Checkpoints present: a resumption; the settings are checked against ``config.json`` and
  against the settings recorded in the newest checkpoint (either refuses a change of a key
  that may not change, :func:`dsc_jax.train.config.check_resume_config`).
* No checkpoint, but an earlier run's record (``metrics.jsonl``, ``config.json``,
  TensorBoard events): refused, unless its ``config.json`` holds this run's settings (the
  same command after a stop before the first checkpoint), when the record is moved to
  ``abandoned-<time>/`` first. A new start never overwrites a record.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from dsc_jax.train import config as config_lib
from dsc_jax.train import workdir as workdir_lib
from dsc_jax.train.checkpointing import newest_run_config
from dsc_jax.train.preemption import StopFlag, any_across_processes


def prepare_workdir(
    config: ml_collections.ConfigDict, workdir: str, stop: StopFlag | None = None
) -> workdir_lib.WorkdirLock:
    """Lock ``workdir`` and check it can take this run without losing an earlier one (see
    the module docstring); then probe that it and its checkpoint folder are writable.

    Args:
      config: the validated training config.
      workdir: the absolute run folder.
      stop: the start-up :class:`StopFlag`, checked before the lock and before any move.

    Returns:
      The held lock (process 0; other processes get an unlocked placeholder). Release it
      with ``release()``.

    Raises:
      WorkdirLockedError: another run holds the workdir.
      WorkdirError: the workdir or its checkpoint folder is not writable, or it holds the
        record of another run and no checkpoint.
      ValueError: the saved run's settings differ in a key that may not change.
      Interrupted: a start-up signal arrived.
    """
    if stop is not None:
        stop.check()  # starting the backend may take seconds
    lock = workdir_lib.WorkdirLock(workdir)
    with contextlib.ExitStack() as on_error:
        on_error.callback(lock.release)
        _lock_on_process_0(lock, workdir)
        set_aside = check_earlier_run(config, workdir)
        if stop is not None:
            stop.check()  # before anything is moved
        if set_aside and jax.process_index() == 0:
            workdir_lib.abandon(workdir)
        if jax.process_count() > 1:  # the others read the workdir after process 0 moved it
            multihost_utils.sync_global_devices("dsc_jax_prepare_workdir")
        workdir_lib.check_writable(workdir)
        workdir_lib.check_writable(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
        on_error.pop_all()  # every check passed: the caller holds the lock now
    return lock


def _lock_on_process_0(lock: workdir_lib.WorkdirLock, workdir: str) -> None:
    """Process 0 takes the lock; every process raises when it is held elsewhere."""
    locked_elsewhere = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except workdir_lib.WorkdirLockedError as err:
            locked_elsewhere = err
    if any_across_processes(locked_elsewhere is not None)[0]:
        raise locked_elsewhere or workdir_lib.WorkdirLockedError(
            f"workdir {workdir} is in use by another run (see process 0's message)."
        )


def check_earlier_run(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether an earlier run's outputs must be moved aside first; raises when this start may
    neither resume them nor set them aside (see the module docstring). Reads only.

    Raises:
      WorkdirError: an earlier run's record without checkpoints, of another run.
      ValueError: a resumption whose settings changed in a key that may not change.
    """
    if config.start_over:
        return True
    saved = workdir_lib.read_saved_config(workdir)
    if has_checkpoints(workdir):
        check_resume_settings(config, workdir, saved)
        return False
    record = workdir_lib.earlier_record(workdir)
    if not record:
        return False
    why = _why_not_this_run(config, saved)
    if why is not None:
        raise workdir_lib.WorkdirError(
            f"workdir {workdir} holds the record of an earlier run ({', '.join(record)}) but "
            f"no checkpoint to resume from, and {why}; a new start would overwrite it. Pass "
            "--config.start_over=True to move it to WORKDIR/abandoned-<time>/ and start from "
            "step 1, or use another --workdir."
        )
    logging.warning(
        "workdir %s holds the record (%s) of a run with these settings but no checkpoint (it "
        "stopped before its first checkpoint, or the checkpoints were removed): moving it "
        "aside and starting from step 1",
        workdir,
        ", ".join(record),
    )
    return True


def _why_not_this_run(
    config: ml_collections.ConfigDict, saved: dict[str, Any] | None
) -> str | None:
    """Why an earlier record without checkpoints is not this run's (``None``: it is)."""
    if saved is None:
        return f"no {workdir_lib.CONFIG_FILE} tells whether it is this run"
    refused = config_lib.resume_changes(saved, config)[1]
    if not refused:
        return None
    listing = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
    return f"its settings differ from these ({listing})"


def check_resume_settings(
    config: ml_collections.ConfigDict, workdir: str, saved: dict[str, Any] | None
) -> None:
    """Refuse a resumption whose settings differ from ``config.json`` (``saved``) or from
    those recorded in the newest checkpoint, in a key that may not change; log the allowed
    changes once.

    Raises:
      ValueError: naming the changed keys.
    """
    sources = []
    if saved is not None:
        sources.append((f"its {workdir_lib.CONFIG_FILE}", saved))
    newest = newest_run_config(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
    if newest is not None:
        sources.append((f"its checkpoint {newest[0]}", newest[1]))
    if saved is None and newest is not None:
        logging.warning(
            "%s of the run in %s is missing: checking the settings against checkpoint %d "
            "and writing it again",
            workdir_lib.CONFIG_FILE,
            workdir,
            newest[0],
        )
    elif saved is None:
        logging.warning(
            "cannot check the settings of the run in %s: it has no %s and its checkpoints "
            "record none (written by an older version)",
            workdir,
            workdir_lib.CONFIG_FILE,
        )
    logged = False
    for source, settings in sources:
        changes = config_lib.check_resume_config(settings, config, workdir, source)
        if changes and not logged:
            logging.warning("resuming with changed settings (allowed): %s", "; ".join(changes))
            logged = True


def has_checkpoints(workdir: str) -> bool:
    """Whether ``WORKDIR/checkpoints`` holds a finalised step folder."""
    folder = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
    try:
        return any(name.isdigit() for name in os.listdir(folder))
    except OSError:
        return False
