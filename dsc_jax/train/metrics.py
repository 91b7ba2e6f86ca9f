"""Metrics output: ``WORKDIR/metrics.jsonl``, TensorBoard event files, one console line.

Only the writer of process 0 writes (``enabled=False`` elsewhere makes every method a no-op).
``metrics.jsonl`` holds one JSON object per logged step: ``{"step": s, "<name>": value, ...}``
with float values (``null`` for values that could not be measured). On resume,
:meth:`MetricsWriter.truncate_after` drops records after the restored step so that a resumed
run's file equals an uninterrupted run's (TensorBoard gets ``purge_step`` for the same).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _format_duration(seconds: float) -> str:
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
        parts.append(f"ETA {_format_duration((total_steps - step) * step_time)}")
    add("eval_loss", "eval_loss", ".4f")
    add("eval_ppl", "eval_ppl", ".2f")
    return " | ".join(parts)


class MetricsWriter:
    """Writes logged steps to ``metrics.jsonl``, TensorBoard and the console.

    Args:
      workdir: the run folder (absolute).
      total_steps: ``num_train_steps`` (for the console progress and ETA).
      enabled: whether this process writes (process 0 only).
      resume_step: the step training resumes from (0 for a fresh run); later records in an
        existing ``metrics.jsonl`` are dropped and TensorBoard purges later events.
    """

    def __init__(
        self, workdir: str, *, total_steps: int, enabled: bool = True, resume_step: int = 0
    ) -> None:
        self.path = os.path.join(workdir, METRICS_FILE)
        self.total_steps = total_steps
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.truncate_after(resume_step)
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

        self._tb = SummaryWriter(
            os.path.join(workdir, TENSORBOARD_DIR), purge_step=resume_step + 1, flush_secs=30
        )

    def truncate_after(self, step: int) -> None:
        """Keep only the records with ``record["step"] <= step`` (atomic rewrite)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(record, dict) and record.get("step", math.inf) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record (``step`` first), add TensorBoard scalars, log a console line."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_json_value(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, float | int):
                self._tb.add_scalar(key, value, global_step=step)
        logging.info("%s", console_line(step, self.total_steps, record))

    def flush(self) -> None:
        """Flush TensorBoard events."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``WORKDIR/metrics.jsonl`` (for analysis and tests)."""
    path = os.path.join(workdir, METRICS_FILE)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
