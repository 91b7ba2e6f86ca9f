"""Metrics output: ``WORKDIR/metrics.jsonl``, TensorBoard event files, one console line.

Only the writer of process 0 writes (``enabled=False`` elsewhere makes every method a no-op).
``metrics.jsonl`` holds one JSON object per logged step: ``{"step": s, "<name>": value, ...}``
with float values (``null`` for values that could not be measured). On resume,
:meth:`MetricsWriter.truncate_after` drops records after the restored step so that a resumed
run's file equals an uninterrupted run's (TensorBoard gets ``purge_step`` for the same, in a
new events file). Every write happens in the calling thread, and a failed one raises
:class:`~dsc_jax._storage.StorageError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

from dsc_jax._storage import storage_errors, write_atomically
from dsc_jax.run_folder import METRICS_FILE, TENSORBOARD_DIR


def format_duration(seconds: float) -> str:
    """``"1h05m"``, ``"3m07s"``, ``"42s"``: a duration rounded to the second, for logs."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _to_json_value(value: Any) -> float | int | str | None:
    if value is None or isinstance(value, str | int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def console_line(step: int, total_steps: int, record: Mapping[str, Any]) -> str:
    """One human-readable progress line (loss, lr, grad norm, throughput, ETA, eval)."""
    parts = [f"step {step}/{total_steps}"]

    def add(label: str, key: str, fmt: str) -> None:
        value = record.get(key)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")

    add("loss", "train_loss", ".4f")
    add("ce", "train_ce", ".4f")
    add("lr", "lr", ".2e")
    add("gnorm", "grad_norm", ".3f")
    tokens_per_sec = record.get("tokens_per_sec")
    if tokens_per_sec is not None:
        parts.append(f"{tokens_per_sec / 1e3:.1f}k tok/s")
    step_time = record.get("step_time")
    if step_time is not None:
        parts.append(f"{step_time * 1e3:.0f} ms/step")
        parts.append(f"ETA {format_duration((total_steps - step) * step_time)}")
    add("eval_loss", "eval_loss", ".4f")
    add("eval_ppl", "eval_ppl", ".2f")
    return " | ".join(parts)


RESUME_HINT = "free space or fix the storage, then run the same command again to resume"


class _EventsFile:
    """TensorBoard scalars in a new ``events.out.tfevents.*`` file, written in the calling
    thread (tensorboardX's record format, without its writer thread, whose write errors
    would be lost in that thread and then block the training loop on a full queue). Errors
    raise :class:`~dsc_jax._storage.StorageError` naming the file."""

    def __init__(self, folder: str, purge_step: int, flush_secs: float = 30.0) -> None:
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        self._flush_secs = flush_secs
        self._next_flush = time.monotonic() + flush_secs
        with storage_errors(folder, "create the TensorBoard folder", RESUME_HINT):
            os.makedirs(folder, exist_ok=True)
        base = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        with storage_errors(folder, "create a TensorBoard file in", RESUME_HINT):
            for suffix in range(1000):  # never reuse (truncate) an earlier run's file
                self.path = os.path.join(folder, base + (f".{suffix}" if suffix else ""))
                try:
                    self._file = open(self.path, "xb")  # noqa: SIM115 - closed in close()
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover - a thousand files in one second
                raise FileExistsError(errno.EEXIST, "too many TensorBoard files", folder)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        # What SummaryWriter(purge_step=) writes: TensorBoard hides events >= purge_step.
        self._write(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
        start = SessionLog(status=SessionLog.START)
        self._write(Event(step=purge_step, wall_time=time.time(), session_log=start))
        self.flush()

    def _write(self, event: Any) -> None:
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("Q", len(data))
        record = (
            header
            + struct.pack("I", masked_crc32c(header))
            + data
            + struct.pack("I", masked_crc32c(data))
        )
        with storage_errors(self.path, "write", RESUME_HINT):
            self._file.write(record)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event per scalar at ``step``; flushed every ``flush_secs``."""
        from tensorboardX.summary import scalar

        now = time.time()
        for key, value in values.items():
            self._write(self._event(summary=scalar(key, value), step=int(step), wall_time=now))
        if time.monotonic() >= self._next_flush:
            self.flush()

    def flush(self) -> None:
        """Write buffered events to the file and to disk."""
        with storage_errors(self.path, "write", RESUME_HINT):
            self._file.flush()
            os.fsync(self._file.fileno())
        self._next_flush = time.monotonic() + self._flush_secs

    def close(self) -> None:
        """Flush and close (the file is closed even when the flush fails)."""
        try:
            self.flush()
        finally:
            with contextlib.suppress(OSError):
                self._file.close()


class MetricsWriter:
    """Writes logged steps to ``metrics.jsonl``, TensorBoard and the console.

    Args:
      workdir: the run folder (absolute).
      total_steps: ``num_train_steps`` (for the console progress and ETA).
      enabled: whether this process writes (process 0 only).
      resume_step: the step training resumes from (0 for a fresh run); later records in an
        existing ``metrics.jsonl`` are dropped and TensorBoard hides later events.

    Raises:
      StorageError: (here and from every method) a file could not be written, naming it and
        the OS reason.
    """

    def __init__(
        self, workdir: str, *, total_steps: int, enabled: bool = True, resume_step: int = 0
    ) -> None:
        self.path = os.path.join(workdir, METRICS_FILE)
        self.total_steps = total_steps
        self.enabled = enabled
        self._tb: _EventsFile | None = None
        if not enabled:
            return
        with storage_errors(workdir, "create the workdir", RESUME_HINT):
            os.makedirs(workdir, exist_ok=True)
        self.truncate_after(resume_step)
        self._tb = _EventsFile(os.path.join(workdir, TENSORBOARD_DIR), purge_step=resume_step + 1)

    def truncate_after(self, step: int) -> None:
        """Keep only the records with ``record["step"] <= step`` (atomic rewrite)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with storage_errors(self.path, "read", RESUME_HINT), open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(record, dict) and record.get("step", math.inf) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        write_atomically(self.path, "".join(kept))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record (``step`` first), add TensorBoard scalars, log a console line."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_json_value(v) for k, v in metrics.items()})
        with storage_errors(self.path, "write", RESUME_HINT), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.scalars(
                step,
                {k: v for k, v in record.items() if k != "step" and isinstance(v, float | int)},
            )
        logging.info("%s", console_line(step, self.total_steps, record))

    def flush(self) -> None:
        """Flush TensorBoard events."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard (idempotent)."""
        if self._tb is not None:
            tb, self._tb = self._tb, None
            tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``WORKDIR/metrics.jsonl`` (for analysis and tests); a line cut by a
    crash or a full disk is skipped."""
    path = os.path.join(workdir, METRICS_FILE)
    records = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


class StepTimer:
    """Step time and throughput over the steps since the last log or save; the first step of
    a run (compilation) is excluded."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.start: float | None = None
        self.steps = 0

    def stepped(self, metrics: Any) -> None:
        """Count one step (the first one: wait for its ``metrics``, then start the clock)."""
        if self.start is None:  # first step of this run: wait for it, then start timing
            import jax  # only here: reading metrics files needs no JAX

            jax.block_until_ready(metrics)
            self.restart()
        else:
            self.steps += 1

    def restart(self) -> None:
        """Start a new interval (after a log or a save, whose time is not a step's)."""
        self.start, self.steps = time.perf_counter(), 0

    def read(self) -> dict[str, float | None]:
        """``{"step_time", "tokens_per_sec"}`` (``None`` when no step was timed)."""
        elapsed = time.perf_counter() - self.start
        if not self.steps:
            return {"step_time": None, "tokens_per_sec": None}
        return {
            "step_time": elapsed / self.steps,
            "tokens_per_sec": self.tokens_per_step * self.steps / elapsed,
        }
