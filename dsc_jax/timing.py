"""Latency timing: warm-up rounds, blocked calls, interleaved rounds, median and IQR.

One protocol for every latency this repository reports (the benchmarks in ``benchmarks/`` and
the eval-forward latency of the ``dsc-compare`` report): each runner is a compiled,
no-argument function; every round calls every runner once, waiting for its result with
``jax.block_until_ready``; the first ``warmup`` rounds are discarded. Runners are grouped in
blocks (e.g. a layer's passes next to its GEMM-equivalent's, so each pair is measured under the
same machine load); the first block of a round is one later than in the previous round and odd
rounds run each block back to front, so neither position nor order favours anyone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from dsc_jax._checks import check_positive_int

__all__ = ["Latency", "summarize", "time_round_robin"]

K = TypeVar("K", bound=Hashable)


def time_round_robin(
    runners: Mapping[K, Callable[[], Any]],
    blocks: Sequence[Sequence[K]] | None = None,
    iters: int = 30,
    warmup: int = 3,
    log: Callable[[str], None] | None = print,
) -> dict[K, list[float]]:
    """Milliseconds of ``iters`` blocked calls of every runner, interleaved round-robin.

    Args:
      runners: ``{key: fn}``, each ``fn()`` a compiled call returning arrays (or a pytree).
      blocks: groups of keys timed next to each other; default one block per runner, in
        ``runners``' order. Every key of every block must be in ``runners``.
      iters: timed rounds (>= 1).
      warmup: rounds run first and discarded (>= 0).
      log: called with a progress line after every round (``None``: silent).

    Returns:
      ``samples[key][i]``: the milliseconds of ``key``'s call in timed round ``i``.
    """
    check_positive_int("time_round_robin", "iters", iters)
    check_positive_int("time_round_robin", "warmup", warmup, minimum=0)
    blocks = [[key] for key in runners] if blocks is None else [list(b) for b in blocks]
    missing = [key for block in blocks for key in block if key not in runners]
    if missing or not blocks:
        raise ValueError(
            f"time_round_robin: blocks name keys {missing!r} that are not runners "
            f"(runners: {list(runners)!r}); expected at least one block of runner keys."
        )
    samples: dict[K, list[float]] = {key: [] for block in blocks for key in block}
    start_all = time.perf_counter()
    for rep in range(warmup + iters):
        if rep and log is not None:
            log(f"  round {rep}/{warmup + iters} done ({time.perf_counter() - start_all:.0f} s)")
        shift = rep % len(blocks)
        for block in [*blocks[shift:], *blocks[:shift]]:
            for key in block if rep % 2 == 0 else reversed(block):
                run = runners[key]
                start = time.perf_counter()
                jax.block_until_ready(run())
                elapsed_ms = (time.perf_counter() - start) * 1e3
                if rep >= warmup:
                    samples[key].append(elapsed_ms)
    return samples


@dataclasses.dataclass(frozen=True)
class Latency:
    """Median and interquartile range of one runner's samples, in milliseconds."""

    ms: float
    q1: float
    q3: float
    rounds: int


def summarize(samples: Sequence[float]) -> Latency:
    """Median, first and third quartile (linear interpolation) of ``samples`` (ms)."""
    if len(samples) == 0:
        raise ValueError("summarize: no samples; expected at least one timed round.")
    q1, median, q3 = np.percentile(np.asarray(samples, np.float64), [25, 50, 75])
    return Latency(ms=float(median), q1=float(q1), q3=float(q3), rounds=len(samples))
