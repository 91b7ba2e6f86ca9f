"""The training loop: ``train_and_evaluate(config, workdir)``, in four short phases.

1. :func:`prepare_workdir`: validate the config, lock the workdir (one run per folder; see
   :mod:`dsc_jax.train.workdir`), set an old run aside on ``config.start_over``, refuse a
   resumption whose settings changed (:func:`dsc_jax.train.config.check_resume_config`,
   against ``config.json`` and the settings recorded in the newest checkpoint), refuse a new
   start over an earlier run's record, probe that the workdir and checkpoint folder are
   writable. Nothing is written yet.
2. :func:`build_run` then :func:`restore_or_start`: mesh, data, model and optimiser, sharded
   state; restore the newest intact checkpoint (refusing when checkpoints exist but none can
   be read, or when its recorded settings differ) or initialise. Only then is
   ``config.json`` written.
3. :func:`train_loop`: steps with their cadence (log, evaluate, checkpoint, stop on signal);
   before each step's writes the workdir lock is verified (a removed ``.lock`` is written
   again; a lost lock stops the run without writing).
4. The final save, and :meth:`Checkpointer.close` which surfaces a failed background save.

Signals (:class:`StopFlag`, installed for the whole call): during start-up the first
SIGINT/SIGTERM is recorded and raised as :class:`Interrupted` at the end of the current
start-up phase (nothing to save yet; never lost); during the loop it saves after the current
step, then stops. A second signal ends the process at once.

Step numbering: ``step`` in metrics and checkpoints counts completed optimiser updates; the
update that turns ``state.step = s - 1`` into ``s`` is "step ``s``". Logging happens at step
1, every ``log_every_steps``, at evaluations and at the last step; evaluation every
``eval_every_steps`` and at the last step; checkpoints every ``checkpoint_every_steps``, at
the last step and when SIGTERM/SIGINT arrives (the handler only sets a flag; the loop saves
after the current step and returns). A second signal ends the process at once (exit status
128 + signal number), even while the main thread is blocked in a device computation or a
checkpoint wait: a watchdog thread sees the signal through :func:`signal.set_wakeup_fd`.

Before every log, evaluation and checkpoint the per-step values kept on device are checked:
the training loss, and a flag computed inside the jitted step that every parameter and
optimiser-state value is finite. The first bad step raises :class:`NonFiniteLossError` (or
:class:`NonFiniteStateError`); no checkpoint of a bad state is ever written, so the last good
one stays. A failed checkpoint write (checked after every step) raises
:class:`~dsc_jax.train.checkpointing.CheckpointWriteError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax.data import build_data
from dsc_jax.layers.losses import LossWeights
from dsc_jax.models.gpt import GPT
from dsc_jax.sharding import BATCH_AXES, make_mesh, rules_from_config, shard_batch
from dsc_jax.train import config as config_lib
from dsc_jax.train import diagnostics, steps
from dsc_jax.train import workdir as workdir_lib
from dsc_jax.train.checkpointing import Checkpointer, Restored, newest_run_config
from dsc_jax.train.metrics import MetricsWriter, read_metrics
from dsc_jax.train.optim import make_optimizer
from dsc_jax.train.state import TrainState, abstract_train_state, init_train_state


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


class NonFiniteStateError(NonFiniteLossError):
    """A parameter or optimiser-state value became NaN or Inf."""


class DataSetupError(RuntimeError):
    """The data could not be built (missing files or network, bad corpus); the message is the
    data layer's own."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM before the training loop began (nothing to save yet).

    Attributes:
      signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
      exit_status: ``128 + signal number`` (130 for SIGINT), the shell's convention.
    """

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum
        super().__init__(f"{self.signal_name} received before training started")


class StopFlag:
    """What SIGTERM/SIGINT do, from start-up to the last step; a second signal always ends
    the process at once with status 128 + signal number, without saving.

    * Start-up (``interrupt=True``, until :meth:`start_training`): nothing needs saving yet;
      the signal is recorded (one warning line) and :meth:`check`, called between start-up
      phases, raises :class:`Interrupted`. The handler itself never raises: an exception
      raised asynchronously inside an import or a callback from C++ code (JAX, TensorStore)
      is swallowed there, or aborts the process, so a signal could be lost.
    * Training: ``flag.requested = "SIGTERM"``; the loop saves after the current step, then
      stops.

    Entering the flag unblocks its signals (the command-line tools block them while they
    import, so that a signal waits for the handler instead of interrupting an import).

    The second signal is also seen by a watchdog thread through :func:`signal.set_wakeup_fd`:
    Python runs signal handlers only in the main thread between bytecodes, so a main thread
    blocked in a long device computation, an XLA compilation or an orbax wait would otherwise
    delay it until that call returns. A no-op outside the main thread.
    """

    def __init__(
        self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), *, interrupt: bool = False
    ) -> None:
        self.requested: str | None = None
        self._signum: int | None = None
        self._interrupt = interrupt
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._previous_mask: set[int] | None = None
        self._count = 0
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup_fd = -1
        self._watchdog: threading.Thread | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.requested is not None:  # second signal (normally the watchdog was first)
            _exit_now(signum)
        self.requested = signal.Signals(signum).name
        self._signum = signum
        if self._interrupt:
            logging.warning(
                "%s received during start-up: stopping when the current start-up step ends "
                "(send it again to stop at once)",
                self.requested,
            )
            return
        logging.warning(
            "%s received: saving a checkpoint after this step, then stopping (send it again "
            "to stop at once without saving)",
            self.requested,
        )

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal arrived during start-up, here or (multi-host:
        every process calls it at the same points) on another process; a no-op in the
        training phase, where the loop acts on :attr:`requested`."""
        if not self._interrupt:
            return
        if _agree_across_processes(self._signum is not None):
            raise Interrupted(self._signum if self._signum is not None else signal.SIGTERM)

    def start_training(self) -> None:
        """Leave start-up: raise a pending start-up signal, then save-then-stop on signals."""
        self.check()
        self._interrupt = False

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:  # write end closed: __exit__
                return
            for signum in data:
                if signum in self._signals:
                    self._count += 1
                    if self._count >= 2:
                        _exit_now(signum)

    def __enter__(self) -> StopFlag:
        try:
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()
            return self
        self._previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._old_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._pipe = (read_fd, write_fd)
        self._watchdog = threading.Thread(
            target=self._watch, args=(read_fd,), name="dsc-second-signal", daemon=True
        )
        self._watchdog.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous_mask is not None:
            blocked = [sig for sig in self._signals if sig in self._previous_mask]
            if blocked:
                signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
            self._previous_mask = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            read_fd, write_fd = self._pipe
            os.close(write_fd)
            if self._watchdog is not None:
                self._watchdog.join(timeout=5)
            os.close(read_fd)
            self._pipe = self._watchdog = None


def _exit_now(signum: int) -> None:
    """End the process immediately (no save, no cleanup; the kernel drops the workdir lock and
    an unfinished checkpoint stays a temporary folder that the next run removes)."""
    name = signal.Signals(signum).name
    os.write(2, f"\n{name} received again: stopping now without saving.\n".encode())
    os._exit(128 + signum)


def _enable_compilation_cache(path: str) -> None:
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(os.path.expanduser(path))
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # take effect even after earlier compilations


def _check_batch_divisibility(config: ml_collections.ConfigDict, mesh: Any) -> None:
    shards = 1
    for axis in BATCH_AXES:
        shards *= mesh.shape[axis]
    for key, value in (
        ("batch_size", config.batch_size),
        ("eval_batch_size", config_lib.eval_batch_size(config)),
    ):
        if value % shards or value % jax.process_count():
            raise ValueError(
                f"config.{key}={value} is invalid for mesh {dict(mesh.shape)}; expected a "
                f"multiple of data*fsdp={shards} and of the process count {jax.process_count()}."
            )


def _first_nonfinite(pending: list[tuple[int, jax.Array, jax.Array]]) -> tuple[int, str] | None:
    """The first ``(step, what)`` whose loss is not finite or whose state is not all finite."""
    values = jax.device_get([(loss, finite) for _, loss, finite in pending])
    for (step, _, _), (loss, finite) in zip(pending, values, strict=True):
        if not np.isfinite(loss):
            return step, f"training loss is {float(loss)}"
        if not bool(finite):
            return step, "a parameter or optimiser-state value is NaN or Inf"
    return None


def _agree_across_processes(local_flag: bool) -> bool:
    """True on every process when any process has the flag (a stop must be collective: every
    process has to join the same checkpoint save). One tiny all-gather per step, multi-host only.
    """
    return _any_across_processes(local_flag)[0]


def _any_across_processes(*local_flags: bool) -> tuple[bool, ...]:
    """For each flag: whether any process has it (one all-gather for all, multi-host only)."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in local_flags)
    flags = multihost_utils.process_allgather(np.asarray(local_flags, np.int32))
    return tuple(bool(f) for f in np.any(np.reshape(flags, (-1, len(local_flags))), axis=0))


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every floating value of ``tree`` is finite (one fused reduction)."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def checked_train_step(
    state: TrainState, batch: jax.Array, rng: jax.Array, **kwargs: Any
) -> tuple[TrainState, dict[str, jax.Array]]:
    """:func:`steps.train_step` plus ``metrics["state_finite"]`` (the new params and optimiser
    state are all finite), which gates every checkpoint."""
    new_state, metrics = steps.train_step(state, batch, rng, **kwargs)
    finite = all_finite((new_state.params, new_state.opt_state))
    return new_state, dict(metrics, state_finite=finite)


def prepare_workdir(
    config: ml_collections.ConfigDict, workdir: str, stop: StopFlag | None = None
) -> workdir_lib.WorkdirLock:
    """Lock ``workdir`` and check it can take this run without losing an earlier one.

    * ``config.start_over``: the earlier run's outputs are moved to ``abandoned-<time>/``.
    * Checkpoints present: a resumption; the settings are checked against ``config.json``
      and against the settings recorded in the newest checkpoint (either refuses a change
      of a key that may not change).
    * No checkpoint, but an earlier run's record (``metrics.jsonl``, ``config.json``,
      TensorBoard events): refused, unless its ``config.json`` holds this run's settings
      (the same command after a stop before the first checkpoint), when the record is moved
      to ``abandoned-<time>/`` first. A new start never overwrites a record.

    Writes nothing but the lock file (and the moves above).

    Returns:
      The held lock (process 0; other processes get an unlocked placeholder). Release it
      with ``release()``.

    Raises:
      WorkdirLockedError: another run holds the workdir.
      WorkdirError: the workdir or its checkpoint folder is not writable, or it holds the
        record of another run and no checkpoint.
      ValueError: the saved run's settings differ in a key that may not change.
    """
    is_main = jax.process_index() == 0
    if stop is not None:
        stop.check()  # starting the backend may take seconds
    lock = workdir_lib.WorkdirLock(workdir)
    try:
        locked_elsewhere = None
        if is_main:
            try:
                lock.acquire()
            except workdir_lib.WorkdirLockedError as err:
                locked_elsewhere = err
        if _agree_across_processes(locked_elsewhere is not None):
            raise locked_elsewhere or workdir_lib.WorkdirLockedError(
                f"workdir {workdir} is in use by another run (see process 0's message)."
            )
        set_aside = _check_earlier_run(config, workdir)
        if stop is not None:
            stop.check()  # before anything is moved
        if set_aside and is_main:
            workdir_lib.abandon(workdir)
        if jax.process_count() > 1:  # the others read the workdir after process 0 moved it
            multihost_utils.sync_global_devices("dsc_jax_prepare_workdir")
        workdir_lib.check_writable(workdir)
        workdir_lib.check_writable(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
    except BaseException:
        lock.release()
        raise
    return lock


def _check_earlier_run(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether an earlier run's outputs must be moved aside first; raises when this start may
    neither resume them nor set them aside (see :func:`prepare_workdir`). Reads only."""
    if config.start_over:
        return True
    saved = workdir_lib.read_saved_config(workdir)
    if _has_checkpoints(workdir):
        _check_resume_settings(config, workdir, saved)
        return False
    record = workdir_lib.earlier_record(workdir)
    if not record:
        return False
    refused = config_lib.resume_changes(saved, config)[1] if saved is not None else None
    if refused is None or refused:
        if refused is None:
            why = f"no {workdir_lib.CONFIG_FILE} tells whether it is this run"
        else:
            listing = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
            why = f"its settings differ from these ({listing})"
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


def _check_resume_settings(
    config: ml_collections.ConfigDict, workdir: str, saved: dict[str, Any] | None
) -> None:
    """Refuse a resumption whose settings differ from ``config.json`` or from those recorded
    in the newest checkpoint (in a key that may not change); log the allowed changes."""
    sources = []
    if saved is not None:
        sources.append((f"its {workdir_lib.CONFIG_FILE}", saved))
    newest = newest_run_config(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
    if newest is not None:
        sources.append((f"its checkpoint {newest[0]}", newest[1]))
        if saved is None:
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


def _has_checkpoints(workdir: str) -> bool:
    folder = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
    try:
        return any(name.isdigit() for name in os.listdir(folder))
    except OSError:
        return False


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built from the config (no state yet)."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    bundle: Any
    model_cfg: Any
    model: GPT
    tx: Any
    schedule: Any
    abstract_state: TrainState
    state_shardings: Any
    replicated: NamedSharding
    init_rng: jax.Array
    dropout_rng: jax.Array
    example: jax.ShapeDtypeStruct


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Mesh, data, model, optimiser and the abstract sharded state (no files written)."""
    if config.compilation_cache_dir:
        _enable_compilation_cache(config.compilation_cache_dir)
    mesh = make_mesh(config.mesh.shape)
    rules = rules_from_config(config.mesh)
    _check_batch_divisibility(config, mesh)
    try:
        bundle = build_data(
            config.data,
            seq_len=config.seq_len,
            global_batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except Exception as err:  # one clear message for every data failure (see DataSetupError)
        raise DataSetupError(f"data setup failed: {type(err).__name__}: {err}") from err
    model_cfg = config_lib.model_config(config, bundle.vocab_size)
    model = GPT(model_cfg)
    tx, schedule = make_optimizer(
        config.optim,
        num_train_steps=config.num_train_steps,
        router_lr_multiplier=config.router_lr_multiplier,
    )
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    micro_rows = config.batch_size // config.micro_batches
    example = jax.ShapeDtypeStruct((micro_rows, config.seq_len), jnp.int32)
    abstract_state, state_shardings = abstract_train_state(
        model, tx, init_rng, example, mesh, rules=rules, **config_lib.bank_settings(config)
    )
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        bundle=bundle,
        model_cfg=model_cfg,
        model=model,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        replicated=NamedSharding(mesh, P()),
        init_rng=init_rng,
        dropout_rng=dropout_rng,
        example=example,
    )


def _to_tree(state: TrainState, rng: jax.Array) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(rng),
    }


def restore_or_start(run: Run, checkpointer: Checkpointer) -> tuple[TrainState, jax.Array, bool]:
    """The newest intact checkpoint, or a freshly initialised state.

    Returns:
      ``(state, rng, restored)``.

    Raises:
      IncompatibleCheckpointError: a checkpoint of another configuration, or inconsistent.
      UnreadableCheckpointsError: checkpoints exist but none can be read.
      ValueError: the restored checkpoint records settings that may not change and did.
    """
    abstract_tree = _to_tree(run.abstract_state, run.dropout_rng)
    abstract_tree["rng"] = jax.ShapeDtypeStruct(
        abstract_tree["rng"].shape, jnp.uint32, sharding=run.replicated
    )
    restored: Restored | None = checkpointer.restore_latest(abstract_tree)
    if restored is None:
        state = init_train_state(
            run.model,
            run.tx,
            run.init_rng,
            run.example,
            run.state_shardings,
            **config_lib.bank_settings(run.config),
        )
        # One global array on every process (device_put cannot target other processes'
        # devices; a jit output with a replicated sharding can).
        rng = jax.jit(jax.random.wrap_key_data, out_shardings=run.replicated)(
            np.asarray(jax.random.key_data(run.dropout_rng))
        )
        logging.info("fresh run in %s", run.workdir)
        return state, rng, False
    if restored.config is not None:  # the settings that wrote the state actually restored
        config_lib.check_resume_config(
            restored.config, run.config, run.workdir, f"its checkpoint {restored.step}"
        )
    tree = restored.tree
    state = run.abstract_state.replace(
        step=tree["step"], params=tree["params"], opt_state=tree["opt_state"]
    )
    rng = jax.random.wrap_key_data(tree["rng"])
    run.bundle.train.set_state(restored.data_state)
    logging.info("resumed %s from checkpoint step %d", run.workdir, restored.step)
    return state, rng, True


def _log_summary(run: Run) -> None:
    num_params = sum(x.size for x in jax.tree.leaves(run.abstract_state.params))
    logging.info(
        "model: ffn=%s d=%d L=%d, %.2f M parameters | mesh %s | data: %d train / %d validation "
        "tokens, vocab %d | %d steps of %d x %d tokens",
        run.model_cfg.ffn_kind,
        run.model_cfg.d_model,
        run.model_cfg.num_layers,
        num_params / 1e6,
        dict(run.mesh.shape),
        len(run.bundle.train_tokens),
        len(run.bundle.validation_tokens),
        run.bundle.vocab_size,
        run.config.num_train_steps,
        run.config.batch_size,
        run.config.seq_len,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) the run in ``workdir`` as described by ``config``.

    Args:
      config: a training config (see :func:`dsc_jax.train.config.base_config`).
      workdir: run folder; ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and
        ``config.json`` go there. An existing run there is resumed.

    Returns:
      ``{"status": "completed" | "interrupted", "step": last step, "final": last metrics}``
      (and ``"signal": "SIGTERM" | "SIGINT"`` when interrupted).

    Raises:
      ValueError: bad configuration (before any compute), changed settings on resume, or a
        checkpoint of another config.
      WorkdirError: the workdir is locked by another run, not writable, holds an earlier
        run's record but no checkpoint, or its lock was lost mid-run.
      StorageError: a file of the run (lock, ``config.json``, metrics, TensorBoard) could
        not be written.
      Interrupted: SIGINT/SIGTERM before the training loop began (raised at the end of the
        start-up phase it arrived in).
      UnreadableCheckpointsError: checkpoints exist but none can be read.
      CheckpointWriteError: a checkpoint could not be written (the last good one is kept).
      DataSetupError: the data could not be built.
      NonFiniteLossError: the training loss or the state became NaN/Inf (names the step).
    """
    with StopFlag(interrupt=True) as stop:
        config_lib.validate_config(config)
        unread = config_lib.unread_changes(config)
        if unread:  # from a config file (dsc-train refuses them as --config.KEY overrides)
            logging.warning(
                "settings this run does not read (kept in config.json, no effect): %s",
                "; ".join(f"{key}={value!r} ({reason})" for key, value, reason in unread),
            )
        workdir = os.path.abspath(os.path.expanduser(workdir))
        lock = prepare_workdir(config, workdir, stop)
        try:
            stop.check()
            run = build_run(config, workdir)
            stop.check()
            checkpointer = Checkpointer(
                os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
                keep=config.keep_checkpoints,
                async_save=config.async_checkpointing,
            )
            with _closed_after(checkpointer):  # the final save is on disk (or an error)
                state, rng, restored = restore_or_start(run, checkpointer)
                stop.check()
                if jax.process_index() == 0:  # every check passed: now the run is ours
                    record = config_lib.run_record(config, run.bundle.vocab_size)
                    workdir_lib.write_config(workdir, record)
                _log_summary(run)
                return train_loop(run, checkpointer, state, rng, restored, stop=stop, lock=lock)
        finally:
            lock.release()


def train_loop(
    run: Run,
    checkpointer: Checkpointer,
    state: TrainState,
    rng: jax.Array,
    restored: bool,
    *,
    stop: StopFlag | None = None,
    lock: workdir_lib.FolderLock | None = None,
) -> dict[str, Any]:
    """Steps ``state.step + 1 .. num_train_steps`` with logging, evaluation, checkpoints and
    the stop-on-signal protocol; returns like :func:`train_and_evaluate`.

    Args:
      stop: the run's :class:`StopFlag` (one is installed for the loop when ``None``).
      lock: the workdir lock, verified before every step's writes
        (:meth:`~dsc_jax.train.workdir.FolderLock.verify`).
    """
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(StopFlag())
        stop.start_training()
        return _train_loop(run, checkpointer, state, rng, restored, stop, lock)


def _train_loop(
    run: Run,
    checkpointer: Checkpointer,
    state: TrainState,
    rng: jax.Array,
    restored: bool,
    stop: StopFlag,
    lock: workdir_lib.FolderLock | None,
) -> dict[str, Any]:
    config, mesh, bundle = run.config, run.mesh, run.bundle
    train_step = jax.jit(
        functools.partial(
            checked_train_step,
            loss_weights=LossWeights(**config.losses.to_dict()),
            micro_batches=config.micro_batches,
            lr_schedule=run.schedule,
            router_lr_multiplier=config.router_lr_multiplier,
        ),
        in_shardings=(run.state_shardings, shard_batch_spec(mesh), run.replicated),
        out_shardings=(run.state_shardings, run.replicated),
        donate_argnums=0,
    )
    evaluate = _make_evaluator(config, bundle, run.model, mesh, run.state_shardings.params)
    start_step = int(jax.device_get(state.step))
    writer = MetricsWriter(
        run.workdir,
        total_steps=config.num_train_steps,
        enabled=jax.process_index() == 0,
        resume_step=start_step,
    )
    tokens_per_step = config.batch_size * config.seq_len
    total = config.num_train_steps
    status, last_record = "completed", {}
    last_saved = start_step if restored else None
    pending: list[tuple[int, jax.Array, jax.Array]] = []
    interval_start, interval_steps = None, 0

    def check_finite() -> None:
        bad = _first_nonfinite(pending) if pending else None
        pending.clear()
        if bad is not None:
            error = (
                NonFiniteLossError if bad[1].startswith("training loss") else NonFiniteStateError
            )
            raise error(
                f"{bad[1]} at step {bad[0]}; stopping. The last good checkpoint "
                f"({checkpointer.latest_step_text()}) in {checkpointer.directory} is kept; "
                "lower the learning rate or check the data before resuming."
            )

    settings = config_lib.plain_config(config)  # recorded in every checkpoint

    def save(step: int) -> None:
        nonlocal last_saved
        if last_saved != step:
            check_finite()  # never save a bad state
            checkpointer.save(step, _to_tree(state, rng), bundle.train.get_state(), settings)
            last_saved = step

    def still_ours() -> bool:
        """Whether process 0 lost the workdir lock (raises there; the others follow)."""
        lost = None
        try:
            if lock is not None:
                lock.verify()
        except workdir_lib.WorkdirLockLostError as err:
            lost = err
        stopping, lock_lost = _any_across_processes(stop.requested is not None, lost is not None)
        if lock_lost:
            raise lost or workdir_lib.WorkdirLockLostError(
                f"process 0 lost the lock of {run.workdir} (see its message); stopping."
            )
        return stopping

    with _closed_after(writer):  # metrics flushed, or the error in flight kept
        if start_step >= total:
            logging.info("nothing to do: step %d >= num_train_steps %d", start_step, total)
            last_record = _logged_record(run.workdir, start_step)
        for step in range(start_step + 1, total + 1):
            batch = shard_batch(next(bundle.train), mesh)
            state, metrics = train_step(state, batch, rng)
            pending.append((step, metrics["train_loss"], metrics.pop("state_finite")))
            if interval_start is None:  # first step of this run: exclude compilation
                jax.block_until_ready(metrics)
                interval_start, interval_steps = time.perf_counter(), 0
            else:
                interval_steps += 1
            checkpointer.check_for_errors()  # a failed background save stops the run now
            last = step == total
            # One snapshot per step: a signal arriving later in this step is acted on
            # after the next step (save first, then stop), never half-way. Nothing is
            # written once the workdir may be another run's.
            stopping = still_ours()
            do_eval = config.eval_batches > 0 and (
                last or (config.eval_every_steps and step % config.eval_every_steps == 0)
            )
            do_log = do_eval or last or step == 1 or step % config.log_every_steps == 0
            do_save = (
                last
                or stopping
                or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
            )
            if do_log:
                record = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - interval_start
                check_finite()
                if interval_steps:
                    record["step_time"] = elapsed / interval_steps
                    record["tokens_per_sec"] = tokens_per_step * interval_steps / elapsed
                else:
                    record["step_time"] = record["tokens_per_sec"] = None
                if do_eval:
                    record.update(evaluate(state.params))
                writer.write(step, record)
                last_record = record
            if do_save:
                save(step)
            if do_log or do_save:
                interval_start, interval_steps = time.perf_counter(), 0
            if stopping and not last:
                status = "interrupted"
                logging.warning("stopped by %s after step %d", stop.requested, step)
                break
        check_finite()
    final_step = int(jax.device_get(state.step))
    result = {"status": status, "step": final_step, "final": last_record}
    if status == "interrupted":
        result["signal"] = stop.requested
    return result


@contextlib.contextmanager
def _closed_after(resource: Any) -> Iterator[Any]:
    """Close ``resource`` when the block ends. A close that fails while another error is in
    flight is logged, not raised over it (that error is the one to report); after a normal
    end, a failing close raises."""
    try:
        yield resource
    except BaseException:
        try:
            resource.close()
        except Exception as err:
            logging.warning("%s", err)
        raise
    resource.close()


def _logged_record(workdir: str, step: int) -> dict[str, Any]:
    """The metrics logged at ``step`` (without ``"step"``), or ``{}``: what a run that has
    nothing left to do reports as its final metrics."""
    try:
        records = read_metrics(workdir)
    except OSError:
        return {}
    for record in reversed(records):
        if isinstance(record, dict) and record.get("step") == step:
            return {k: v for k, v in record.items() if k != "step"}
    return {}


def shard_batch_spec(mesh: Any) -> NamedSharding:
    """Sharding of a ``[B, T + 1]`` batch: rows over ``("data", "fsdp")``."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def _make_evaluator(
    config: ml_collections.ConfigDict,
    bundle: Any,
    model: GPT,
    mesh: Any,
    param_shardings: Any,
) -> Callable[[Any], dict[str, float]]:
    """``params -> {"eval_loss", "eval_ppl", "diag/..."}`` over fixed validation batches."""
    if config.eval_batches == 0:
        return lambda params: {}
    replicated = NamedSharding(mesh, P())
    host_batches = bundle.eval_batches(config.eval_batches, config_lib.eval_batch_size(config))
    batches = [shard_batch(b, mesh) for b in host_batches]
    eval_step = jax.jit(
        functools.partial(steps.eval_step, apply_fn=model.apply),
        in_shardings=(param_shardings, shard_batch_spec(mesh)),
        out_shardings=replicated,
    )
    banks = jax.jit(
        diagnostics.bank_parameters, in_shardings=(param_shardings,), out_shardings=replicated
    )

    def evaluate(params: Any) -> dict[str, float]:
        sums = None
        for batch in batches:
            out = eval_step(params, batch)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        result = diagnostics.finalize_eval(sums)
        result.update(diagnostics.bank_effective_ranks(banks(params)))
        return result

    return evaluate
