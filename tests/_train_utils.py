"""Helpers for the trainer tests: config files from configs/, metric comparison, trainer
processes."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = ("step_time", "tokens_per_sec")
#: Seconds a trainer subprocess may run before its test fails (a hang fails one test instead
#: of stalling the suite): ``timeout=`` of every ``subprocess.run`` / ``communicate``.
PROCESS_TIMEOUT = 600


def time_limit(seconds: float) -> float:
    """A test's wall-clock limit scaled by ``DSC_TEST_TIME_SCALE`` (default 1; e.g. 3 on a
    loaded machine), so that "exits within seconds" checks do not flake under load."""
    return seconds * float(os.environ.get("DSC_TEST_TIME_SCALE", "1"))


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s ``get_config()`` (what ``--config=configs/<name>.py`` loads;
    with ``arg``: ``get_config(arg)``, what ``--config=configs/<name>.py:<arg>`` loads)."""
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def without_timing(records: list[dict]) -> list[dict]:
    """Metric records minus wall-clock measurements (the only values allowed to differ)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    """Equal records (timings aside); the message names the first differing step and keys."""
    got, want = without_timing(got), without_timing(want)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        assert not diff, f"step {a['step']}: {diff}"


def start_process(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``cmd`` run from the repository root, stdout and stderr together as text."""
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def last_step(workdir: str) -> int:
    """The last step in ``workdir/metrics.jsonl`` (0 when absent, empty or mid-write)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
