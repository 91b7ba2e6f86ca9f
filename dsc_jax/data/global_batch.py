"""Per-process host batches -> one global ``jax.Array`` sharded over a mesh."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_global_batch(
    local_batch: np.ndarray, mesh: Mesh, spec: PartitionSpec | tuple[Any, ...] | None
) -> jax.Array:
    """Assemble every process's rows into one global array.

    Uses ``jax.make_array_from_process_local_data``.

    Args:
      local_batch: this process's ``[B // P, ...]`` rows (e.g. ``[B // P, T + 1]`` int32, as
        from ``DataBundle.train``); process ``p`` holds global rows
        ``[p * B / P, (p + 1) * B / P)``.
      mesh: the device mesh.
      spec: ``PartitionSpec`` (or a tuple of its entries) for the global array, e.g.
        ``PartitionSpec("data", None)``; its leading entry must shard the batch over the mesh
        axes that span processes.

    Returns:
      ``[B, ...]`` global ``jax.Array`` with ``NamedSharding(mesh, spec)``.
    """
    if spec is None:
        spec = PartitionSpec()
    elif not isinstance(spec, PartitionSpec):
        spec = PartitionSpec(*spec)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_batch))
