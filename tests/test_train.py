"""End-to-end training on the tiny config (8 fake CPU devices, data-parallel mesh):
loss falls, outputs exist, resume == uninterrupted (bit-identical metrics), a corrupt latest
checkpoint falls back to the previous one, NaN loss stops with the step named.

All runs share a persistent compilation cache, so only the first run compiles.
"""

from __future__ import annotations

import glob
import json
import os
import signal

import jax.numpy as jnp
import pytest

from dsc_jax.train import steps
from dsc_jax.train.checkpointing import read_meta
from dsc_jax.train.config import plain_config, run_record
from dsc_jax.train.metrics import MetricsWriter, read_metrics
from dsc_jax.train.trainer import NonFiniteLossError, train_and_evaluate
from tests._train_utils import load_config, without_timing

pytestmark = pytest.mark.slow  # every test trains through the trainer

TOTAL = 24


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


def tiny(cache_dir: str, num_train_steps: int = TOTAL):
    config = load_config("tiny")
    config.num_train_steps = num_train_steps
    config.optim.decay_steps = TOTAL  # the schedule must not depend on where a run stops
    config.log_every_steps = 1  # a record at every step: compare every loss
    config.eval_every_steps = 12
    config.checkpoint_every_steps = 8
    config.compilation_cache_dir = cache_dir
    return config


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
    workdir = str(tmp_path_factory.mktemp("straight"))
    result = train_and_evaluate(tiny(cache_dir), workdir)
    return workdir, result


def test_loss_falls_and_outputs_exist(straight_run, cache_dir):
    workdir, result = straight_run
    assert result["status"] == "completed" and result["step"] == TOTAL
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    first, last = records[0], records[-1]
    assert last["train_loss"] < first["train_loss"] - 0.5, (first, last)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("lr", "router_lr", "grad_norm", "reg_aux", "reg_budget", "reg_frame", "reg_z"):
        assert key in last
    assert last["router_lr"] == pytest.approx(5 * last["lr"])
    for name in ("used_frac", "usage_entropy", "mean_signal", "signal_collapse_frac", "erank_u"):
        assert f"diag/block_0/ffn/{name}" in last
    assert last["tokens_per_sec"] > 0 and last["step_time"] > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "24", "8"]
    assert read_meta(os.path.join(workdir, "checkpoints"), 24)["data_state"]["step"] == TOTAL
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    with open(os.path.join(workdir, "config.json")) as f:  # what test_settings.py checks
        record = json.load(f)
    assert record == plain_config(run_record(tiny(cache_dir), 256))


def test_resume_equals_uninterrupted(straight_run, tmp_path, cache_dir):
    """N steps, stop, resume to 2N: metrics.jsonl equals the straight 2N-step run's exactly
    (losses, regularisers, grad norms, eval and diagnostics; only timings differ)."""
    workdir = str(tmp_path)
    first = train_and_evaluate(tiny(cache_dir, num_train_steps=TOTAL // 2), workdir)
    assert first["step"] == TOTAL // 2
    resumed = train_and_evaluate(tiny(cache_dir), workdir)
    assert resumed["step"] == TOTAL
    assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(straight_run[0]))
    # Running again when complete trains nothing and keeps the file.
    again = train_and_evaluate(tiny(cache_dir), workdir)
    assert again["step"] == TOTAL and len(read_metrics(workdir)) == TOTAL


# orbax leaves a tensorstore callback on its closed event loop when a read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back(straight_run, tmp_path, cache_dir, caplog):
    workdir = str(tmp_path)
    train_and_evaluate(tiny(cache_dir), workdir)
    data_files = glob.glob(f"{workdir}/checkpoints/24/state/**/d/*", recursive=True)
    for path in data_files:  # corrupt every array file of the newest checkpoint
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\xde\xad\xbe\xef")
    os.remove(os.path.join(workdir, "metrics.jsonl"))  # to see which steps are re-run
    result = train_and_evaluate(tiny(cache_dir), workdir)
    assert "checkpoints/24 is corrupt or partial" in caplog.text
    assert result["step"] == TOTAL
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(17, TOTAL + 1))  # resumed from 16
    assert without_timing(records) == without_timing(read_metrics(straight_run[0]))[16:]
    assert os.listdir(os.path.join(workdir, "checkpoints.corrupt"))[0].startswith("24-")


def test_nan_loss_stops_naming_the_step(tmp_path, cache_dir, monkeypatch):
    real_step = steps.train_step

    def poisoned(state, batch, rng, **kwargs):
        new_state, metrics = real_step(state, batch, rng, **kwargs)
        bad = jnp.where(state.step >= 5, jnp.nan, metrics["train_loss"])  # from step 6 on
        return new_state, dict(metrics, train_loss=bad)

    monkeypatch.setattr(steps, "train_step", poisoned)
    config = tiny(cache_dir, num_train_steps=12)
    config.log_every_steps = 10
    config.checkpoint_every_steps = 4
    workdir = str(tmp_path)
    with pytest.raises(NonFiniteLossError, match="at step 6"):
        train_and_evaluate(config, workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]  # the last good one stays
    assert [r["step"] for r in read_metrics(workdir)] == [1]


def test_signal_mid_step_saves_after_the_next_step_and_resumes(
    straight_run, tmp_path, cache_dir, monkeypatch
):
    """SIGTERM delivered while step 5 is being logged (in-process, deterministic): the loop
    finishes step 6, saves it and returns "interrupted"; resuming gives the straight run."""
    real_write = MetricsWriter.write

    def write_then_signal(self, step, metrics):
        real_write(self, step, metrics)
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsWriter, "write", write_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    workdir = str(tmp_path)
    result = train_and_evaluate(tiny(cache_dir), workdir)
    assert result["status"] == "interrupted" and result["step"] == 6
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handler restored
    monkeypatch.setattr(MetricsWriter, "write", real_write)
    assert train_and_evaluate(tiny(cache_dir), workdir)["status"] == "completed"
    assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(straight_run[0]))
