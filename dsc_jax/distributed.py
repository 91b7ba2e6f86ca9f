"""Multi-host start-up: ``jax.distributed`` once, before any other JAX call."""

from __future__ import annotations

import logging

import jax

from dsc_jax._compat import cluster_detected

logger = logging.getLogger(__name__)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start JAX's multi-controller runtime once (idempotent).

    With all arguments ``None`` the cluster is auto-detected (Cloud TPU pod slices,
    Slurm, Open MPI); with no cluster found this is a single-process run and nothing
    happens. Otherwise the arguments go to ``jax.distributed.initialize``. CPU
    collectives use gloo, so multi-process CPU runs (tests, debugging) work.
    Must run before any other JAX call.

    Returns:
      True when the distributed runtime is (now) initialised.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id)
    if all(a is None for a in explicit):
        if not cluster_detected():
            return False
    elif num_processes == 1 and coordinator_address is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    n, i = jax.process_count(), jax.process_index()
    logger.info("jax.distributed: process %d of %d, %d global devices", i, n, jax.device_count())
    return True
