"""Checkpoints: orbax ``CheckpointManager`` with integrity checks and fallback on restore.

Layout: ``<directory>/<step>/`` (``step`` = completed optimiser steps) holds two items:

* ``state``: the array tree ``{"step", "params", "opt_state", "rng"}`` (orbax
  ``PyTreeSave``; written collectively by all processes, restorable onto another mesh by
  passing abstract arrays with the new shardings);
* ``meta``: JSON ``{"format", "step", "data_state", "signature", "fingerprint", "config",
  "config_sha256"}``: the data-iterator position, a hash of the tree's paths/shapes/dtypes
  (``signature``), a content hash of every array (``fingerprint``) and the training settings
  that produced the checkpoint with their hash (so a resumption is checked against the
  checkpoint itself, whatever became of ``config.json``).

Atomicity: orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it to
``<step>`` only when every item is complete, so a crash mid-save leaves no ``<step>`` folder
(unfinished temporary folders are ignored and cleaned up at start).

Integrity on restore (:meth:`Checkpointer.restore_latest`): the newest step is read; if its
``meta`` is unreadable, its arrays fail to load, or the restored arrays' (or data position's)
fingerprint differs from the one recorded at save time, the next older step is tried. Once
one restores, the newer unreadable ones are reported (one ``logging.warning`` line each) and
moved to ``<directory>.corrupt/<step>-<time>``. When *none* restores, nothing is moved and
:class:`UnreadableCheckpointsError` names them all (a transient read error must not turn into
a fresh run). A checkpoint whose ``signature`` differs (another model or optimiser
configuration), or whose data position disagrees with its step, is *not* treated as corrupt:
that raises :class:`IncompatibleCheckpointError` and nothing is moved.

Write failures (disk full, read-only mount, quota), whether raised by :meth:`Checkpointer.save`
or by the background thread of an asynchronous save, surface as one
:class:`CheckpointWriteError` from :meth:`~Checkpointer.save`,
:meth:`~Checkpointer.check_for_errors` or :meth:`~Checkpointer.close`; orbax's helper threads
that would wait forever for the failed save are released, so the process can exit.

The fingerprint is computed on device: for each leaf, two uint32 sums (plain and
position-weighted) of its bit pattern. Integer sums wrap exactly, so the value is
independent of the sharding and of the reduction order.

(A little over 400 lines, a third of them this contract: save, integrity check, fallback and
quarantine share one ``CheckpointManager`` and its error handling.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dsc_jax._compat import (
    background_save_failed,
    closed_event_loop_errors_quieted,
    release_blocked_orbax_threads,
)
from dsc_jax._storage import short_error

logger = logging.getLogger(__name__)

FORMAT = "dsc_jax.checkpoint.v1"
MIN_REPLICA_PARALLEL_SLICE_BYTES = 16 * 2**20


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written for a different parameter/optimiser tree."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's content does not match what was recorded when it was saved."""


class UnreadableCheckpointsError(RuntimeError):
    """Checkpoints exist but none of them can be restored (nothing was moved)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the message names the folder and the OS reason)."""


def _data_fingerprint(data_state: Any) -> str:
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Restored:
    """A restored checkpoint: ``tree`` as saved, the data-iterator state, its step, and the
    training config that wrote it (``None`` for checkpoints that carry none)."""

    step: int
    tree: Any
    data_state: dict[str, Any]
    config: dict[str, Any] | None = None


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a plain config dict as canonical JSON (hex)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def tree_signature(tree: Any) -> str:
    """sha256 of every leaf's key path, shape and dtype (hex)."""
    lines = [
        f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{np.dtype(leaf.dtype).name}"
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The bit pattern of ``x`` as a flat uint32 vector (8-byte types give two words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = np.dtype(x.dtype).itemsize
    if size == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return bits.reshape(-1)


@jax.jit
def _fingerprint_leaves(leaves: list[jax.Array]) -> jax.Array:
    """``[n_leaves, 2]`` uint32: wrapped sums of the bits and of ``bits * (odd weight_i)``."""
    rows = []
    for leaf in leaves:
        bits = _leaf_bits(leaf)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
        rows.append(
            jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])
        )
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> str:
    """Content hash of every array of ``tree`` (hex; sharding-independent, see module doc)."""
    sums = _fingerprint_leaves(jax.tree.leaves(tree))  # replicated: any local copy will do
    sums = np.asarray(sums.addressable_data(0), np.uint32)
    return hashlib.sha256(sums.tobytes()).hexdigest()


class Checkpointer:
    """Save/restore of the training tree and data position under an absolute ``directory``.

    Args:
      directory: the checkpoint folder (made absolute; created if absent).
      keep: number of newest checkpoints to keep.
      async_save: write in a background thread (arrays are copied off device before
        :meth:`save` returns, so the caller may donate or overwrite them).
    """

    def __init__(self, directory: str, *, keep: int, async_save: bool = True) -> None:
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.quarantine_dir = self.directory + ".corrupt"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        # Replica-parallel saving (each replica writes a slice of a replicated array) pays a
        # compilation per array and slice; only worth it for large slices.
        registry = ocp.type_handlers.create_type_handler_registry(
            (
                jax.Array,
                ocp.type_handlers.ArrayHandler(
                    min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES
                ),
            )
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        """Finalised checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        tree: Any,
        data_state: dict[str, Any],
        run_config: dict[str, Any] | None = None,
    ) -> None:
        """Save ``tree`` (a pytree of ``jax.Array``) and the data position as ``step``.

        ``run_config`` (the training config as JSON types) is recorded with it. Saving a step
        that already exists is a no-op.
        """
        if step in self.all_steps():
            return
        record = {}
        if run_config is not None:
            record = {"config": run_config, "config_sha256": config_sha256(run_config)}
        meta = {
            "format": FORMAT,
            "step": int(step),
            "data_state": data_state,
            "data_fingerprint": _data_fingerprint(data_state),
            "signature": tree_signature(tree),
            "fingerprint": fingerprint(tree),
            "time": time.time(),
            **record,
        }
        with self._write_errors(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )

    @contextlib.contextmanager
    def _write_errors(self, step: int | None) -> Iterator[None]:
        """Any exception inside becomes one :class:`CheckpointWriteError` (orbax's helper
        threads released)."""
        try:
            yield
        except CheckpointWriteError:
            release_blocked_orbax_threads()
            raise
        except Exception as err:
            release_blocked_orbax_threads()
            what = f"checkpoint {step}" if step is not None else "a checkpoint"
            raise CheckpointWriteError(
                f"could not write {what} to {self.directory} ({short_error(err)}); the last "
                f"complete checkpoint ({self.latest_step_text()}) is kept. Free space or fix "
                "the storage, then run the same command again to resume."
            ) from err

    def latest_step_text(self) -> str:
        """The newest finalised step as text (``"step 8"``), or ``"none"``."""
        try:
            steps = list(self.manager.all_steps())
        except Exception:  # pragma: no cover - the folder vanished
            steps = []
        return f"step {max(steps)}" if steps else "none"

    def check_for_errors(self) -> None:
        """Raise :class:`CheckpointWriteError` if a background save has failed (cheap: reads
        a flag of orbax's finalize thread; waits only when that thread has already failed)."""
        with self._write_errors(None):
            self.manager.check_for_errors()
            if background_save_failed(self.manager):
                self.manager.wait_until_finished()  # re-raises the thread's exception

    def wait_until_finished(self) -> None:
        """Block until every pending background save is on disk."""
        with self._write_errors(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager (the manager is released even when
        the last save failed; the failure is then raised as :class:`CheckpointWriteError`)."""
        with contextlib.ExitStack() as stack:
            stack.callback(self._close_manager)
            self.wait_until_finished()

    def _close_manager(self) -> None:
        try:
            self.manager.close()
        except Exception:  # a failed save: already reported by wait_until_finished
            release_blocked_orbax_threads()

    def _restore_step(self, step: int, abstract_tree: Any) -> Restored:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as err:  # unreadable or missing metadata
            raise CorruptCheckpointError(f"metadata unreadable ({short_error(err)})") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptCheckpointError(f"metadata is not a {FORMAT} record: {meta!r:.200}")
        data_state = meta.get("data_state") or {}
        if "data_fingerprint" in meta and meta["data_fingerprint"] != _data_fingerprint(data_state):
            raise CorruptCheckpointError("data position differs from its saved fingerprint")
        run_config = meta.get("config")
        if run_config is not None and (
            not isinstance(run_config, dict)
            or meta.get("config_sha256") != config_sha256(run_config)
        ):
            raise CorruptCheckpointError("recorded settings differ from their saved hash")
        if meta.get("signature") != tree_signature(abstract_tree):
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory}/{step} holds a different parameter/optimiser "
                "tree (another model, optimiser or parameter dtype configuration); use a new "
                "--workdir, or the configuration that wrote it."
            )
        try:
            restore = ocp.args.PyTreeRestore(
                item=abstract_tree,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree),
            )
            tree = self.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
        except Exception as err:
            raise CorruptCheckpointError(f"arrays unreadable ({short_error(err)})") from err
        if fingerprint(tree) != meta.get("fingerprint"):
            raise CorruptCheckpointError("array contents differ from the saved fingerprint")
        _check_positions(f"{self.directory}/{step}", step, meta, tree, data_state)
        return Restored(step=step, tree=tree, data_state=data_state, config=run_config)

    def _quarantine(self, step: int, reason: str) -> None:
        """Move a corrupt step folder aside (process 0), so that the step can be re-saved."""
        if jax.process_index() == 0:
            source = os.path.join(self.directory, str(step))
            target = os.path.join(self.quarantine_dir, f"{step}-{int(time.time())}")
            os.makedirs(self.quarantine_dir, exist_ok=True)
            if os.path.exists(source):
                shutil.move(source, target)
                logger.warning(
                    "checkpoint %s is corrupt or partial (%s): moved to %s, falling back to "
                    "the previous one",
                    source,
                    reason,
                    target,
                )
        multihost_utils.sync_global_devices(f"dsc_jax_quarantine_{step}")
        self.manager.reload()

    def restore_latest(self, abstract_tree: Any) -> Restored | None:
        """Restore the newest intact checkpoint, falling back over corrupt ones.

        Args:
          abstract_tree: ``jax.ShapeDtypeStruct`` tree (with ``sharding``) of what was saved;
            arrays come back with these shardings (any mesh).

        Returns:
          The restored checkpoint, or ``None`` when the folder holds no checkpoint.

        Raises:
          IncompatibleCheckpointError: the newest checkpoint belongs to another configuration,
            or its data position disagrees with its step.
          UnreadableCheckpointsError: checkpoints exist but none restores (nothing is moved).
        """
        failed: list[tuple[int, str]] = []
        with closed_event_loop_errors_quieted():
            for step in reversed(self.all_steps()):
                try:
                    restored = self._restore_step(step, abstract_tree)
                except CorruptCheckpointError as err:
                    failed.append((step, str(err)))
                    continue
                for bad_step, reason in failed:
                    self._quarantine(bad_step, reason)
                return restored
        if failed:
            listing = "; ".join(f"{self.directory}/{step}: {reason}" for step, reason in failed)
            raise UnreadableCheckpointsError(
                f"no checkpoint of this run can be read ({listing}). Nothing was moved or "
                "overwritten. If the storage had a transient error, run the same command "
                "again; to start from step 1 on purpose, pass --config.start_over=True (the "
                "old outputs are moved to WORKDIR/abandoned-<time>/)."
            )
        return None


def _check_positions(where: str, step: int, meta: dict[str, Any], tree: Any, data: Any) -> None:
    """The folder's step, the recorded step, the restored ``tree["step"]`` and the data
    position must agree, or the run would continue with other batches than it would have."""
    positions = {"folder": step, "meta.step": meta.get("step")}
    if isinstance(tree, dict) and "step" in tree:
        positions["state.step"] = int(np.asarray(jax.device_get(tree["step"])))
    if isinstance(data, dict) and "step" in data:
        positions["data_state.step"] = data["step"]
    if len(set(positions.values())) > 1:
        listing = ", ".join(f"{k}={v!r}" for k, v in positions.items())
        raise IncompatibleCheckpointError(
            f"checkpoint {where} is inconsistent: {listing}; resuming would train on other "
            "batches than the uninterrupted run. Move it aside to resume from an older one, "
            "or pass --config.start_over=True."
        )


def read_meta(directory: str, step: int) -> dict[str, Any]:
    """The ``meta`` JSON of a checkpoint step, read without orbax (for tools and tests)."""
    path = os.path.join(os.path.abspath(directory), str(step), "meta", "metadata")
    with open(path) as f:
        return json.load(f)


def newest_run_config(directory: str) -> tuple[int, dict[str, Any]] | None:
    """``(step, config)`` of the newest finalised checkpoint whose metadata reads and carries
    the training config (checked against its hash), or ``None``; read without orbax."""
    try:
        steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)
    except OSError:
        return None
    for step in steps:
        try:
            meta = read_meta(directory, step)
        except (OSError, ValueError):
            continue
        config = meta.get("config") if isinstance(meta, dict) else None
        if isinstance(config, dict) and meta.get("config_sha256") == config_sha256(config):
            return step, config
    return None
