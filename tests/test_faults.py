"""Fault injection: what a run survives, and how it fails when it cannot go on.

Real processes where it matters (``kill -9`` at random moments, many during asynchronous
saves; storage that turns unwritable mid-run; two runs on one workdir; two Ctrl-C while the
main thread is blocked in a device computation), in-process runs elsewhere. Tiny configs, one
shared compilation cache, no XLA optimisation passes (``fast_compiles``; subprocesses get the
same setting through ``JAX_DISABLE_MOST_OPTIMIZATIONS``).
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import pytest

from dsc_jax.train import steps
from dsc_jax.train.checkpointing import CheckpointWriteError, UnreadableCheckpointsError
from dsc_jax.train.metrics import MetricsWriter, read_metrics
from dsc_jax.train.trainer import NonFiniteStateError, train_and_evaluate
from dsc_jax.train.workdir import WorkdirLock, WorkdirLockedError
from tests._train_utils import (
    PROCESS_TIMEOUT,
    REPO,
    assert_same_metrics,
    last_step,
    load_config,
    start_process,
    time_limit,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compiles")]

DECAY = 400  # schedule length, fixed: independent of where the runs stop
SUBPROCESS_FLAGS = [
    "--config=configs/tiny.py",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
    f"--config.optim.decay_steps={DECAY}",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


def tiny(cache_dir: str, num_train_steps: int = 8, checkpoint_every_steps: int = 4):
    config = load_config("tiny")
    config.num_train_steps = num_train_steps
    config.optim.decay_steps = DECAY
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = checkpoint_every_steps
    config.compilation_cache_dir = cache_dir
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> str:
    """A completed 8-step run (checkpoints 4 and 8); tests work on copies."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    train_and_evaluate(tiny(cache_dir), workdir)
    return workdir


def copy_run(source: str, tmp_path) -> str:
    target = str(tmp_path / "run")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def env() -> dict[str, str]:
    return dict(
        os.environ,
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        PYTHONPATH=str(REPO),
    )


def train_cmd(workdir: str, steps_: int, cache: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        f"--workdir={workdir}",
        *SUBPROCESS_FLAGS,
        f"--config.num_train_steps={steps_}",
        f"--config.compilation_cache_dir={cache}",
        *extra,
    ]


def wait_for_step(proc: subprocess.Popen, workdir: str, step: int, timeout: float = 240) -> None:
    deadline = time.time() + time_limit(timeout)
    while last_step(workdir) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and last_step(workdir) >= step, proc.stdout.read()


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=PROCESS_TIMEOUT)[0]


# 1. Every checkpoint unreadable: refuse (nothing moved or rewritten); start_over sets aside.
def test_unreadable_checkpoints_refuse_then_start_over_sets_them_aside(
    finished_run, tmp_path, cache_dir
):
    workdir = copy_run(finished_run, tmp_path)
    for step in (4, 8):
        os.remove(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata"))
    metrics_before = read_metrics(workdir)
    with pytest.raises(UnreadableCheckpointsError, match=r"checkpoints/8.*checkpoints/4"):
        train_and_evaluate(tiny(cache_dir), workdir)
    assert read_metrics(workdir) == metrics_before  # not rewritten by a "fresh run"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    with WorkdirLock(workdir):  # the refusal released the workdir lock
        pass

    config = tiny(cache_dir, num_train_steps=2)
    config.start_over = True
    assert train_and_evaluate(config, workdir)["step"] == 2
    [abandoned] = [n for n in os.listdir(workdir) if n.startswith("abandoned-")]
    old = os.path.join(workdir, abandoned)
    assert sorted(os.listdir(os.path.join(old, "checkpoints"))) == ["4", "8"]
    assert read_metrics(old) == metrics_before
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]


# 2 and 5. A refused resume writes nothing and names every changed key; allowed changes log.
@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("model.d_model", 64, "model.d_model: 32 -> 64"),  # a shape
        ("model.dtype", "bfloat16", "model.dtype: 'float32' -> 'bfloat16'"),
        ("model.dsc.tau", 5.0, "model.dsc.tau: 20.0 -> 5.0"),
        ("model.dsc.top_k", 4, "model.dsc.top_k: 2 -> 4"),
        ("losses.budget", 0.5, "losses.budget:"),
        ("optim.learning_rate", 1e-3, "optim.learning_rate: 0.003 -> 0.001"),
    ],
)
def test_changed_settings_are_refused_before_anything_is_written(
    finished_run, tmp_path, cache_dir, key, value, shown
):
    workdir = copy_run(finished_run, tmp_path)
    config = tiny(cache_dir)
    *groups, field = key.split(".")
    section = config
    for group in groups:
        section = section[group]
    assert field in section, f"{key} is not a key of this config"  # a renamed key must fail
    section[field] = value
    before = {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)}
    with pytest.raises(ValueError, match="cannot resume") as info:
        train_and_evaluate(config, workdir)
    assert shown in str(info.value)
    assert filecmp.cmp(
        os.path.join(workdir, "config.json"), os.path.join(finished_run, "config.json"), False
    )
    after = {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)}
    assert {n: t for n, t in after.items() if n != ".lock"} == {
        n: t for n, t in before.items() if n != ".lock"
    }
    with WorkdirLock(workdir):  # the refusal released the workdir lock
        pass


def test_allowed_changes_resume_and_are_logged(finished_run, tmp_path, cache_dir, caplog):
    workdir = copy_run(finished_run, tmp_path)
    config = tiny(cache_dir, num_train_steps=10, checkpoint_every_steps=5)
    config.log_every_steps = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_and_evaluate(config, workdir)
    assert result["step"] == 10
    assert "num_train_steps: 8 -> 10" in caplog.text
    assert "checkpoint_every_steps: 4 -> 5" in caplog.text
    # 8. A normal resume restores onto the target shardings: no orbax warning.
    assert not [w for w in caught if "Sharding info" in str(w.message)]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["config"]["num_train_steps"] == 10


# 3. Two runs on one workdir: the second exits at once naming the holder; kill -9 leaves no
# stale lock.
def test_second_run_on_a_workdir_exits_at_once_and_kill9_frees_the_lock(tmp_path, cache_dir):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dsc_jax.train.workdir import WorkdirLock; "
            f"WorkdirLock({workdir!r}).acquire(); print('locked', flush=True); time.sleep(300)",
        ],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.time()
        second = subprocess.run(
            train_cmd(workdir, 4, cache_dir),
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
        )
        elapsed = time.time() - started
        assert second.returncode != 0
        assert f"pid {holder.pid}" in second.stderr and "host " in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert not os.path.exists(os.path.join(workdir, "checkpoints"))
        assert elapsed < time_limit(60), elapsed
        print(f"second run on a locked workdir exited after {elapsed:.1f} s (with start-up)")
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
            train_and_evaluate(tiny(cache_dir), workdir)  # in-process too
    finally:
        holder.kill()
        holder.wait(timeout=PROCESS_TIMEOUT)
    with WorkdirLock(workdir):  # not stale after kill -9
        pass


# 4. Storage that turns unwritable mid-run (a real process): one clear error, exit 1, within
# seconds; the last good checkpoint is kept.
def test_unwritable_checkpoint_dir_mid_run_exits_within_seconds(tmp_path, cache_dir):
    workdir = str(tmp_path / "run")
    proc = start_process(
        train_cmd(workdir, DECAY, cache_dir, "--config.checkpoint_every_steps=1"), env()
    )
    try:
        wait_for_step(proc, workdir, 3)
        checkpoints = os.path.join(workdir, "checkpoints")
        os.rename(checkpoints, checkpoints + ".moved")
        with open(checkpoints, "w"):  # a file where the folder was: every write fails
            pass
        started = time.time()
        output, _ = proc.communicate(timeout=time_limit(60))
        elapsed = time.time() - started
    finally:
        output = stop(proc) if proc.poll() is None else output
    assert proc.returncode == 1, output
    assert "dsc-train: error: could not write" in output, output
    assert "Traceback" not in output, output
    assert elapsed < time_limit(30), elapsed
    print(f"exit {elapsed:.1f} s after the checkpoint folder became unwritable\n{output}")
    assert [n for n in os.listdir(checkpoints + ".moved") if n.isdigit()]  # last good one kept


# 4, in-process, every save path: periodic, final and on a signal.
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize(
    ("path", "num_train_steps", "checkpoint_every_steps", "signal_at_5"),
    [("periodic", 12, 4, False), ("final", 6, 0, False), ("signal", 12, 0, True)],
)
def test_failed_save_raises_on_every_path(
    tmp_path, cache_dir, monkeypatch, path, num_train_steps, checkpoint_every_steps, signal_at_5
):
    del path
    workdir = str(tmp_path / "run")
    real_write = MetricsWriter.write

    def write_then_break_storage(self, step, metrics):
        real_write(self, step, metrics)
        if step == 5:
            checkpoints = os.path.join(workdir, "checkpoints")
            os.rename(checkpoints, checkpoints + ".moved")
            with open(checkpoints, "w"):
                pass
            if signal_at_5:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsWriter, "write", write_then_break_storage)
    config = tiny(cache_dir, num_train_steps, checkpoint_every_steps)
    started = time.time()
    with pytest.raises(CheckpointWriteError, match="could not write"):
        train_and_evaluate(config, workdir)
    assert time.time() - started < time_limit(60)
    stuck = [t for t in threading.enumerate() if "Signaling" in type(t).__name__]
    for t in stuck:
        threading.Thread.join(t, timeout=5)  # orbax's join re-raises the save error
    assert not [t for t in stuck if t.is_alive()], "an orbax thread would block the exit"
    with WorkdirLock(workdir):  # released
        pass


# 7. Parameters that turn NaN while the loss stays finite are never saved.
def test_nonfinite_parameters_are_never_saved(tmp_path, cache_dir, monkeypatch):
    real_step = steps.train_step

    def poisoned(state, batch, rng, **kwargs):
        new_state, metrics = real_step(state, batch, rng, **kwargs)
        bad = state.step >= 5  # from step 6 on; the loss (of the old params) stays finite
        leaves, treedef = jax.tree.flatten(new_state.params)
        leaves[0] = jnp.where(bad, jnp.nan, leaves[0])
        new_params = jax.tree.unflatten(treedef, leaves)
        return new_state.replace(params=new_params), metrics

    monkeypatch.setattr(steps, "train_step", poisoned)
    config = tiny(cache_dir, num_train_steps=12, checkpoint_every_steps=4)
    config.log_every_steps = 10
    workdir = str(tmp_path / "run")
    with pytest.raises(NonFiniteStateError, match="at step 6"):
        train_and_evaluate(config, workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


# 9. Two Ctrl-C while the main thread is blocked in a device computation: exit at once.
SLOW_STEP = """
import sys, time
import jax
from dsc_jax.train import steps

real_step = steps.train_step

def slow_step(state, batch, rng, **kwargs):
    # From step 4 on, the jitted step blocks for minutes in a host callback: the main thread
    # waits inside XLA, where Python signal handlers cannot run.
    jax.debug.callback(lambda s: time.sleep(300) if s >= 3 else None, state.step)
    return real_step(state, batch, rng, **kwargs)

steps.train_step = slow_step
from dsc_jax import cli
cli.define_flags()
cli.run()
"""


def test_second_ctrl_c_stops_at_once_even_when_blocked(tmp_path, cache_dir):
    workdir = str(tmp_path / "run")
    script = tmp_path / "slow_train.py"
    script.write_text(textwrap.dedent(SLOW_STEP))
    cmd = train_cmd(workdir, DECAY, cache_dir, "--config.checkpoint_every_steps=0")
    cmd[1] = str(script)
    proc = start_process(cmd, env())
    try:
        wait_for_step(proc, workdir, 3)
        time.sleep(1.0)  # now blocked inside step 4
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        started = time.time()
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=time_limit(20))
        except subprocess.TimeoutExpired:
            pytest.fail("a second SIGINT did not stop the process within 20 s")
        elapsed = time.time() - started
    finally:
        stop(proc)
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "SIGINT received again: stopping now" in output, output
    assert elapsed < time_limit(10), elapsed
    print(f"exit {elapsed:.2f} s after the second SIGINT (main thread blocked in a step)")
    with WorkdirLock(workdir):  # the kernel dropped the lock
        pass


# Survives: kill -9 at random moments (checkpoint every step, asynchronous: most kills land
# during a save); each restart resumes; the metrics equal an uninterrupted run's bit for bit.
def test_kill9_at_random_moments_resumes_bit_identical(tmp_path, cache_dir):
    workdir = str(tmp_path / "run")
    total = 16
    chooser = random.Random(1234)
    flags = ("--config.checkpoint_every_steps=1", "--config.async_checkpointing=True")
    for _ in range(3):
        proc = start_process(train_cmd(workdir, total, cache_dir, *flags), env())
        try:
            wait_for_step(proc, workdir, last_step(workdir) + chooser.randint(1, 3))
            time.sleep(chooser.uniform(0.0, 0.05))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=PROCESS_TIMEOUT)
        finally:
            stop(proc)
    assert last_step(workdir) < total
    final = subprocess.run(
        train_cmd(workdir, total, cache_dir, *flags),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert final.returncode == 0, final.stderr
    assert "resumed" in final.stderr
    reference = str(tmp_path / "reference")
    config = tiny(cache_dir, num_train_steps=total, checkpoint_every_steps=1)
    train_and_evaluate(config, reference)
    got = read_metrics(workdir)
    assert [r["step"] for r in got] == list(range(1, total + 1))
    assert_same_metrics(got, read_metrics(reference))
