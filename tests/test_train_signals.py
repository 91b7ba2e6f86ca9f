"""SIGTERM mid-run (a real `python train.py` process): the loop finishes its step, saves a
checkpoint and exits 0; running the same command again resumes, and the metrics equal an
uninterrupted run's. Also: bad flags and configs fail with one clear line, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dsc_jax.train.metrics import read_metrics
from dsc_jax.train.trainer import train_and_evaluate
from tests._train_utils import (
    PROCESS_TIMEOUT,
    REPO,
    assert_same_metrics,
    last_step,
    load_config,
    start_process,
    time_limit,
)

pytestmark = pytest.mark.slow

DECAY = 400  # schedule length, fixed: independent of where the runs stop
COMMON = [
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
    "--config.checkpoint_every_steps=0",
    f"--config.optim.decay_steps={DECAY}",
]


def train_cmd(workdir: str, steps: int, cache: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.num_train_steps={steps}",
        f"--config.compilation_cache_dir={cache}",
        *COMMON,
    ]


def env() -> dict[str, str]:
    # Same numerics as the in-process reference run (conftest sets "highest" via jax.config;
    # XLA_FLAGS with the 8 fake devices is inherited from conftest's os.environ).
    return dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")


def test_sigterm_saves_then_resume_matches_uninterrupted(tmp_path):
    workdir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    proc = start_process(train_cmd(workdir, DECAY, cache), env())
    try:
        deadline = time.time() + time_limit(240)
        while last_step(workdir) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=time_limit(120))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output and "interrupted at step" in output, output
    saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
    assert len(saved) == 1 and 3 <= saved[0] < DECAY
    stopped = saved[0]
    assert last_step(workdir) == stopped  # no step after the checkpoint was logged

    total = stopped + 3
    resumed = subprocess.run(
        train_cmd(workdir, total, cache),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {workdir} from checkpoint step {stopped}" in resumed.stderr

    reference = load_config("tiny")
    reference.num_train_steps = total
    reference.log_every_steps = 1
    reference.eval_every_steps = 0
    reference.checkpoint_every_steps = 0
    reference.optim.decay_steps = DECAY
    reference.compilation_cache_dir = cache
    train_and_evaluate(reference, str(tmp_path / "reference"))
    got = read_metrics(workdir)
    assert [r["step"] for r in got] == list(range(1, total + 1))
    assert_same_metrics(got, read_metrics(str(tmp_path / "reference")))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.bank_projection=foo", "config.bank_projection='foo' is not allowed"),
        ("--config.no_such_key=1", "bad --config override"),
    ],
)
def test_bad_config_fails_with_one_clear_line(tmp_path, override, message):
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", override],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert result.returncode != 0
    assert "dsc-train: error:" in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))  # before any compute


def test_paper_config_without_wikitext_fails_clearly(tmp_path, shared_data):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/paper_dsc.py",
            f"--workdir={tmp_path / 'run'}",
            f"--config.data.gpt2_bpe_dir={shared_data / 'gpt2'}",
            f"--config.data.wikitext_dir={tmp_path / 'no_wikitext'}",
            "--config.data.wikitext_download=False",
            f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
            f"--config.data.cache_dir={tmp_path / 'tokens'}",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert result.returncode != 0
    assert "dsc-train: error: data setup failed" in result.stderr, result.stderr
    assert "WikiText-103" in result.stderr and "Traceback" not in result.stderr
