"""The training loop: ``train_and_evaluate(config, workdir)`` = prepare, build, restore, loop,
close.

1. Prepare (:func:`dsc_jax.train.resume.prepare_workdir`): validate the config, lock the
   workdir (one run per folder), set an old run aside on ``config.start_over``, refuse a
   resumption whose settings changed or a new start over an earlier run's record, probe that
   the folders are writable. Nothing is written yet.
2. Build (:func:`dsc_jax.train.run.build_run`): mesh, data, model and optimiser, the
   abstract sharded state.
3. Restore (:func:`dsc_jax.train.run.restore_or_start`): the newest intact checkpoint
   (refusing when checkpoints exist but none can be read, or when its recorded settings
   differ), or a fresh state. Only then is ``config.json`` written.
4. Loop (:func:`train_loop`): steps with their cadence (log, evaluate, checkpoint, stop on a
   signal); before each step's writes the workdir lock is verified (a removed ``.lock`` is
   written again; a lost lock stops the run without writing).
5. Close: the final save, and :meth:`Checkpointer.close`, which surfaces a failed background
   save.

Signals (:mod:`dsc_jax.train.preemption`): during start-up a SIGINT/SIGTERM is recorded and
raised as :class:`Interrupted` at the end of the current phase; during the loop the run saves
after the current step, then stops. A second signal ends the process at once.

Step numbering: ``step`` in metrics and checkpoints counts completed optimiser updates; the
update that turns ``state.step = s - 1`` into ``s`` is "step ``s``". Logging happens at step
1, every ``log_every_steps``, at evaluations and at the last step; evaluation every
``eval_every_steps`` and at the last step; checkpoints every ``checkpoint_every_steps``, at
the last step and when a stop signal arrives.

Before every log, evaluation and checkpoint the per-step values kept on device are checked
(:mod:`dsc_jax.train.numerics`): the first bad step raises :class:`NonFiniteLossError` (or
:class:`NonFiniteStateError`) and no checkpoint of a bad state is written. A failed
checkpoint write (checked after every step) raises
:class:`~dsc_jax.train.checkpointing.CheckpointWriteError`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import ml_collections
from absl import logging

from dsc_jax.layers.losses import LossWeights
from dsc_jax.sharding import batch_sharding, shard_batch
from dsc_jax.train import config as config_lib
from dsc_jax.train import workdir as workdir_lib
from dsc_jax.train.checkpointing import Checkpointer
from dsc_jax.train.evaluation import make_evaluator
from dsc_jax.train.metrics import MetricsWriter, StepTimer, read_metrics
from dsc_jax.train.numerics import (
    NonFiniteGate,
    NonFiniteLossError,
    NonFiniteStateError,
    all_finite,
    checked_train_step,
)
from dsc_jax.train.preemption import Interrupted, StopFlag, any_across_processes
from dsc_jax.train.resume import prepare_workdir
from dsc_jax.train.run import DataSetupError, Run, build_run, checkpoint_tree, restore_or_start
from dsc_jax.train.state import TrainState

__all__ = [
    "DataSetupError",
    "Interrupted",
    "NonFiniteLossError",
    "NonFiniteStateError",
    "Run",
    "StopFlag",
    "all_finite",
    "build_run",
    "checked_train_step",
    "prepare_workdir",
    "restore_or_start",
    "train_and_evaluate",
    "train_loop",
]


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
    with StopFlag(interrupt=True) as stop, contextlib.ExitStack() as resources:
        _check_config(config)
        workdir = os.path.abspath(os.path.expanduser(workdir))
        lock = prepare_workdir(config, workdir, stop)
        resources.callback(lock.release)  # released last, after the final save
        stop.check()
        run = build_run(config, workdir)
        stop.check()
        checkpointer = resources.enter_context(_closed_after(_checkpointer(config, workdir)))
        state, rng, restored = restore_or_start(run, checkpointer)
        stop.check()
        _write_run_record(run)  # every check passed: now the workdir is this run's
        _log_summary(run)
        return train_loop(run, checkpointer, state, rng, restored, stop=stop, lock=lock)


def _check_config(config: ml_collections.ConfigDict) -> None:
    config_lib.validate_config(config)
    unread = config_lib.unread_changes(config)
    if unread:  # from a config file (dsc-train refuses them as --config.KEY overrides)
        logging.warning(
            "settings this run does not read (kept in config.json, no effect): %s",
            "; ".join(f"{key}={value!r} ({reason})" for key, value, reason in unread),
        )


def _checkpointer(config: ml_collections.ConfigDict, workdir: str) -> Checkpointer:
    return Checkpointer(
        os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
        keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
    )


def _write_run_record(run: Run) -> None:
    if jax.process_index() == 0:
        record = config_lib.run_record(run.config, run.bundle.vocab_size)
        workdir_lib.write_config(run.workdir, record)


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
      run: what :func:`build_run` made.
      checkpointer: the run's checkpointer (closed by the caller).
      state: the restored or fresh state; ``rng``: the run's base dropout key.
      restored: whether ``state`` is the newest checkpoint's (not saved again).
      stop: the run's :class:`StopFlag` (one is installed for the loop when ``None``).
      lock: the workdir lock, verified before every step's writes
        (:meth:`~dsc_jax.train.workdir.FolderLock.verify`).
    """
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(StopFlag())
        stop.start_training()
        return _Loop(run, checkpointer, rng, stop, lock).run_steps(state, restored)


class _Closable(Protocol):
    def close(self) -> None: ...


@contextlib.contextmanager
def _closed_after(resource: _Closable) -> Iterator[Any]:
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


def _jit_train_step(run: Run) -> TrainStep:
    config = run.config
    return jax.jit(
        functools.partial(
            checked_train_step,
            loss_weights=LossWeights(**config.losses.to_dict()),
            micro_batches=config.micro_batches,
            lr_schedule=run.schedule,
            router_lr_multiplier=config.router_lr_multiplier,
        ),
        in_shardings=(run.state_shardings, batch_sharding(run.mesh), run.replicated),
        out_shardings=(run.state_shardings, run.replicated),
        donate_argnums=0,
    )


TrainStep = Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


class _Loop:
    """One pass over the remaining steps (see :func:`train_loop`)."""

    def __init__(
        self,
        run: Run,
        checkpointer: Checkpointer,
        rng: jax.Array,
        stop: StopFlag,
        lock: workdir_lib.FolderLock | None,
    ) -> None:
        self.run, self.config = run, run.config
        self.checkpointer, self.rng, self.stop, self.lock = checkpointer, rng, stop, lock
        self.train_step = _jit_train_step(run)
        self.evaluate = make_evaluator(
            run.config, run.bundle, run.model, run.mesh, run.state_shardings.params
        )
        self.gate = NonFiniteGate(checkpointer)
        self.timer = StepTimer(run.config.batch_size * run.config.seq_len)
        self.settings = config_lib.plain_config(run.config)  # recorded in every checkpoint
        self.last_saved: int | None = None

    def run_steps(self, state: TrainState, restored: bool) -> dict[str, Any]:
        config, total = self.config, self.config.num_train_steps
        start_step = int(jax.device_get(state.step))
        self.last_saved = start_step if restored else None
        writer = MetricsWriter(
            self.run.workdir,
            total_steps=total,
            enabled=jax.process_index() == 0,
            resume_step=start_step,
        )
        status, last_record = "completed", {}
        with _closed_after(writer):  # metrics flushed, or the error in flight kept
            if start_step >= total:
                logging.info("nothing to do: step %d >= num_train_steps %d", start_step, total)
                last_record = _logged_record(self.run.workdir, start_step)
            for step in range(start_step + 1, total + 1):
                batch = shard_batch(next(self.run.bundle.train), self.run.mesh)
                state, metrics = self.train_step(state, batch, self.rng)
                self.gate.add(step, metrics["train_loss"], metrics.pop("state_finite"))
                self.timer.stepped(metrics)
                self.checkpointer.check_for_errors()  # a failed background save stops now
                # One snapshot per step: a signal arriving later in this step is acted on
                # after the next step (save first, then stop), never half-way. Nothing is
                # written once the workdir may be another run's.
                stopping = self.still_ours()
                last = step == total
                do_eval = config.eval_batches > 0 and (
                    last or _every(config.eval_every_steps, step)
                )
                do_log = do_eval or last or step == 1 or _every(config.log_every_steps, step)
                do_save = last or stopping or _every(config.checkpoint_every_steps, step)
                if do_log:
                    last_record = self.log(step, state, metrics, do_eval, writer)
                if do_save:
                    self.save(step, state)
                if do_log or do_save:
                    self.timer.restart()
                if stopping and not last:
                    status = "interrupted"
                    logging.warning("stopped by %s after step %d", self.stop.requested, step)
                    break
            self.gate.check()
        result = {"status": status, "step": int(jax.device_get(state.step)), "final": last_record}
        if status == "interrupted":
            result["signal"] = self.stop.requested
        return result

    def log(
        self,
        step: int,
        state: TrainState,
        metrics: dict[str, jax.Array],
        do_eval: bool,
        writer: MetricsWriter,
    ) -> dict[str, Any]:
        """Write step ``step``'s record (metrics, timing, evaluation); returns it."""
        record: dict[str, Any] = {k: float(v) for k, v in jax.device_get(metrics).items()}
        timing = self.timer.read()
        self.gate.check()
        record.update(timing)
        if do_eval:
            record.update(self.evaluate(state.params))
        writer.write(step, record)
        return record

    def save(self, step: int, state: TrainState) -> None:
        """Checkpoint ``step`` unless it is saved already; never a state that failed the gate."""
        if self.last_saved == step:
            return
        self.gate.check()
        tree = checkpoint_tree(state, self.rng)
        self.checkpointer.save(step, tree, self.run.bundle.train.get_state(), self.settings)
        self.last_saved = step

    def still_ours(self) -> bool:
        """Whether any process was asked to stop; raises on every process when process 0
        lost the workdir lock."""
        lost = None
        try:
            if self.lock is not None:
                self.lock.verify()
        except workdir_lib.WorkdirLockLostError as err:
            lost = err
        stopping, lock_lost = any_across_processes(
            self.stop.requested is not None, lost is not None
        )
        if lock_lost:
            raise lost or workdir_lib.WorkdirLockLostError(
                f"process 0 lost the lock of {self.run.workdir} (see its message); stopping."
            )
        return stopping


def _every(interval: int, step: int) -> bool:
    """Whether ``step`` is on a cadence of ``interval`` steps (``0``: never)."""
    return bool(interval) and step % interval == 0


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
