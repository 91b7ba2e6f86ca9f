"""Batch iterators over a 1-D token array: random training windows and fixed eval windows.

Training is stateless per step: the global batch at step ``s`` draws its ``B`` window starts
from ``np.random.default_rng([seed, s])``, uniformly over every start that fits a window of
``T + 1`` tokens; process ``p`` of ``P`` keeps rows ``[p * B / P, (p + 1) * B / P)``. So the
rows of all processes are disjoint and together form the global batch, and resuming at step
``s`` reproduces the exact next batch whatever happened before (or the process count).
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATE_KIND = "dsc_jax.random_windows.v1"


def check_process_split(
    global_batch_size: int, process_index: int, process_count: int, what: str = "batch"
) -> int:
    """Rows per process; raise unless ``global_batch_size % process_count == 0``."""
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count={process_count!r} is invalid; expected an integer >= 1.")
    if (
        isinstance(process_index, bool)
        or not isinstance(process_index, int)
        or not 0 <= process_index < process_count
    ):
        raise ValueError(
            f"process_index={process_index!r} is invalid; expected 0 <= index < {process_count}."
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"{what} size {global_batch_size} is not divisible by process_count "
            f"{process_count}; every process needs the same number of rows."
        )
    return global_batch_size // process_count


def gather_windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """``[len(starts), length]`` int32 windows ``tokens[s : s + length]``."""
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)
    return np.asarray(tokens[index], dtype=np.int32)


class TrainIterator:
    """Infinite iterator of ``np.int32 [B // P, T + 1]`` random windows (see module doc)."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        step: int = 0,
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = check_process_split(global_batch_size, process_index, process_count)
        self.num_starts = len(tokens) - seq_len  # starts 0 .. N - (T + 1)
        if self.num_starts < 1:
            raise ValueError(
                f"seq_len={seq_len} needs {seq_len + 1} tokens per window but the training "
                f"corpus has only {len(tokens)} tokens; lower seq_len or give more text."
            )
        self.step = step

    def global_starts(self, step: int) -> np.ndarray:
        """``[B]`` int64 window starts of the global batch at ``step``."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.num_starts, size=self.global_batch_size, dtype=np.int64)

    def batch_at(self, step: int) -> np.ndarray:
        """This process's ``[B // P, T + 1]`` int32 rows of the batch at ``step``."""
        b = self.local_batch_size
        starts = self.global_starts(step)[self.process_index * b : (self.process_index + 1) * b]
        return gather_windows(self.tokens, starts, self.seq_len + 1)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> np.ndarray:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch is ``batch_at(state["step"])``."""
        return {
            "kind": STATE_KIND,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "num_tokens": len(self.tokens),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume so that the next batch is the one after the batch that produced ``state``.

        Raises:
          ValueError: ``state`` lacks a valid ``step``, or was made with another seed,
            sequence length, global batch size or corpus (the batches would differ).
        """
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"data iterator state {state!r} has no valid 'step' (int >= 0).")
        mine = self.get_state()
        for key in ("kind", "seed", "seq_len", "global_batch_size", "num_tokens"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"data iterator state has {key}={state[key]!r} but this iterator has "
                    f"{key}={mine[key]!r}; resuming would not reproduce the same batches."
                )
        self.step = step


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
    """How many windows of ``T + 1`` tokens at stride ``T`` fit in ``num_tokens``."""
    return max(0, (num_tokens - 1) // seq_len)


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    num_batches: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[np.ndarray]:
    """Fixed validation batches: ``num_batches`` arrays ``np.int32 [batch_size // P, T + 1]``.

    Window ``w`` (global, ``0 <= w < num_batches * batch_size``) is
    ``tokens[w * T : w * T + T + 1]``: consecutive from the start of the tokens, the targets
    of successive windows tile the stream without overlap. Batch ``j`` holds windows
    ``j * batch_size ...``; process ``p`` keeps its ``batch_size // P`` rows of each.

    Raises:
      ValueError: bad sizes, ``batch_size % P != 0``, or too few validation tokens.
    """
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"eval_batches: {name}={value!r} is invalid; expected an int >= 1.")
    local = check_process_split(batch_size, process_index, process_count, "eval batch")
    needed = num_batches * batch_size
    available = num_eval_windows(len(tokens), seq_len)
    if needed > available:
        raise ValueError(
            f"eval_batches: {num_batches} batches x {batch_size} windows of {seq_len + 1} tokens "
            f"need {needed * seq_len + 1} validation tokens but there are {len(tokens)} "
            f"({available} windows); ask for fewer batches or give more validation text."
        )
    out = []
    for j in range(num_batches):
        first = j * batch_size + process_index * local
        starts = (first + np.arange(local, dtype=np.int64)) * seq_len
        out.append(gather_windows(tokens, starts, seq_len + 1))
    return out
