"""Stop signals (SIGINT, SIGTERM) from a command's first line to the run's last step.

Three phases, and in every one a second signal ends the process at once (status
128 + signal number) without saving:

1. **Imports** (:func:`exit_on_stop_signals`, entered by the command-line tools before
   anything heavy is imported): nothing has been done yet, so a signal prints one line and
   ends the process. The handler never raises: a ``KeyboardInterrupt`` raised inside an
   import or a callback from C++ code (JAX, TensorStore) is swallowed there (the run would
   go on) or ends in a traceback.
2. **Start-up** (:class:`StopFlag` with ``interrupt=True``): the signal is recorded (one
   warning line) and :meth:`StopFlag.check`, called between start-up phases, raises
   :class:`Interrupted` (nothing to save yet; never lost).
3. **Training** (after :meth:`StopFlag.start_training`): ``flag.requested`` is set; the loop
   saves a checkpoint after the current step, then stops.

One watchdog (:func:`start_watchdog`) ends the process from a daemon thread when the main
thread cannot: on the second signal, seen through :func:`signal.set_wakeup_fd` while the main
thread is blocked in a device computation, an XLA compilation or a checkpoint wait (Python
runs signal handlers only in the main thread, between bytecodes), and after a fatal error
(:func:`exit_soon`) when a non-daemon library thread would keep the process alive.

Only the standard library is imported here (JAX inside :func:`any_across_processes`), so the
command-line tools can install the first phase before importing JAX.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)


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


def exit_now(status: int, message: str = "") -> NoReturn:
    """End the process immediately with ``status`` after writing ``message`` to stderr (no
    cleanup: the kernel drops the workdir lock, and an unfinished checkpoint stays a
    temporary folder that the next run removes)."""
    if message:
        with contextlib.suppress(OSError):
            os.write(2, message.encode())
    os._exit(status)


def start_watchdog(name: str, wait: Callable[[], tuple[int, str] | None]) -> threading.Thread:
    """Run ``wait()`` in a daemon thread; when it returns ``(status, message)``, end the
    process with :func:`exit_now` (``None``: the watchdog is no longer needed)."""

    def watch() -> None:
        verdict = wait()
        if verdict is not None:
            exit_now(*verdict)

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    return thread


def exit_soon(status: int, grace_s: float = 10.0) -> None:
    """Make sure the process ends ``grace_s`` after a fatal error even if a non-daemon
    library thread (e.g. one of a failed asynchronous checkpoint save) never finishes."""

    def wait() -> tuple[int, str]:
        time.sleep(grace_s)
        with contextlib.suppress(Exception):
            sys.stderr.flush()  # the error message printed meanwhile
        return status, ""

    start_watchdog("dsc-exit-watchdog", wait)


def _second_signal_message(signum: int) -> str:
    name = signal.Signals(signum).name
    return f"\n{name} received again: stopping now without saving.\n"


@contextlib.contextmanager
def exit_on_stop_signals(line: str) -> Iterator[None]:
    """Phase 1: inside the block, SIGINT/SIGTERM print ``line`` (``{signal}`` is replaced by
    the signal's name) and end the process with status 128 + signal number. The signals are
    unblocked (``train.py`` blocks them before its imports); handlers and mask are restored
    afterwards. A no-op outside the main thread."""

    def handler(signum: int, frame: Any) -> None:
        del frame
        exit_now(128 + signum, "\n" + line.format(signal=signal.Signals(signum).name) + "\n")

    try:
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, old in previous.items():
            signal.signal(sig, old)


def any_across_processes(*local_flags: bool) -> tuple[bool, ...]:
    """For each flag: whether any process has it (one all-gather for all, multi-host only).
    A stop must be collective: every process has to join the same checkpoint save."""
    import jax

    if jax.process_count() == 1:
        return tuple(bool(f) for f in local_flags)
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(local_flags, np.int32))
    return tuple(bool(f) for f in np.any(np.reshape(flags, (-1, len(local_flags))), axis=0))


class StopFlag:
    """Phases 2 and 3: what SIGTERM/SIGINT do from start-up to the last step (see the module
    docstring); a second signal always ends the process at once with status
    128 + signal number, without saving.

    Entering the flag installs its handlers and unblocks its signals; leaving it restores the
    previous handlers and mask. A no-op outside the main thread.

    Args:
      signals: the signals it handles.
      interrupt: start in the start-up phase (:meth:`check` raises :class:`Interrupted`).
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, *, interrupt: bool = False) -> None:
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
            exit_now(128 + signum, _second_signal_message(signum))
        self.requested = signal.Signals(signum).name
        self._signum = signum
        if self._interrupt:
            logger.warning(
                "%s received during start-up: stopping when the current start-up step ends "
                "(send it again to stop at once)",
                self.requested,
            )
            return
        logger.warning(
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
        if any_across_processes(self._signum is not None)[0]:
            raise Interrupted(self._signum if self._signum is not None else signal.SIGTERM)

    def start_training(self) -> None:
        """Leave start-up: raise a pending start-up signal, then save-then-stop on signals."""
        self.check()
        self._interrupt = False

    def _wait_for_second_signal(self, read_fd: int) -> tuple[int, str] | None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return None
            if not data:  # write end closed: __exit__
                return None
            for signum in data:
                if signum in self._signals:
                    self._count += 1
                    if self._count >= 2:
                        return 128 + signum, _second_signal_message(signum)

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
        self._watchdog = start_watchdog(
            "dsc-second-signal", lambda: self._wait_for_second_signal(read_fd)
        )
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
