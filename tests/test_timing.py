"""dsc_jax.timing: the one latency protocol of the benchmarks and the dsc-compare report."""

from __future__ import annotations

import numpy as np
import pytest

from dsc_jax import timing


def test_rounds_warmup_order_and_blocking():
    calls: list[str] = []

    def runner(name: str):
        def run():
            calls.append(name)
            return np.zeros(())

        return run

    runners = {key: runner(key) for key in "abc"}
    samples = timing.time_round_robin(runners, [["a", "b"], ["c"]], iters=3, warmup=2, log=None)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(ms >= 0 for v in samples.values() for ms in v)
    # 5 rounds; the first block rotates every round and odd rounds run blocks back to front.
    assert calls == [*"abc", *"cba", *"abc", *"cba", *"abc"]


def test_default_blocks_are_one_per_runner_and_progress_is_logged():
    lines: list[str] = []
    runners = {"x": lambda: np.ones(()), "y": lambda: np.ones(())}
    samples = timing.time_round_robin(runners, iters=2, warmup=0, log=lines.append)
    assert set(samples) == {"x", "y"} and all(len(v) == 2 for v in samples.values())
    assert len(lines) == 1 and "round 1/2" in lines[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iters": 0}, "iters=0"),
        ({"warmup": -1}, "warmup=-1"),
        ({"blocks": [["nope"]]}, "'nope'"),
        ({"blocks": []}, "at least one block"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timing.time_round_robin({"x": lambda: None}, **kwargs)


def test_summarize_is_median_and_quartiles():
    lat = timing.summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert (lat.ms, lat.q1, lat.q3, lat.rounds) == (3.0, 2.0, 4.0, 5)
    with pytest.raises(ValueError, match="no samples"):
        timing.summarize([])
