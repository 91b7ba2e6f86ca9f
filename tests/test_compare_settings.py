"""``dsc-compare --set``: every setting takes effect in the planned runs or is refused with
one ``dsc-compare: error:`` line (exit 2); sized FFN fields are solver constraints; a
finished run is reused exactly when the settings it reads are unchanged. Planning only
(``--plan``, :func:`runner.plan`): nothing is trained."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from dsc_jax.experiments import cli, runner, sizing
from dsc_jax.experiments.presets import STUDIES
from dsc_jax.layers.configs import FFN_CONFIGS
from dsc_jax.models.solver import SIZED_FIELDS, solve_iso_active
from dsc_jax.train import config as config_lib
from dsc_jax.train.presets import WIKITEXT_RAW_DIR
from tests._settings import changed_values, enabling_settings, get, leaf_keys, plain
from tests._train_utils import REPO

KINDS = ("dsc", "moe", "molora", "dense")  # every FFN kind: every FFN field is read by a run
SWEEP = ["--preset", "tiny", "--methods", ",".join(KINDS), "--seeds", "0"]


def _flat(config) -> dict:
    out = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(config_lib.plain_config(config), "")
    return out


def compare(args, tmp_path, monkeypatch, capsys):
    """``(exit status, stderr, planned runs, stdout)`` of ``dsc-compare ARGS --plan``."""
    planned = []
    original = runner.plan

    def spy(*a, **kw):
        planned.extend(original(*a, **kw))
        return planned

    monkeypatch.setattr(runner, "plan", spy)
    status = cli.main([*args, "--results", str(tmp_path), "--plan"])
    captured = capsys.readouterr()
    return status, captured.err, planned, captured.out


def refused(status: int, err: str) -> bool:
    """A one-line ``dsc-compare: error:`` refusal with exit status 2 (no traceback)."""
    lines = err.strip().splitlines()
    return status == 2 and len(lines) == 1 and lines[0].startswith("dsc-compare: error: ")


@pytest.fixture(scope="module")
def default_runs():
    """The sweep's runs without settings, by variant name."""
    study = STUDIES["tiny"]
    runs = runner.plan(study, "/nonexistent", runner.method_variants(KINDS), [0])
    return {run.variant.name: run for run in runs}


def _reader(key: str) -> str:
    """The variant whose run reads ``key`` (its own FFN group's; DSC otherwise)."""
    parts = key.split(".")
    return parts[1] if parts[0] == "model" and parts[1] in FFN_CONFIGS else "dsc"


def _run_key(key: str) -> str:
    """Where a ``--set`` key lives in a run's config: ``model.<kind>.f`` is ``model.ffn.f``."""
    parts = key.split(".")
    if parts[0] == "model" and parts[1] in FFN_CONFIGS:
        return ".".join(["model", "ffn", *parts[2:]])
    return key


#: Every ``--set`` key: the leaves of base_config() without its FFN group, and every FFN
#: field of every kind as ``model.<kind>.<field>``.
SET_KEYS = (
    [k for k in leaf_keys() if not k.startswith("model.ffn.")]
    + [f"model.{kind}.{f.name}" for kind in KINDS for f in dataclasses.fields(FFN_CONFIGS[kind])]
    + ["model.ffn.kind"]
)


@pytest.mark.parametrize("key", SET_KEYS)
def test_every_setting_reaches_the_planned_runs_or_is_refused(
    key, default_runs, tmp_path, monkeypatch, capsys
):
    """Each leaf of base_config() (every FFN field of every kind among them), changed from
    its planned value, is in the config of every run that reads it and leaves the others
    (config and fingerprint) as they were; or the command refuses it in one line. Keys a
    run reads only with another choice (``data.paths`` with ``data.source='text_files'``)
    are given with that choice. The changed values are tried in turn until one is taken."""
    reference, where = default_runs[_reader(key)].config, _run_key(key)
    for value in changed_values(reference, where):
        assert plain(value) != plain(get(reference, where))
        enable = enabling_settings(reference, where, value) or []
        prefix = f"model.{_reader(key)}."
        enable = [(k.replace("model.ffn.", prefix), v) for k, v in enable]
        settings = [*enable, (key, value)]
        args = [a for k, v in settings for a in ("--set", f"{k}={json.dumps(v)}")]
        status, err, runs, _ = compare([*SWEEP, *args], tmp_path, monkeypatch, capsys)
        if status != 0:
            assert refused(status, err), err
            assert key in err
            continue
        readers = [run for run in runs if key in run.settings]
        assert readers, f"{key} is read by no run but was accepted"
        for run in runs:
            before = default_runs[run.variant.name]
            if run in readers:
                assert _flat(run.config)[where] == plain(value), run.variant.name
                assert runner.fingerprint(run.config) != runner.fingerprint(before.config)
            elif len(settings) == 1:  # a run that does not read it keeps the study's value
                assert _flat(run.config) == _flat(before.config), run.variant.name
                assert runner.fingerprint(run.config) == runner.fingerprint(before.config)
        return


@pytest.mark.parametrize(
    ("kind", "field"),
    [(k, f) for k, fields in SIZED_FIELDS.items() for f in fields],
)
def test_a_sized_field_is_kept_and_the_rest_solved_for_it(kind, field, default_runs):
    """``--set model.<kind>.<field>`` on a size: the run keeps it and its other sizes are
    the solver's for that value (e.g. top_k=8: K=8 with M and H solved for K=8)."""
    study, before = STUDIES["tiny"], default_runs[kind]
    value = get(before.config, f"model.ffn.{field}") + 1
    try:
        (run,) = runner.plan(
            study, "/nonexistent", runner.method_variants([kind]), [0], None,
            {f"model.{kind}.{field}": value},
        )  # fmt: skip
    except ValueError as err:  # no solution: one line naming the field
        assert field in str(err) and "\n" not in str(err)
        return
    sizes = {f: run.config.model.ffn[f] for f in SIZED_FIELDS[kind]}
    assert sizes[field] == value
    base = study.base(kind)
    shape = sizing._transformer(base, runner.Variant(kind, kind))
    total, active = sizing._targets(study, base, runner.Variant(kind, kind))
    targets = {"total_params": total} if kind == "dense" else {
        "total_params": total, "active_params": active,
    }  # fmt: skip
    sol = solve_iso_active(kind, **targets, **shape, **{field: value})
    assert sizes == {f: getattr(sol.ffn, f) for f in SIZED_FIELDS[kind]}
    assert run.sizes["unfitted"] == list(sol.unfitted)


def test_top_k_gives_k_with_the_bank_solved_for_it(tmp_path, monkeypatch, capsys):
    status, _, runs, out = compare(
        [*SWEEP, "--set", "model.dsc.top_k=8"], tmp_path, monkeypatch, capsys
    )
    assert status == 0
    dsc = next(r for r in runs if r.variant.kind == "dsc")
    assert dsc.config.model.ffn.top_k == 8 and dsc.sizes["unfitted"] == []
    assert "top_k=8" in out and "--set model.dsc.top_k=8: read by dsc" in out


@pytest.mark.parametrize(
    ("setting", "pointer"),
    [
        ("seed=3", "--seeds"),
        ("name=x", "--study"),
        ("model.ffn=moe", "--methods"),
        ("model.ffn.kind=moe", "--methods"),
        ("model.ffn.top_k=3", "model.<kind>.FIELD"),
    ],
)
def test_settings_the_runner_owns_are_refused(setting, pointer, tmp_path, monkeypatch, capsys):
    status, err, _, _ = compare([*SWEEP, "--set", setting], tmp_path, monkeypatch, capsys)
    assert refused(status, err) and pointer in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.nope=1"], "unknown config key 'model.nope'"),
        (["--set", "nope.deeper=1"], "unknown config key 'nope.deeper'"),
        (["--set", "model.dsc=1"], "is a group of settings"),
        (["--set", "model.dsc.nope=1"], "unknown config key 'model.dsc.nope'"),
        (["--set", "model.moe.top_k=x"], "model.moe.top_k='x' is invalid"),
        (["--set", "seq_len=abc"], "seq_len='abc' is invalid"),
        (["--set", "optim.learning_rate=-1"], "optim.learning_rate=-1.0 is invalid"),
        (["--set", "seq_len"], "expected KEY=VALUE"),
        (["--set", "seq_len=8", "--set", "seq_len=9"], "given twice"),
        (["--steps", "3", "--set", "num_train_steps=4"], "--steps 3 sets it too"),
        (["--seeds", "a"], "--seeds 'a'"),
        (["--seeds", "0,0"], "names a seed twice"),
        (["--methods", "dsc,dsc"], "name a method twice"),
        (["--methods", "dsc", "--ablation", "top_k"], "ablations train DSC"),
        (["--no-latency", "--latency-rounds", "3"], "no latency is measured"),
        (["--set", 'data.paths=["a.txt"]'], "no run of this sweep reads it"),
    ],
)
def test_bad_settings_are_one_line_errors(args, message, tmp_path, monkeypatch, capsys):
    own = {"--seeds", "--methods"} & set(args)  # the case gives its own instead of SWEEP's
    sweep = ["--preset", "tiny"] if own else SWEEP
    status, err, _, _ = compare([*sweep, *args], tmp_path, monkeypatch, capsys)
    assert refused(status, err) and message in err, err


@pytest.mark.parametrize("option", ["--preset", "--seeds", "--methods", "--steps", "--study"])
def test_an_option_given_twice_is_refused(option, capsys):
    value = {"--preset": "tiny", "--seeds": "0", "--methods": "dsc", "--steps": "2"}
    args = ["--preset", "tiny", option, value.get(option, "x"), option, value.get(option, "x")]
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(args[2:] if option == "--preset" else args)
    assert stop.value.code == 2 and f"{option} given twice" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_a_setting_of_a_kind_the_sweep_does_not_train_is_refused(
    kind, tmp_path, monkeypatch, capsys
):
    others = [k for k in KINDS if k != kind]
    field = next(f.name for f in dataclasses.fields(FFN_CONFIGS[kind]))
    args = ["--preset", "tiny", "--methods", ",".join(others), "--seeds", "0"]
    args += ["--set", f"model.{kind}.{field}=3"]
    status, err, _, _ = compare(args, tmp_path, monkeypatch, capsys)
    assert refused(status, err) and f"no run of this sweep has a {kind} FFN" in err


@pytest.mark.parametrize("axis", runner.ABLATIONS[1:])
def test_a_setting_on_an_ablation_axis_is_refused_naming_both(axis, tmp_path, monkeypatch, capsys):
    """A --set on a key the ablation's variants set themselves would be overwritten."""
    variants = runner.ablation_variants(axis)
    own = sorted(set().union(*(runner._variant_keys(v) for v in variants)))
    if not own:  # the scale axis sets d_model through its factor: a --set composes with it
        assert axis == "scale"
        return
    key = own[0]
    value = get(STUDIES["tiny"].base(), key.replace("model.dsc.", "model.ffn."))
    args = ["--preset", "tiny", "--ablation", axis, "--seeds", "0"]
    status, err, _, _ = compare(
        [*args, "--set", f"{key}={json.dumps(value)}"], tmp_path, monkeypatch, capsys
    )
    owners = [v.name for v in variants if key in runner._variant_keys(v)]
    assert refused(status, err) and key in err and owners[0] in err, err


def test_a_run_that_does_not_read_a_setting_keeps_its_config(default_runs):
    study = STUDIES["tiny"]
    runs = runner.plan(
        study, "/x", runner.method_variants(KINDS), [0], None, {"bank_projection": "none"}
    )
    by_name = {r.variant.name: r for r in runs}
    assert by_name["dsc"].config.bank_projection == "none"
    assert by_name["dsc"].settings == {"bank_projection": "none"}
    for name in ("moe", "molora", "dense"):
        assert by_name[name].config.bank_projection == study.base().bank_projection
        assert by_name[name].settings == {}
        assert runner.fingerprint(by_name[name].config) == runner.fingerprint(
            default_runs[name].config
        )


# --- finished runs: reused exactly when the settings they read are unchanged ---------------


def _write_old_run(run: runner.Run) -> dict:
    """done.json + config.json as older code left them: a stale fingerprint, one FFN group
    per kind (``model.ffn`` the kind's name), a config.json without a key added since, with
    a field since removed and another value in an FFN group the run does not use."""
    os.makedirs(run.workdir)
    saved = config_lib.plain_config(run.config)
    group = saved["model"].pop("ffn")
    kind = group.pop("kind")
    saved["model"].update(ffn=kind, **{kind: group})
    unused = next(k for k in FFN_CONFIGS if k != run.variant.kind)
    fields = [f.name for f in dataclasses.fields(FFN_CONFIGS[unused])]
    saved["model"][unused] = {"field_removed_since": 0.02, fields[0]: 12345}
    added = next(k for k, v in sorted(saved["model"].items()) if not isinstance(v, dict | str))
    del saved["model"][added]  # as if added to the code since (at its default)
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
        json.dump({"config": saved, "model": {}}, f)
    with open(os.path.join(run.workdir, runner.DONE_FILE), "w") as f:
        json.dump({"fingerprint": "from-older-code", "step": 6, "final": {"eval_loss": 1.0}}, f)
    return saved


def test_finished_run_of_older_code_is_reused_and_a_changed_setting_refused(
    tmp_path, monkeypatch, capsys
):
    args = ["--preset", "tiny", "--methods", "moe", "--seeds", "0", "--results", str(tmp_path)]
    (run,) = runner.plan(
        STUDIES["tiny"], str(tmp_path / "tiny"), runner.method_variants(["moe"]), [0]
    )
    saved = _write_old_run(run)
    assert runner.run_state(run) == ("finished", "")
    assert cli.main([*args, "--plan"]) == 0
    assert f"{run.workdir}: finished" in capsys.readouterr().out
    # a setting the MoE run reads, changed on the command line: not this run
    assert cli.main([*args, "--plan", "--set", "model.moe.jitter_std=0.5"]) == 2
    err = capsys.readouterr().err
    assert "finished with another config (model.ffn.jitter_std: 0.01 -> 0.5)" in err
    # ... or changed in the saved run
    saved["model"]["moe"]["top_k"] = 1
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
        json.dump({"config": saved, "model": {}}, f)
    assert runner.run_state(run)[0] == "conflict"
    assert cli.main([*args, "--plan"]) == 2
    assert "model.ffn.top_k: 1 -> 2" in capsys.readouterr().err


def test_a_setting_only_other_runs_read_keeps_a_finished_baseline(tmp_path, monkeypatch, capsys):
    """DSC-only settings in a DSC + MoE sweep do not make the finished MoE run stale."""
    study = STUDIES["tiny"]
    (moe,) = runner.plan(study, str(tmp_path / "tiny"), runner.method_variants(["moe"]), [0])
    _write_old_run(moe)
    args = ["--preset", "tiny", "--methods", "dsc,moe", "--seeds", "0", "--results", str(tmp_path)]
    args += ["--set", "model.dsc.tau=5.0", "--set", "bank_projection=none", "--plan"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"{moe.workdir}: finished" in out and "dsc_seed0: train" in out


COMMITTED = [
    (preset, kind, seed)
    for preset in ("cpu_embedded", "cpu_wikitext")
    for kind in ("moe", "molora", "dense")
    for seed in STUDIES[preset].seeds
    if os.path.exists(REPO / "results" / preset / f"{kind}_seed{seed}" / runner.DONE_FILE)
]


@pytest.mark.parametrize(("preset", "kind", "seed"), COMMITTED)
def test_committed_baseline_runs_are_recognised_as_finished(preset, kind, seed, monkeypatch):
    """What ``dsc-compare --preset P --results results --plan`` decides for the committed
    baseline runs: finished (their config.json is in the older layout, and older than some
    of today's keys), with ``$DSC_WIKITEXT_RAW_DIR`` at the folder they read."""
    workdir = REPO / "results" / preset / f"{kind}_seed{seed}"
    with open(workdir / "config.json") as f:
        paths = json.load(f)["config"]["data"]["paths"]
    if preset == "cpu_wikitext":
        monkeypatch.setenv(WIKITEXT_RAW_DIR, os.path.dirname(paths[0]))
    study = STUDIES[preset]
    (run,) = runner.plan(
        study, str(REPO / "results" / preset), runner.method_variants([kind]), [seed]
    )
    assert runner.run_state(run) == ("finished", "")
