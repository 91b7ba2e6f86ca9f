"""dsc-compare on --preset tiny: report, settings, skip of finished runs, resume."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from dsc_jax.experiments import ablation_variants, cli, runner
from dsc_jax.experiments.presets import STUDIES
from tests._train_utils import REPO

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compiles")]

# a DSC-only setting: the DSC runs read it, the MoE runs keep the study's value
ARGS = ["--preset", "tiny", "--methods", "dsc,moe", "--seeds", "0,1", "--set", "model.dsc.tau=10.0"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One tiny sweep (2 methods × 2 seeds, 6 steps) shared by the tests below."""
    results = tmp_path_factory.mktemp("results")
    assert cli.main([*ARGS, "--results", str(results), "--latency-rounds", "3"]) == 0
    return results / "tiny"


def test_report_has_rows_columns_and_files(sweep):
    for name in ("comparison.md", "comparison.json", "convergence.png", "dsc_bank.png"):
        assert (sweep / name).stat().st_size > 0, name
    for run in ("dsc_seed0", "dsc_seed1", "moe_seed0", "moe_seed1"):
        assert (sweep / run / runner.DONE_FILE).exists()
    md = (sweep / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    for col in (
        "total",
        "active",
        "val loss (mean ± std)",
        "latency ms/batch",
        "speed-up vs MoE",
        "Δ loss vs DSC",
        "Δ beyond seed spread?",
    ):
        assert col in header
    assert "| DSC |" in md and "| Standard MoE |" in md and "Table 1" in md
    routing = md.split("### DSC routing at the last evaluation")[1].split("###")[0]
    dsc_line = next(line for line in routing.splitlines() if line.startswith("| DSC |"))
    used, entropy, gated, erank = (float(c) for c in dsc_line.strip("|").split("|")[1:])
    assert 0 < used <= 1 and 0 < entropy <= 1 and 0 <= gated <= 1 and erank > 1
    assert "| Standard MoE |" not in routing
    data = json.loads((sweep / "comparison.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dsc", "moe"}
    for r in rows.values():
        assert r["n_seeds"] == 2 and r["val_loss_std"] >= 0
        assert r["latency"]["ms"] > 0 and r["total_params"] > r["active_params"]
        assert set(r["configs"]) == {"0", "1"}  # exact configs, keyed by seed
    assert rows["moe"]["speedup_vs_moe"] == pytest.approx(1.0)
    assert rows["dsc"]["delta_vs_dsc"] is None
    assert isinstance(rows["moe"]["beyond_spread"], bool)
    # iso-active: the solver matched both sparse models to the same active budget (±2 %)
    assert rows["moe"]["active_params"] == pytest.approx(rows["dsc"]["active_params"], 0.02)
    assert data["paper_table_1"]["dsc"]["val_loss"] == [5.126, 0.006]


def test_settings_reach_the_runs_that_read_them(sweep):
    """--set model.dsc.tau=10: in the DSC runs' config.json and done.json and in the
    effective sizes commands.txt records; the MoE runs keep the study's value."""
    for seed in (0, 1):
        dsc = json.loads((sweep / f"dsc_seed{seed}" / "config.json").read_text())
        assert dsc["config"]["model"]["ffn"]["tau"] == 10.0 and dsc["model"]["ffn"]["tau"] == 10.0
        done = json.loads((sweep / f"dsc_seed{seed}" / runner.DONE_FILE).read_text())
        assert done["settings"] == {"model.dsc.tau": 10.0}
        moe = json.loads((sweep / f"moe_seed{seed}" / "config.json").read_text())
        assert moe["config"]["model"]["ffn"]["kind"] == "moe"
        assert "tau" not in moe["config"]["model"]["ffn"]
        assert "settings" not in json.loads(
            (sweep / f"moe_seed{seed}" / runner.DONE_FILE).read_text()
        )
    commands = (sweep / "commands.txt").read_text().splitlines()
    assert commands[0].startswith("dsc-compare " + shlex.join(ARGS))
    effective = commands[1:3]
    assert effective[0].startswith("#   dsc: dsc ") and "tau=10.0" in effective[0]
    assert "num_bases=" in effective[0] and effective[1].startswith("#   moe: moe ")


def test_second_invocation_skips_finished_runs(sweep, capsys):
    metrics = {p: (sweep / p / "metrics.jsonl").read_bytes() for p in ("dsc_seed0", "moe_seed1")}
    assert cli.main([*ARGS, "--results", str(sweep.parent), "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert out.count("skip finished run") == 4
    assert "(0 trained, 4 skipped)" in out
    for p, before in metrics.items():
        assert (sweep / p / "metrics.jsonl").read_bytes() == before


def test_finished_run_from_older_code_is_skipped_not_refused(sweep, capsys):
    """A finished run whose config.json lacks keys added to the code since (at their defaults)
    and whose fingerprint is therefore stale is skipped; a real change is refused."""
    workdir = sweep / "dsc_seed0"
    config_path, done_path = workdir / "config.json", workdir / runner.DONE_FILE
    config_text, done_text = config_path.read_text(), done_path.read_text()
    try:
        saved = json.loads(config_text)
        del saved["config"]["model"]["attention"], saved["config"]["model"]["attention_dropout"]
        config_path.write_text(json.dumps(saved))
        done_path.write_text(json.dumps({**json.loads(done_text), "fingerprint": "older"}))
        assert cli.main([*ARGS, "--results", str(sweep.parent), "--no-latency"]) == 0
        assert "(0 trained, 4 skipped)" in capsys.readouterr().out
        saved["config"]["optim"]["learning_rate"] *= 2  # trained with another setting: not this run
        config_path.write_text(json.dumps(saved))
        assert cli.main([*ARGS, "--results", str(sweep.parent), "--no-latency"]) == 2
        err = capsys.readouterr().err  # refused before anything is trained
        assert "finished with another config (optim.learning_rate: 0.006 -> 0.003)" in err
    finally:
        config_path.write_text(config_text)
        done_path.write_text(done_text)


def test_latency_uses_another_seed_when_checkpoints_are_gone(sweep, capsys):
    """The report measures latency from any finished seed with a checkpoint; a variant with
    none (a fresh clone: checkpoints are not committed) is timed on initialised parameters,
    marked as such in the JSON and the markdown, and the report is still written."""
    moved = sweep.parent / "moved_checkpoints"
    moved.mkdir()
    try:
        shutil.move(sweep / "dsc_seed0" / "checkpoints", moved / "dsc_seed0")  # seed 1 remains
        shutil.move(sweep / "moe_seed0" / "checkpoints", moved / "moe_seed0")
        shutil.move(sweep / "moe_seed1" / "checkpoints", moved / "moe_seed1")  # none left
        args = [*ARGS, "--results", str(sweep.parent), "--report-only", "--latency-rounds", "2"]
        assert cli.main(args) == 0
        rows = {
            r["variant"]: r for r in json.loads((sweep / "comparison.json").read_text())["rows"]
        }
        assert rows["dsc"]["latency"]["ms"] > 0 and rows["dsc"]["latency"]["params"] == "trained"
        assert rows["moe"]["latency"]["ms"] > 0 and rows["moe"]["latency"]["params"] == "init"
        markdown = (sweep / "comparison.md").read_text()
        assert "Latency of Standard MoE: timed on initialised parameters" in markdown
    finally:
        for name in ("dsc_seed0", "moe_seed0", "moe_seed1"):
            if (moved / name).exists():
                shutil.move(moved / name, sweep / name / "checkpoints")


def test_interrupted_run_resumes(sweep, capsys):
    """A run whose newest checkpoint is before the last step (the final one removed, no
    done.json) continues from it instead of starting over."""
    workdir = sweep / "moe_seed1"
    ckpts = workdir / "checkpoints"
    steps = sorted(int(p) for p in os.listdir(ckpts) if p.isdigit())
    assert steps[-1] == 6 and 3 in steps
    shutil.rmtree(ckpts / "6")
    (workdir / runner.DONE_FILE).unlink()
    first = (workdir / "metrics.jsonl").read_text().splitlines()[0]
    assert cli.main([*ARGS, "--results", str(sweep.parent), "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert f"resume {workdir}" in out and "(1 trained, 3 skipped)" in out
    done = json.loads((workdir / runner.DONE_FILE).read_text())
    assert done["step"] == 6
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == first  # the step-1 record survives: not retrained from scratch
    assert json.loads(lines[-1])["step"] == 6


def test_plan_checks_a_checkpointed_run_against_its_checkpoints_settings(sweep, capsys):
    """Without done.json and config.json, the settings recorded in the newest checkpoint
    decide whether the run may resume (as the trainer checks them): a change is a conflict."""
    workdir = sweep / "moe_seed1"
    saved = {name: (workdir / name).read_bytes() for name in (runner.DONE_FILE, "config.json")}
    try:
        for name in saved:
            (workdir / name).unlink()
        args = [*ARGS, "--results", str(sweep.parent), "--plan"]
        assert cli.main([*args, "--set", "optim.learning_rate=0.001"]) == 2
        out = capsys.readouterr().out
        assert (
            f"{workdir}: checkpointed with other settings (optim.learning_rate: 0.003 -> 0.001)"
            in out
        ), out
        assert cli.main(args) == 0
        assert f"{workdir}: resume" in capsys.readouterr().out
    finally:
        for name, content in saved.items():
            (workdir / name).write_bytes(content)


@pytest.mark.parametrize("content", ["", '{"fingerprint": "0123'])
def test_empty_or_truncated_done_json_counts_as_unfinished(sweep, capsys, caplog, content):
    """An unreadable done.json is one warning and an unfinished run (it resumes at its final
    checkpoint and the record is written again), not a JSONDecodeError for every sweep."""
    done_path = sweep / "moe_seed0" / runner.DONE_FILE
    done_path.write_text(content)
    assert cli.main([*ARGS, "--results", str(sweep.parent), "--no-latency"]) == 0
    assert "(1 trained, 3 skipped)" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if str(done_path) in r.getMessage()]
    assert len(warnings) == 1 and "treating the run as unfinished" in warnings[0], warnings
    assert json.loads(done_path.read_text())["step"] == 6  # written again, whole
    assert not [p for p in os.listdir(done_path.parent) if ".tmp-" in p]


def test_second_sweep_on_the_same_results_folder_is_one_line(sweep, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from dsc_jax.experiments.runner import sweep_lock; "
            f"sweep_lock({str(sweep)!r}).acquire(); print('locked', flush=True); time.sleep(300)",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-m", "dsc_jax.experiments", *ARGS, "--results", str(sweep.parent)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert second.returncode == 1, second.stderr
    assert (
        f"dsc-compare: error: results folder {sweep} is in use by another sweep (host "
        in second.stderr
    ), second.stderr
    assert f"pid {holder.pid}" in second.stderr and "Traceback" not in second.stderr


def test_presets_and_ablations_are_constructible():
    paper = STUDIES["paper"]
    runs = runner.plan(paper, "/nonexistent", runner.method_variants(paper.methods), [42])
    sizes = {r.variant.name: r.sizes for r in runs}
    assert sizes["dsc"]["ffn"]["num_bases"] == 1523 and sizes["dsc"]["ffn"]["hidden_dim"] == 327
    assert sizes["moe"]["ffn"]["num_experts"] == 5 and sizes["moe"]["ffn"]["hidden_dim"] == 545
    assert sizes["dense"]["ffn"]["hidden_dim"] == 2611
    assert runs[0].config.data.source == "wikitext103" and runs[0].config.num_train_steps == 2000
    tiny = STUDIES["tiny"]
    for axis in runner.ABLATIONS[1:]:
        variants = ablation_variants(axis)
        runs = runner.plan(tiny, "/nonexistent", variants, [0])
        assert len(runs) == len(variants) >= 2
    k_runs = runner.plan(tiny, "/x", ablation_variants("top_k"), [0])
    assert [r.config.model.ffn.top_k for r in k_runs] == [2, 4, 8, 16]
    assert len({r.config.model.ffn.num_bases for r in k_runs}) == 1  # fixed M
    no_aux = runner.plan(tiny, "/x", ablation_variants("regularisers"), [0])[1]
    assert no_aux.variant.name == "dsc_no_aux" and no_aux.config.losses.aux == 0.0
    scaled = runner.plan(tiny, "/x", ablation_variants("scale"), [0])
    widths = [r.config.model.d_model for r in scaled]
    bases = [r.config.model.ffn.num_bases for r in scaled]
    assert widths == sorted(widths) and bases == sorted(bases) and bases[0] < bases[-1]
    # router axis: product keys at equal active parameters spend the smaller router on H
    routed = {r.variant.name: r for r in runner.plan(tiny, "/x", ablation_variants("router"), [0])}
    flat, pk, pk_same = (routed[n] for n in ("dsc_flat", "dsc_pk65536", "dsc_pk65536_same_ffn"))
    assert flat.config.model.ffn.router == "flat"
    assert pk.config.model.ffn.router == "product_key" and pk.config.model.ffn.num_bases == 65536
    per_hidden_unit = 2 * tiny.base().model.d_model * tiny.base().model.num_layers
    assert abs(pk.sizes["active_params"] - flat.sizes["active_params"]) <= per_hidden_unit / 2
    assert pk_same.config.model.ffn.hidden_dim == flat.config.model.ffn.hidden_dim
    assert pk.config.model.ffn.hidden_dim != flat.config.model.ffn.hidden_dim
