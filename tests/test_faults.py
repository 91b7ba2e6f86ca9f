"""Fault injection: what a run survives, and how it fails when it cannot go on.

Real processes where it matters (``kill -9`` at random moments, many during asynchronous
saves; storage that turns unwritable mid-run; two runs on one workdir; two Ctrl-C while the
main thread is blocked in a device computation), in-process runs elsewhere. Tiny configs, one
shared compilation cache, no XLA optimisation passes (``fast_compiles``; subprocesses get the
same setting through ``JAX_DISABLE_MOST_OPTIMIZATIONS``).
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import json
import os
import random
import shutil
import signal
import stat
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
from dsc_jax.train.checkpointing import (
    CheckpointWriteError,
    UnreadableCheckpointsError,
    read_meta,
)
from dsc_jax.train.metrics import MetricsWriter, read_metrics
from dsc_jax.train.trainer import Interrupted, NonFiniteStateError, StopFlag, train_and_evaluate
from dsc_jax.train.workdir import (
    WorkdirError,
    WorkdirLock,
    WorkdirLockedError,
    WorkdirLockLostError,
)
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
        ("model.ffn.tau", 5.0, "model.ffn.tau: 20.0 -> 5.0"),
        ("model.ffn.top_k", 4, "model.ffn.top_k: 2 -> 4"),
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


# --- The lock is the folder's identity --------------------------------------------------------


# A removed or replaced WORKDIR/.lock (a cleanup script, a synced folder) does not let a second
# run in: the first still holds the folder itself, writes the lock file again and goes on.
@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_second_run_is_refused_after_the_lock_file_is_removed_or_replaced(
    tmp_path, cache_dir, change
):
    workdir = str(tmp_path / "run")
    lock = os.path.join(workdir, ".lock")
    first = start_process(
        train_cmd(workdir, DECAY, cache_dir, "--config.checkpoint_every_steps=2"), env()
    )
    try:
        wait_for_step(first, workdir, 3)
        os.remove(lock)
        if change == "replaced":
            with open(lock, "w") as f:
                f.write("{}\n")
        second = subprocess.run(
            train_cmd(workdir, DECAY, cache_dir),
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert second.returncode == 1, second.stderr
        assert f"workdir {workdir} is in use by another run" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        wait_for_step(first, workdir, last_step(workdir) + 2)  # the first run goes on
        with open(lock) as f:
            assert json.load(f)["pid"] == first.pid  # its record, written again
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    finally:
        output = stop(first) if first.poll() is None else output
    assert first.returncode == 0, output
    assert f"the lock file {lock} was {change}" in output, output
    logged = [r["step"] for r in read_metrics(workdir)]
    assert logged == list(range(1, len(logged) + 1))  # no step twice, none out of order


def _no_folder_locks(monkeypatch) -> None:
    """What NFS does: flock on a folder fails with EBADF (the lock file still locks)."""
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


# Where the run can no longer prove it alone uses the folder, it stops before writing more.
@pytest.mark.parametrize("change", ["lock file removed, no folder lock", "workdir moved"])
def test_a_lost_lock_stops_the_run_before_it_writes_again(tmp_path, cache_dir, monkeypatch, change):
    workdir = str(tmp_path / "run")
    moved = change == "workdir moved"
    if not moved:
        _no_folder_locks(monkeypatch)
    real_write = MetricsWriter.write

    def write_then_lose_the_lock(self, step, metrics):
        real_write(self, step, metrics)
        if step == 5:
            if moved:
                os.rename(workdir, workdir + ".moved")
            else:
                os.remove(os.path.join(workdir, ".lock"))

    monkeypatch.setattr(MetricsWriter, "write", write_then_lose_the_lock)
    config = tiny(cache_dir, num_train_steps=12, checkpoint_every_steps=4)
    config.async_checkpointing = False  # checkpoint 4 is complete before the folder moves
    with pytest.raises(WorkdirLockLostError, match="moved" if moved else "cannot lock the folder"):
        train_and_evaluate(config, workdir)
    folder = workdir + ".moved" if moved else workdir
    assert [r["step"] for r in read_metrics(folder)] == [1, 2, 3, 4, 5]
    assert sorted(n for n in os.listdir(os.path.join(folder, "checkpoints")) if n.isdigit()) == [
        "4"
    ]
    if moved:
        assert not os.path.exists(workdir)  # nothing written where the folder was


# --- The run's record and its settings ----------------------------------------------------------


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# A new start over an earlier run's record (its checkpoints gone) is refused, or, when the
# record is of these very settings (a stop before the first checkpoint), moves it aside.
def test_a_new_start_never_overwrites_an_earlier_record(finished_run, tmp_path, cache_dir):
    workdir = copy_run(finished_run, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    metrics, config_json = (os.path.join(workdir, n) for n in ("metrics.jsonl", "config.json"))
    before = {path: _read(path) for path in (metrics, config_json)}
    changed = tiny(cache_dir)
    changed.optim.learning_rate = 1e-3
    with pytest.raises(WorkdirError, match="holds the record of an earlier run") as info:
        train_and_evaluate(changed, workdir)
    assert "optim.learning_rate: 0.003 -> 0.001" in str(info.value)
    assert {path: _read(path) for path in before} == before
    os.remove(config_json)
    with pytest.raises(WorkdirError, match=r"no config\.json tells whether it is this run"):
        train_and_evaluate(tiny(cache_dir), workdir)
    assert _read(metrics) == before[metrics]
    with open(config_json, "wb") as f:
        f.write(before[config_json])

    assert train_and_evaluate(tiny(cache_dir, num_train_steps=2), workdir)["step"] == 2
    [abandoned] = [n for n in os.listdir(workdir) if n.startswith("abandoned-")]
    old = os.path.join(workdir, abandoned)
    assert _read(os.path.join(old, "metrics.jsonl")) == before[metrics]
    assert _read(os.path.join(old, "config.json")) == before[config_json]
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]


# Every checkpoint records the settings that wrote it: a deleted or edited config.json cannot
# let a changed run through; a deleted one is written again on a good resume.
@pytest.mark.parametrize("config_json", ["deleted", "edited"])
def test_resume_is_checked_against_the_checkpoints_own_settings(
    finished_run, tmp_path, cache_dir, caplog, config_json
):
    workdir = copy_run(finished_run, tmp_path)
    path = os.path.join(workdir, "config.json")
    if config_json == "deleted":
        os.remove(path)
    else:  # claims the new rate for the whole run
        with open(path) as f:
            saved = json.load(f)
        saved["config"]["optim"]["learning_rate"] = 1e-3
        with open(path, "w") as f:
            json.dump(saved, f)
    changed = tiny(cache_dir)
    changed.optim.learning_rate = 1e-3
    with pytest.raises(ValueError, match="differ from its checkpoint 8") as info:
        train_and_evaluate(changed, workdir)
    assert "optim.learning_rate: 0.003 -> 0.001" in str(info.value)
    assert os.path.exists(path) == (config_json == "edited")  # nothing written
    assert sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    if config_json == "deleted":
        result = train_and_evaluate(tiny(cache_dir, num_train_steps=10), workdir)
        assert result["step"] == 10
        assert "config.json of the run in" in caplog.text and "is missing" in caplog.text
        with open(path) as f:
            assert json.load(f)["config"]["optim"]["learning_rate"] == 0.003


# Settings the run does not read (another data source's keys) are ignored by the
# checkpoint's check as by config.json's: they cannot change what it computes.
def test_the_checkpoints_settings_check_ignores_unread_settings(finished_run, tmp_path, cache_dir):
    workdir = copy_run(finished_run, tmp_path)
    os.remove(os.path.join(workdir, "config.json"))  # only the checkpoint's record is left
    config = tiny(cache_dir, num_train_steps=10)
    assert config.model.ffn.kind == "dsc" and config.data.source == "embedded"
    recorded = read_meta(os.path.join(workdir, "checkpoints"), 8)["config"]
    assert recorded["data"]["tfds_train_split"] == config.data.tfds_train_split
    config.data.tfds_train_split = "other"  # read by tfds:<name> sources only
    config.data.wikitext_dir = str(tmp_path / "elsewhere")
    assert train_and_evaluate(config, workdir)["step"] == 10
    with open(os.path.join(workdir, "config.json")) as f:  # written again, as run_record()
        record = json.load(f)
    assert record["config"]["data"]["tfds_train_split"] == "other"
    assert record["model"]["ffn"]["kind"] == "dsc"


# --- Storage errors outside the checkpoint path: one line, no traceback ----------------------


def _unshare_prefix() -> list[str]:
    return ["unshare", "--mount", "--propagation", "private"] + (
        [] if os.geteuid() == 0 else ["--map-root-user"]
    )


@pytest.fixture(scope="module")
def mount_namespace(tmp_path_factory) -> None:
    """Skips unless this machine lets a process mount a tmpfs in a private mount namespace."""
    target = tmp_path_factory.mktemp("mount_probe")
    try:
        probe = subprocess.run(
            [*_unshare_prefix(), "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(target)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"no private mount namespace here ({err})")
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")


def run_with_mounts(mounts: str, cmd: list[str], timeout: float = 240):
    """``cmd`` in a private mount namespace after the shell commands ``mounts``."""
    return subprocess.run(
        [*_unshare_prefix(), "sh", "-c", f'set -e; {mounts}; exec "$@"', "sh", *cmd],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _read_only(folder: str) -> str:
    return f"mount --bind {folder} {folder}; mount -o remount,bind,ro {folder}"


def _tmpfs(folder: str, size: str) -> str:
    return f"mkdir -p {folder}; mount -t tmpfs -o size={size} tmpfs {folder}"


@pytest.mark.parametrize(
    "fault",
    [
        "read-only workdir of an earlier run",
        "new workdir under a read-only folder",
        "full disk: the lock file",
        "full disk: config.json",
        "full disk: TensorBoard at the start",
        "disk fills mid-run: metrics or TensorBoard",
    ],
)
def test_storage_errors_are_one_line(mount_namespace, finished_run, tmp_path, cache_dir, fault):
    del mount_namespace
    extra: list[str] = []
    if fault == "read-only workdir of an earlier run":
        workdir = copy_run(finished_run, tmp_path)
        mounts, want = _read_only(workdir), f"cannot create the lock file {workdir}/.lock"
    elif fault == "new workdir under a read-only folder":
        parent = tmp_path / "ro"
        parent.mkdir()
        workdir = str(parent / "new" / "run")
        mounts, want = _read_only(str(parent)), f"cannot create the workdir {parent}/new"
    elif fault == "full disk: the lock file":
        workdir = str(tmp_path / "full")
        mounts = _tmpfs(workdir, "64k") + f"; head -c 1M /dev/zero > {workdir}/filler || true"
        want = f"cannot write the lock file {workdir}/.lock"
    elif fault == "full disk: config.json":  # two pages: one for the lock, one for the probe
        workdir = str(tmp_path / "small")
        mounts, want = _tmpfs(workdir, "8k"), f"cannot write {workdir}/config.json"
        extra = ["--config.name=" + "x" * 2000]  # a config.json of two pages
    elif fault == "full disk: TensorBoard at the start":  # room for the lock and config.json
        workdir = str(tmp_path / "small")
        mounts, want = _tmpfs(workdir, "8k"), f"cannot write {workdir}/tensorboard/events"
    else:  # room for the start; the first checkpoint would come at the end
        workdir = str(tmp_path / "small")
        mounts, want = _tmpfs(workdir, "64k"), f"cannot write {workdir}/"
        extra = ["--config.checkpoint_every_steps=0"]
    started = time.time()
    result = run_with_mounts(mounts, train_cmd(workdir, DECAY, cache_dir, *extra))
    elapsed = time.time() - started
    reason = "Read-only file system" if "read-only" in fault else "No space left on device"
    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("dsc-train:")]
    assert line.startswith(f"dsc-train: error: {want}") and reason in line, line
    assert "Traceback" not in result.stderr, result.stderr
    print(f"{fault}: exit 1 after {elapsed:.1f} s: {line}")


def test_dangling_symlink_workdir_is_one_line(tmp_path, cache_dir):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "missing")
    result = subprocess.run(
        train_cmd(str(link), 4, cache_dir),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1
    assert (
        f"dsc-train: error: workdir {link} is a symbolic link to {tmp_path / 'missing'}, which "
        "does not exist" in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr


# --- Start-up: Ctrl-C, a broken config file ----------------------------------------------------


# Ctrl-C at any moment: 130 and one line, never a traceback and never lost; during training
# after the checkpoint of the current step.
@pytest.mark.parametrize("moment", ["imports", "start-up", "training"])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(tmp_path, cache_dir, moment):
    workdir = str(tmp_path / "run")
    proc = start_process(
        train_cmd(workdir, DECAY, cache_dir, "--config.checkpoint_every_steps=0"), env()
    )
    try:
        if moment == "imports":
            time.sleep(1.0)  # importing JAX and dsc_jax takes seconds
        elif moment == "start-up":  # the workdir is locked: data, model, compilation follow
            deadline = time.time() + 120
            while not os.path.exists(os.path.join(workdir, ".lock")) and time.time() < deadline:
                time.sleep(0.01)
        else:
            wait_for_step(proc, workdir, 2)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        output = stop(proc) if proc.poll() is None else output
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "Traceback" not in output and "completed at step" not in output, output
    [line] = [line for line in output.splitlines() if line.startswith("dsc-train:")]
    if moment == "training":
        assert "stopped by SIGINT after step" in line, line
        assert [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    else:
        assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


# A start-up signal is recorded, never raised inside whatever code runs (an import or a C++
# callback would swallow it), and raised between start-up phases.
def test_start_up_signal_is_recorded_then_raised_between_phases():
    with StopFlag(interrupt=True) as stop:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except KeyboardInterrupt:  # what an import or a callback would swallow
            pytest.fail("the handler raised inside arbitrary code")
        assert stop.requested == "SIGINT"
        with pytest.raises(Interrupted) as info:
            stop.check()
        assert info.value.exit_status == 130
        with pytest.raises(Interrupted):
            stop.start_training()


@pytest.mark.parametrize(
    ("source", "want"),
    [
        ("def get_config(:\n    pass\n", "line 1: invalid syntax"),
        ("import os\n\n\ndef get_config():\n    return 1 / 0\n", "line 5: ZeroDivisionError"),
    ],
)
def test_broken_config_file_is_one_line_naming_the_file_and_line(tmp_path, source, want):
    path = tmp_path / "broken.py"
    path.write_text(source)
    result = subprocess.run(
        [sys.executable, "train.py", f"--config={path}", f"--workdir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"dsc-train: error: cannot load --config {path}, {want}"), line


# --- Noise: a fallback is one warning line ---------------------------------------------------


def test_fallback_from_an_unreadable_checkpoint_is_one_short_line(finished_run, tmp_path, capfd):
    workdir = copy_run(finished_run, tmp_path)
    state = os.path.join(workdir, "checkpoints", "8", "state")
    for folder, _, files in os.walk(state):
        for name in files:
            if os.path.basename(folder) == "d":  # every array chunk of the newest checkpoint
                open(os.path.join(folder, name), "w").close()
    result = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"--workdir={workdir}",
            "--prompt=def ",
            "--max_new_tokens=2",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert f"{workdir} step 4:" in result.stderr  # fell back to checkpoint 4
    [warning] = [line for line in result.stderr.splitlines() if "does not restore" in line]
    assert len(warning) < 600 and "checkpoints/8/state" in warning, warning  # not 2,000+
    assert "Event loop is closed" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2, result.stderr  # the warning, timings

    from dsc_jax.loading import load_model

    capfd.readouterr()
    assert load_model(workdir).step == 4  # the library: no noise either
    assert "Event loop is closed" not in capfd.readouterr().err
