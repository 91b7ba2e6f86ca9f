"""``report.aggregate`` against hand-computed numbers: mean ± std over seeds, speed-up vs MoE,
Δ vs the DSC reference and "beyond spread", on hand-written run folders (no training)."""

from __future__ import annotations

import json
import math

import ml_collections
import pytest

from dsc_jax.experiments.report import aggregate
from dsc_jax.experiments.runner import DONE_FILE, Run, Variant

# variant -> final eval loss per seed; latency in ms.
LOSSES = {"dsc": [3.0, 3.2], "moe": [3.5, 3.7], "dense": [3.12, 3.14]}
LATENCY = {"dsc": {"ms": 10.0}, "moe": {"ms": 20.0}, "dense": {"ms": 5.0}}


def _runs(tmp_path) -> list[Run]:
    runs = []
    for name, losses in LOSSES.items():
        for seed, loss in enumerate(losses):
            workdir = tmp_path / f"{name}_seed{seed}"
            workdir.mkdir()
            (workdir / DONE_FILE).write_text(json.dumps({"final": {"eval_loss": loss}}))
            record = {"step": 10, "eval_loss": loss}
            (workdir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
            sizes = {"total_params": 100, "active_params": 50, "ffn": {}}
            config = ml_collections.ConfigDict({"seed": seed})
            runs.append(Run(Variant(name, name), seed, str(workdir), config, sizes))
    return runs


def test_aggregate_against_hand_computed_values(tmp_path):
    rows = {r["variant"]: r for r in aggregate(_runs(tmp_path), LATENCY)["rows"]}
    spread = math.sqrt(0.02)  # stdev of two values 0.2 apart: 0.2 / √2
    want = {
        # variant: (mean, std, speed-up vs MoE = MoE ms / its ms, Δ = its mean − DSC's, beyond)
        "dsc": (3.1, spread, 2.0, None, None),
        "moe": (3.6, spread, 1.0, 0.5, True),  # |0.5| > 0.141 + 0.141
        "dense": (3.13, spread / 10, 4.0, 0.03, False),  # |0.03| < 0.0141 + 0.141
    }
    for name, (mean, std, speedup, delta, beyond) in want.items():
        row = rows[name]
        assert row["n_seeds"] == 2
        assert row["val_loss_mean"] == pytest.approx(mean, abs=1e-12), name
        assert row["val_loss_std"] == pytest.approx(std, rel=1e-9), name
        assert row["speedup_vs_moe"] == pytest.approx(speedup, rel=1e-12), name
        if delta is None:
            assert row["delta_vs_dsc"] is None and row["beyond_spread"] is None
        else:
            assert row["delta_vs_dsc"] == pytest.approx(delta, abs=1e-12), name
            assert row["beyond_spread"] is beyond, name


def test_beyond_spread_is_symmetric_in_the_sign_of_delta(tmp_path):
    """A variant better than DSC by more than the spread is beyond it too (Δ < 0)."""
    losses_better = {"dsc": [3.0, 3.2], "moe": [2.5, 2.7]}
    runs = [r for r in _runs(tmp_path) if r.variant.name in losses_better]
    for run in runs:
        loss = losses_better[run.variant.name][run.seed]
        with open(f"{run.workdir}/{DONE_FILE}", "w") as f:
            json.dump({"final": {"eval_loss": loss}}, f)
    rows = {r["variant"]: r for r in aggregate(runs, LATENCY)["rows"]}
    assert rows["moe"]["delta_vs_dsc"] == pytest.approx(-0.5, abs=1e-12)
    assert rows["moe"]["beyond_spread"] is True


def test_a_failed_report_write_keeps_the_previous_report(tmp_path, monkeypatch):
    """The report's files are written through a temporary file and a rename: a write that
    fails (here: ``fsync`` answering ENOSPC) raises one StorageError naming the file, and
    the earlier ``comparison.md`` / ``comparison.json`` are untouched, never cut."""
    import errno

    from dsc_jax import _storage
    from dsc_jax.experiments.report import write_report

    summary = aggregate(_runs(tmp_path), LATENCY)
    folder = tmp_path / "report"
    folder.mkdir()
    for name in ("comparison.md", "comparison.json"):
        (folder / name).write_text("OLD")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_storage.os, "fsync", no_space)
    with pytest.raises(_storage.StorageError, match=r"cannot write .*comparison\.md: .*No space"):
        write_report(summary, str(folder), "t", "cmd", "desc")
    assert (folder / "comparison.md").read_text() == "OLD"
    assert (folder / "comparison.json").read_text() == "OLD"
    assert sorted(p.name for p in folder.iterdir()) == ["comparison.json", "comparison.md"]


def test_run_metrics_skip_a_line_cut_by_a_crash(tmp_path):
    """A ``metrics.jsonl`` whose last line a crash cut still reads (the cut line skipped)."""
    from dsc_jax.experiments.runner import read_metrics

    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    text = "".join(json.dumps(r) + "\n" for r in good) + '{"step": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_metrics(str(tmp_path)) == good
    assert read_metrics(str(tmp_path / "absent")) == []
