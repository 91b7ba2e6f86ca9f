"""Checkpoints: orbax ``CheckpointManager`` with integrity checks and fallback on restore.

Layout: ``<directory>/<step>/`` (``step`` = completed optimiser steps) holds two items:

* ``state``: the array tree ``{"step", "params", "opt_state", "rng"}`` (orbax
  ``PyTreeSave``; written collectively by all processes, restorable onto another mesh by
  passing abstract arrays with the new shardings);
* ``meta``: JSON ``{"format", "step", "data_state", "signature", "fingerprint"}``:
  the data-iterator position, a hash of the tree's paths/shapes/dtypes (``signature``) and
  a content hash of every array (``fingerprint``).

Atomicity: orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it to
``<step>`` only when every item is complete, so a crash mid-save leaves no ``<step>`` folder
(unfinished temporary folders are ignored and cleaned up at start).

Integrity on restore (:meth:`Checkpointer.restore_latest`): the newest step is read; if its
``meta`` is unreadable, its arrays fail to load, or the restored arrays' fingerprint differs
from the one recorded at save time, the checkpoint is reported (``logging.warning``), moved
to ``<directory>.corrupt/<step>`` and the next older step is tried. A checkpoint whose
``signature`` differs (another model or optimiser configuration) is *not* treated as
corrupt: that raises :class:`IncompatibleCheckpointError` and nothing is moved.

The fingerprint is computed on device: for each leaf, two uint32 sums (plain and
position-weighted) of its bit pattern. Integer sums wrap exactly, so the value is
independent of the sharding and of the reduction order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

FORMAT = "dsc_jax.checkpoint.v1"
MIN_REPLICA_PARALLEL_SLICE_BYTES = 16 * 2**20


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written for a different parameter/optimiser tree."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's content does not match what was recorded when it was saved."""


@dataclasses.dataclass
class Restored:
    """A restored checkpoint: ``tree`` as saved, the data-iterator state and its step."""

    step: int
    tree: Any
    data_state: dict[str, Any]


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

    def save(self, step: int, tree: Any, data_state: dict[str, Any]) -> None:
        """Save ``tree`` (a pytree of ``jax.Array``) and the data position as ``step``.

        Saving a step that already exists is a no-op.
        """
        if step in self.all_steps():
            return
        meta = {
            "format": FORMAT,
            "step": int(step),
            "data_state": data_state,
            "signature": tree_signature(tree),
            "fingerprint": fingerprint(tree),
            "time": time.time(),
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait_until_finished(self) -> None:
        """Block until every pending background save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def _restore_step(self, step: int, abstract_tree: Any) -> Restored:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as err:  # unreadable or missing metadata
            raise CorruptCheckpointError(
                f"metadata unreadable ({type(err).__name__}: {err})"
            ) from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptCheckpointError(f"metadata is not a {FORMAT} record: {meta!r:.200}")
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
            raise CorruptCheckpointError(
                f"arrays unreadable ({type(err).__name__}: {err})"
            ) from err
        if fingerprint(tree) != meta.get("fingerprint"):
            raise CorruptCheckpointError("array contents differ from the saved fingerprint")
        return Restored(step=step, tree=tree, data_state=meta.get("data_state") or {})

    def _quarantine(self, step: int) -> None:
        """Move a corrupt step folder aside (process 0), so that the step can be re-saved."""
        if jax.process_index() == 0:
            source = os.path.join(self.directory, str(step))
            target = os.path.join(self.quarantine_dir, f"{step}-{int(time.time())}")
            os.makedirs(self.quarantine_dir, exist_ok=True)
            if os.path.exists(source):
                shutil.move(source, target)
                logger.warning("moved corrupt checkpoint %s to %s", source, target)
        multihost_utils.sync_global_devices(f"dsc_jax_quarantine_{step}")
        self.manager.reload()

    def restore_latest(self, abstract_tree: Any) -> Restored | None:
        """Restore the newest intact checkpoint, falling back over corrupt ones.

        Args:
          abstract_tree: ``jax.ShapeDtypeStruct`` tree (with ``sharding``) of what was saved;
            arrays come back with these shardings (any mesh).

        Returns:
          The restored checkpoint, or ``None`` when no (intact) checkpoint exists.

        Raises:
          IncompatibleCheckpointError: the newest checkpoint belongs to another configuration.
        """
        for step in reversed(self.all_steps()):
            try:
                return self._restore_step(step, abstract_tree)
            except CorruptCheckpointError as err:
                logger.warning(
                    "checkpoint %s/%d is corrupt or partial: %s; falling back to the previous one",
                    self.directory,
                    step,
                    err,
                )
                self._quarantine(step)
        return None


def read_meta(directory: str, step: int) -> dict[str, Any]:
    """The ``meta`` JSON of a checkpoint step, read without orbax (for tools and tests)."""
    path = os.path.join(os.path.abspath(directory), str(step), "meta", "metadata")
    with open(path) as f:
        return json.load(f)
