"""Command line: ``dsc-train`` / ``python train.py``.

    dsc-train --config=configs/default.py --workdir=runs/default [--config.key=value ...]

Running again with the same ``--workdir`` resumes from its newest intact checkpoint.
Every ``--config.KEY=VALUE`` must take effect: an unknown key, a bad value, or a key the run
does not read (e.g. ``--config.model.moe.top_k`` while ``model.ffn`` is ``dsc``; see
:func:`dsc_jax.train.config.unread_settings`) is refused. Configuration, data-setup and
storage errors (a config file that does not load, a locked or unwritable workdir, unreadable
or unwritable checkpoints, any file of the run that cannot be written) are printed as one
clear message (no traceback) with exit status 1; the process then exits within seconds even
if a library thread is stuck. Ctrl-C exits with status 130 and one line: during start-up when
the current start-up phase ends, during training after saving a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from dsc_jax._compat import ignore_unawaited_coroutines
from dsc_jax._logging import QuietLibraries
from dsc_jax.console import TRAIN_INTERRUPT
from dsc_jax.train.preemption import Interrupted, StopFlag, exit_on_stop_signals, exit_soon

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define ``--config`` (an ml_collections config file) and ``--workdir`` (idempotent)."""
    if "config" not in flag_values:
        config_flags.DEFINE_config_file(
            "config",
            None,
            "Training config file (e.g. configs/default.py); override fields with "
            "--config.key=value.",
            flag_values=flag_values,
            lock_config=True,
        )
    if "workdir" not in flag_values:
        flags.DEFINE_string(
            "workdir",
            None,
            "Run folder for checkpoints and metrics; an existing run resumes.",
            flag_values=flag_values,
        )
    if "coordinator_address" not in flag_values:  # multi-process runs (dsc_jax.sharding)
        flags.DEFINE_string(
            "coordinator_address",
            None,
            "host:port of process 0 for jax.distributed (omit on TPU pods, Slurm, Open MPI).",
            flag_values=flag_values,
        )
        flags.DEFINE_integer(
            "num_processes",
            None,
            "Number of processes (jax.distributed).",
            flag_values=flag_values,
        )
        flags.DEFINE_integer(
            "process_id",
            None,
            "This process's index, 0..num_processes-1.",
            flag_values=flag_values,
        )


def check_overrides(config: Any, overrides: Mapping[str, Any]) -> None:
    """Refuse ``--config.KEY=VALUE`` overrides that the run does not read.

    A config file may hold settings of another FFN kind or data source (switching
    ``model.ffn`` keeps the file's other groups; the trainer logs those); a key given on the
    command line is meant to take effect, so one the run would ignore is an error.

    Raises:
      ValueError: naming every such key and why the run does not read it.
    """
    from dsc_jax.train.config import unread_reason, unread_settings

    unread = unread_settings(config)
    ignored = [
        f"--config.{key}={value!r} ({reason})"
        for key, value in overrides.items()
        if (reason := unread_reason(key, unread)) is not None
    ]
    if ignored:
        raise ValueError(
            f"this run does not read {'; '.join(ignored)}; drop the override or change the "
            "setting it depends on."
        )


def _loaded_config(flag_values: flags.FlagValues) -> Any:
    try:
        config = flag_values.config
        config.keys()  # a config file that failed to load raises on first use
    except (OSError, ImportError, SyntaxError, AttributeError) as err:
        sys.exit(f"dsc-train: error: cannot load --config: {err}")
    return config


def load_config(flag_values: flags.FlagValues = FLAGS) -> Any:
    """The ``--config`` file with its overrides, validated (:func:`validate_config`) and
    checked (:func:`check_overrides`): the config :func:`train_and_evaluate` gets.

    Raises:
      SystemExit: the config file cannot be loaded.
      ValueError: a bad value, or an override the run does not read.
    """
    from dsc_jax.train.config import validate_config

    config = _loaded_config(flag_values)
    validate_config(config)
    check_overrides(config, config_flags.get_override_values(flag_values["config"]))
    return config


def main(argv: Sequence[str]) -> None:
    """absl entry point: validate the config, then train and evaluate."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS["config"].value is None and not FLAGS["config"].present:
        raise app.UsageError("--config is required (e.g. --config=configs/default.py).")
    _loaded_config(FLAGS)
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (e.g. --workdir=runs/default).")
    # Imported here so that `--help` and flag errors need no JAX start-up.
    from dsc_jax._compat import quiet_closed_event_loop_errors
    from dsc_jax.distributed import initialize_distributed
    from dsc_jax.train.trainer import train_and_evaluate

    quiet_closed_event_loop_errors()
    with _one_line_errors(), StopFlag(interrupt=True) as early:  # until the trainer's own
        config = load_config()
        # Before any JAX computation: multi-process runtime (auto-detected or from flags).
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        early.check()
        result = train_and_evaluate(config, FLAGS.workdir)
    logging.info("%s at step %d", result["status"], result["step"])
    if result.get("signal") == "SIGINT":  # Ctrl-C: saved, then the shell's status for it
        print(
            f"dsc-train: stopped by SIGINT after step {result['step']} (checkpoint saved); run "
            "the same command to resume.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + signal.SIGINT)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's to fix: one line, exit status 1."""
    from dsc_jax._storage import StorageError
    from dsc_jax.train.checkpointing import CheckpointWriteError, UnreadableCheckpointsError
    from dsc_jax.train.numerics import NonFiniteLossError
    from dsc_jax.train.run import DataSetupError
    from dsc_jax.train.workdir import WorkdirError

    return (
        ValueError,  # bad config, changed settings on resume, incompatible checkpoint
        ImportError,  # optional dependency
        DataSetupError,
        NonFiniteLossError,
        WorkdirError,  # locked by another run, not writable, an earlier run's record
        StorageError,  # any file the run writes: disk full, read-only mount, quota
        UnreadableCheckpointsError,
        CheckpointWriteError,  # disk full, read-only mount, quota
    )


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Every error the user can act on, and a start-up signal, as one line and an exit."""
    from dsc_jax._storage import error_line

    try:
        yield
    except _user_errors() as err:
        _fail(str(err))
    except OSError as err:  # a storage error no layer named: still one line
        _fail(error_line(err))
    except Interrupted as err:
        exit_soon(err.exit_status)
        print(
            f"dsc-train: {err.signal_name} received before training started: stopped, nothing "
            "was trained (run the same command to start again).",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(err.exit_status)


def _fail(message: str) -> None:
    """One clear message and exit status 1; the traceback only with --verbosity=1."""
    logging.debug("traceback of the error below", exc_info=True)
    exit_soon(1)
    sys.exit(f"dsc-train: error: {message}\n(run with --verbosity=1 for the traceback)")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """absl flag parsing, with a config file that does not load (syntax error, an exception
    in ``get_config``) and bad ``--config.key=value`` overrides (unknown key, wrong type)
    reported as one line instead of a traceback, and a flag given twice refused (absl would
    keep the last)."""
    names = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-") and arg != "--"]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        sys.exit(f"dsc-train: error: {', '.join(twice)} given twice; give each once.")
    try:
        return flag_values(argv)
    except flags.Error as err:
        sys.exit(f"dsc-train: error: {err}\nPass --helpfull to see the flags.")
    except Exception as err:
        config_error = config_file_error(err, argv)
        if config_error is not None:
            sys.exit(f"dsc-train: error: {config_error}")
        if isinstance(err, AttributeError | KeyError | TypeError | ValueError):
            sys.exit(f"dsc-train: error: bad --config override: {type(err).__name__}: {err}")
        raise


def _config_path(argv: Sequence[str]) -> str | None:
    """The file of ``--config=FILE[:ARGS]`` (or ``--config FILE``) in ``argv``."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        return value.split(":", 1)[0]
    return None


def config_file_error(err: BaseException, argv: Sequence[str]) -> str | None:
    """``"cannot load --config FILE, line N: ..."`` when ``err`` comes from the config file
    itself (a syntax error, or an exception its code raised); ``None`` otherwise."""
    path = _config_path(argv)
    if path is None:
        return None
    target = os.path.abspath(path)
    if isinstance(err, SyntaxError) and err.filename and os.path.abspath(err.filename) == target:
        text = f": {err.text.strip()}" if err.text and err.text.strip() else ""
        return f"cannot load --config {path}, line {err.lineno}: {err.msg}{text}"
    frames = [
        frame
        for frame in traceback.extract_tb(err.__traceback__)
        if os.path.abspath(frame.filename) == target
    ]
    if not frames:
        return None
    return f"cannot load --config {path}, line {frames[-1].lineno}: {type(err).__name__}: {err}"


def block_stop_signals() -> None:
    """Hold SIGINT/SIGTERM until :func:`run` takes them (``train.py`` calls it before its
    first import; :func:`run` unblocks them and answers a held signal at once)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def run() -> None:
    """Console-script entry point (``dsc-train``; :func:`dsc_jax.console.train` installs the
    same Ctrl-C handling before this module is imported)."""
    with exit_on_stop_signals(TRAIN_INTERRUPT):  # until the trainer's StopFlag takes over
        define_flags()
        ignore_unawaited_coroutines()  # left behind by orbax when a background save fails
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(QuietLibraries())
        try:
            app.run(main, flags_parser=parse_flags)
        except KeyboardInterrupt:  # a library put Python's default handler back
            print(TRAIN_INTERRUPT.format(signal="SIGINT"), file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGINT)
