"""Every workaround that reaches into another library's private names or process-wide hooks.

Each was written for, and tested with, the versions in the table. When a private name is
missing (another version), the workaround does what the last column says and logs one
``DEBUG`` line naming it, so a behaviour change is a lost nicety, never a crash. When you
upgrade one of these libraries, check its rows (``tests/test_faults.py`` exercises them) and
update the versions.

==================================== ======================= =======================================
function                             written for             private name or hook it relies on
==================================== ======================= =======================================
``release_blocked_orbax_threads``    orbax-checkpoint 0.12.8 ``orbax.checkpoint._src.futures``:
                                                             ``future._SignalingThread``,
                                                             ``future.set_signals``
``background_save_failed``           orbax-checkpoint 0.12.8 ``CheckpointManager._finalize_thread``
``cluster_detected``                 jax 0.10.2              ``jax._src.clusters.ClusterEnv``
``quiet_closed_event_loop_errors``   tensorstore 0.1.86,     process-wide ``sys.excepthook`` and
``closed_event_loop_errors_quieted`` orbax-checkpoint 0.12.8 ``sys.unraisablehook``
``ignore_unawaited_coroutines``      orbax-checkpoint 0.12.8 the text of a ``RuntimeWarning``
==================================== ======================= =======================================

When the private name is missing:

* ``release_blocked_orbax_threads``: nothing is released; after a failed asynchronous save the
  process may wait for orbax's timeout before it exits (the command-line tools' exit watchdog
  still ends it).
* ``background_save_failed``: ``False``; a failed background save surfaces at the next save,
  wait or close instead of right after the current step.
* ``cluster_detected``: well-known environment variables (Slurm, Open MPI, Cloud TPU).
* the hooks and the warning filter use standard Python names only.

flax 0.12.8 is used through public names only.

The libraries are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

# Environment variables of the clusters jax.distributed detects by itself (the fallback of
# cluster_detected).
CLUSTER_ENV_VARS = ("SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES")
UNAWAITED_COROUTINE = "coroutine .* was never awaited"


def _missing(what: str, err: BaseException) -> None:
    logger.debug("compatibility shim unavailable (%s): %s: %s", what, type(err).__name__, err)


def ignore_unawaited_coroutines() -> None:
    """Hide the "coroutine ... was never awaited" warnings that the coroutines of a failed
    orbax save leave behind when they are garbage-collected (noise after an error that is
    already reported)."""
    warnings.filterwarnings("ignore", message=UNAWAITED_COROUTINE, category=RuntimeWarning)


def release_blocked_orbax_threads() -> None:
    """Unblock orbax's ``_SignalingThread`` helpers that still wait for the signals of a
    failed save: they are non-daemon threads and would keep the process from exiting for
    the length of orbax's asynchronous timeout. A no-op when the private names are gone."""
    try:
        from orbax.checkpoint._src.futures import future as orbax_future

        thread_type = orbax_future._SignalingThread
        set_signals = orbax_future.set_signals
    except (ImportError, AttributeError) as err:
        _missing("orbax _SignalingThread", err)
        return
    ignore_unawaited_coroutines()  # the released threads' coroutines are never awaited
    for thread in threading.enumerate():
        if isinstance(thread, thread_type) and thread.is_alive():
            try:
                thread.cancel()
                set_signals(thread._receive_signals, operation_id=thread._operation_id)
            except Exception as err:  # best effort, thread by thread
                _missing(f"release of {thread.name}", err)


def background_save_failed(manager: Any) -> bool:
    """Whether the finalize thread of an orbax ``CheckpointManager``'s background save has
    ended with an exception (cheap: reads a flag, never waits). ``False`` when unknown."""
    try:
        thread = manager._finalize_thread.get()
    except Exception as err:
        _missing("CheckpointManager._finalize_thread", err)
        return False
    return (
        thread is not None
        and not thread.is_alive()
        and getattr(thread, "exception", None) is not None
    )


def cluster_detected() -> bool:
    """Whether JAX's automatic cluster detection (Cloud TPU, Slurm, Open MPI, ...) applies:
    the logic ``jax.distributed.initialize()`` runs, else well-known environment variables."""
    try:
        from jax._src.clusters import ClusterEnv

        cluster_types = ClusterEnv._cluster_types
    except (ImportError, AttributeError) as err:
        _missing("jax._src.clusters.ClusterEnv", err)
        return any(name in os.environ for name in CLUSTER_ENV_VARS)
    return any(not env.opt_in_only_method and env.is_env_present() for env in cluster_types)


def _is_closed_loop_noise(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _quiet_unraisablehook(unraisable: Any) -> None:
    if not _is_closed_loop_noise(unraisable.exc_value):
        sys.__unraisablehook__(unraisable)


def quiet_closed_event_loop_errors() -> None:
    """Process-wide (the command-line tools call it): drop the "Event loop is closed" errors
    that TensorStore callbacks print from their own threads, through ``sys.excepthook`` or
    ``sys.unraisablehook``, after a failed checkpoint read or write (orbax closes its event
    loop first). Every other error is printed as before."""
    previous_excepthook = sys.excepthook

    def excepthook(exc_type: Any, exc: BaseException, tb: Any) -> None:
        if not _is_closed_loop_noise(exc):
            previous_excepthook(exc_type, exc, tb)

    sys.excepthook = excepthook
    sys.unraisablehook = _quiet_unraisablehook


@contextlib.contextmanager
def closed_event_loop_errors_quieted() -> Iterator[None]:
    """:func:`quiet_closed_event_loop_errors` for the duration of a block (checkpoint reads
    that may fail), then the previous hooks again."""
    previous = sys.excepthook, sys.unraisablehook
    quiet_closed_event_loop_errors()
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook = previous
