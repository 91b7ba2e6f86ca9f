"""Every setting given to ``dsc-train`` takes effect or is refused in one line: each leaf of
``base_config()`` changed through ``--config.KEY=VALUE`` reaches the run's ``config.json``
record, or the command refuses it; settings a run does not read are refused on the command
line, not compared on resume, and listed when a config file holds them."""

from __future__ import annotations

import dataclasses
import sys

import pytest
from absl import flags

from dsc_jax import cli
from dsc_jax.layers.configs import FFN_CONFIGS, DSCConfig, MoEConfig
from dsc_jax.train import config as config_lib
from tests._settings import (
    changed_values,
    cli_text,
    enabling_settings,
    get,
    leaf_keys,
    plain,
)
from tests._train_utils import REPO, load_config

TINY = REPO / "configs" / "tiny.py"
# ml_collections loads config files with importlib's deprecated load_module
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def train_config(monkeypatch, *overrides: str, kind: str | None = None):
    """What ``dsc-train --config=configs/tiny.py[:KIND] OVERRIDES`` hands the trainer."""
    config = f"--config={TINY}" + (f":{kind}" if kind else "")
    argv = ["dsc-train", config, *overrides, "--workdir=/nonexistent"]
    values = flags.FlagValues()
    cli.define_flags(values)
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from it
    cli.parse_flags(argv, values)
    return cli.load_config(values)


#: (FFN kind of ``configs/tiny.py:KIND``, key): every leaf of the DSC run, and every FFN
#: field of the other kinds in a run of that kind.
CASES = [(None, key) for key in leaf_keys()] + [
    (kind, key)
    for kind in FFN_CONFIGS
    if kind != "dsc"
    for key in leaf_keys(config_lib.base_config(kind))
    if key.startswith("model.ffn.")
]


@pytest.mark.parametrize(("kind", "key"), CASES)
def test_every_train_setting_reaches_config_json_or_is_refused(kind, key, monkeypatch):
    """Keys the tiny run does not read (another data source's, a layer option of another
    mode) are given together with the choice that makes the run read them (``data.source``,
    ``model.ffn.dispatch``, ...) where one exists. The changed values are tried in turn
    until one is taken."""
    tiny = load_config("tiny", kind)
    for value in changed_values(tiny, key):
        assert plain(value) != plain(get(tiny, key))
        enable = enabling_settings(tiny, key, value) or []
        args = [f"--config.{other}={cli_text(choice)}" for other, choice in enable]
        try:
            override = f"--config.{key}={cli_text(value)}"
            config = train_config(monkeypatch, *args, override, kind=kind)
            record = config_lib.run_record(config, 256)  # what the trainer writes
        except SystemExit as stop:  # flag parsing: "dsc-train: error: ..." then a hint line
            first = str(stop.code).splitlines()[0]
            assert first.startswith("dsc-train: error:") and key in first, stop.code
            continue
        except ValueError as err:  # the CLI prints it as "dsc-train: error: <message>"
            assert "\n" not in str(err) and key.rsplit(".", 1)[-1] in str(err), err
            continue
        assert _flatten(plain(record["config"]))[key] == plain(value)
        model, leaf = record["model"], key.rsplit(".", 1)[-1]
        if key.startswith("model.ffn."):
            assert model["ffn"][leaf] == plain(value)
        elif key.startswith("model.") and key.count(".") == 1:
            assert model[leaf] == plain(value)
        return


def test_a_flag_given_twice_is_refused(monkeypatch):
    with pytest.raises(SystemExit, match=r"--config\.seed given twice"):
        train_config(monkeypatch, "--config.seed=1", "--config.seed=2")


@pytest.mark.parametrize("kind", tuple(FFN_CONFIGS))
def test_a_field_of_another_ffn_kind_is_refused_on_the_command_line(kind, monkeypatch):
    """The run config holds its own kind's FFN group only: another kind's field is an
    unknown key, and switching the kind on the command line names the way to pick it."""
    field = next(
        f.name
        for other in FFN_CONFIGS.values()
        for f in dataclasses.fields(other)
        if f.name not in {g.name for g in dataclasses.fields(FFN_CONFIGS[kind])}
    )
    with pytest.raises(SystemExit) as stop:
        train_config(monkeypatch, f"--config.model.ffn.{field}=7", kind=kind)
    first = str(stop.value.code).splitlines()[0]
    assert first.startswith("dsc-train: error:") and field in first
    other = next(k for k in FFN_CONFIGS if k != kind)
    with pytest.raises(ValueError) as err:
        train_config(monkeypatch, f"--config.model.ffn.kind={other}", kind=kind)
    message = str(err.value)
    assert f"model.ffn.kind={other!r} is invalid" in message and f":{other}" in message
    assert "\n" not in message


def test_settings_a_run_does_not_read():
    config = load_config("tiny", "dense")
    unread = config_lib.unread_settings(config)
    for key in ("bank_projection", "losses.frame", "losses.budget"):
        assert key in unread
    for key in ("router_lr_multiplier", "losses.aux", "losses.z", "data.paths"):
        assert key in unread
    assert not any(k.startswith("model.") for k in unread) and "optim.learning_rate" not in unread
    config = load_config("tiny")
    config.model.ffn.frame_regularizer = False
    unread = config_lib.unread_settings(config)
    assert "losses.frame" in unread and "losses.budget" not in unread
    assert "bank_projection" not in unread
    config.data.source, config.data.paths = "text_files", "a.txt"
    config.data.pipeline = "paper"
    unread = config_lib.unread_settings(config)
    assert "data.paths" not in unread and "data.calc_prob" not in unread
    assert "data.embedded_max_bytes" in unread and "data.tfds_train_split" in unread
    read = config_lib.read_settings(config)
    assert read["model"]["ffn"]["kind"] == "dsc"
    assert "frame" not in read["losses"] and "embedded_max_bytes" not in read["data"]


def test_resume_ignores_what_the_run_does_not_read():
    """A MoE run saved by older code (one group per FFN kind: an unused ``model.dsc`` group
    with a field since removed, another value in it) resumes; a change it reads is
    refused."""
    config = load_config("tiny", "moe")
    saved = config_lib.plain_config(config)
    group = saved["model"].pop("ffn")
    del group["kind"]
    saved["model"].update(ffn="moe", moe=group)
    saved["model"]["dsc"] = {"retired_field": 1.0, "num_bases": 999}
    saved["bank_projection"] = "none"
    assert config_lib.resume_changes(saved, config) == ([], [])
    saved["model"]["moe"]["top_k"] = 1
    allowed, refused = config_lib.resume_changes(saved, config)
    assert not allowed and [key for key, _, _ in refused] == ["model.ffn.top_k"]


def test_layer_options_of_another_mode_are_refused():
    with pytest.raises(ValueError, match=r"capacity_factor=2.0 is only read with dispatch="):
        MoEConfig(num_experts=4, top_k=2, hidden_dim=8, capacity_factor=2.0)
    MoEConfig(num_experts=4, top_k=2, hidden_dim=8, dispatch="capacity", capacity_factor=2.0)
    with pytest.raises(ValueError, match=r"tile_size=8 is only read with dispatch='sorted'"):
        MoEConfig(num_experts=4, top_k=2, hidden_dim=8, dispatch="dense", tile_size=8)
    MoEConfig(num_experts=4, top_k=2, hidden_dim=8, dispatch="sorted", tile_size=8)
    with pytest.raises(ValueError, match=r"product_key_aux='joint' is only read with router="):
        DSCConfig(num_bases=16, top_k=2, hidden_dim=8, product_key_aux="joint")
    DSCConfig(num_bases=16, top_k=2, hidden_dim=8, router="product_key", product_key_aux="joint")


CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_hold_no_setting_their_run_ignores(name):
    assert config_lib.unread_changes(load_config(name)) == []


def test_presets_hold_no_setting_their_runs_ignore():
    """The training recipes and every run of every dsc-compare study."""
    from dsc_jax.experiments import runner
    from dsc_jax.experiments.presets import STUDIES
    from dsc_jax.train.presets import PAPER_FFN_KINDS, paper_recipe

    for kind in PAPER_FFN_KINDS:
        assert config_lib.unread_changes(paper_recipe(kind)) == [], kind
        assert config_lib.unread_changes(load_config("tiny", kind)) == [], kind
    for name, study in STUDIES.items():
        for run in runner.plan(study, "/x", runner.method_variants(study.methods), [0]):
            assert config_lib.unread_changes(run.config) == [], (name, run.variant.name)
