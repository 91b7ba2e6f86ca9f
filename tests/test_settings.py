"""Every setting given to ``dsc-train`` takes effect or is refused in one line: each leaf of
``base_config()`` changed through ``--config.KEY=VALUE`` reaches the run's ``config.json``
record, or the command refuses it; settings a run does not read are refused on the command
line, not compared on resume, and listed when a config file holds them."""

from __future__ import annotations

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
    put,
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


def train_config(monkeypatch, *overrides: str):
    """What ``dsc-train --config=configs/tiny.py OVERRIDES`` hands the trainer."""
    argv = ["dsc-train", f"--config={TINY}", *overrides, "--workdir=/nonexistent"]
    values = flags.FlagValues()
    cli.define_flags(values)
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from it
    cli.parse_flags(argv, values)
    return cli.load_config(values)


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


@pytest.mark.parametrize("key", leaf_keys())
def test_every_train_setting_reaches_config_json_or_is_refused(key, tiny, monkeypatch):
    """Keys the tiny run does not read (another FFN kind's, another data source's, a layer
    option of another mode) are given together with the choice that makes the run read them
    (``model.ffn``, ``data.source``, ``model.moe.dispatch``, ...) where one exists. The
    changed values are tried in turn until one is taken."""
    for value in changed_values(tiny, key):
        assert plain(value) != plain(get(tiny, key))
        enable = enabling_settings(tiny, key, value) or []
        args = [f"--config.{other}={cli_text(choice)}" for other, choice in enable]
        try:
            config = train_config(monkeypatch, *args, f"--config.{key}={cli_text(value)}")
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
        if key == "model.ffn":
            assert model["ffn"]["kind"] == value
        elif key.startswith(f"model.{config.model.ffn}."):
            assert model["ffn"][leaf] == plain(value)
        elif key.startswith("model.") and key.count(".") == 1:
            assert model[leaf] == plain(value)
        return


def test_a_flag_given_twice_is_refused(monkeypatch):
    with pytest.raises(SystemExit, match=r"--config\.seed given twice"):
        train_config(monkeypatch, "--config.seed=1", "--config.seed=2")


@pytest.mark.parametrize("kind", tuple(FFN_CONFIGS))
def test_other_ffn_groups_are_refused_on_the_command_line(kind, monkeypatch):
    other = next(k for k in FFN_CONFIGS if k != kind)
    with pytest.raises(ValueError) as err:
        train_config(
            monkeypatch,
            f"--config.model.ffn={kind}",
            f"--config.model.{other}.hidden_dim=7",
        )
    message = str(err.value)
    assert f"--config.model.{other}.hidden_dim=7" in message
    assert f"model.ffn={kind!r} builds model.{kind} only" in message and "\n" not in message
    # the same group in the config file is accepted (and listed for the log)
    config = train_config(monkeypatch, f"--config.model.ffn={kind}")
    put(config, f"model.{other}.hidden_dim", 7)
    changes = config_lib.unread_changes(config)
    assert (f"model.{other}.hidden_dim", 7) in [(k, v) for k, v, _ in changes]


def test_settings_a_run_does_not_read():
    config = load_config("tiny")
    config.model.ffn = "dense"
    unread = config_lib.unread_settings(config)
    for key in ("model.dsc", "model.moe", "model.molora", "bank_projection", "losses.frame"):
        assert key in unread
    for key in ("router_lr_multiplier", "losses.aux", "losses.z", "data.paths"):
        assert key in unread
    assert "model.dense" not in unread and "optim.learning_rate" not in unread
    config.model.ffn = "dsc"
    config.model.dsc.frame_regularizer = False
    unread = config_lib.unread_settings(config)
    assert "losses.frame" in unread and "losses.budget" not in unread
    assert "bank_projection" not in unread
    config.data.source, config.data.paths = "text_files", "a.txt"
    config.data.pipeline = "paper"
    unread = config_lib.unread_settings(config)
    assert "data.paths" not in unread and "data.calc_prob" not in unread
    assert "data.embedded_max_bytes" in unread and "data.tfds_train_split" in unread
    read = config_lib.read_settings(config)
    assert "dsc" in read["model"] and "moe" not in read["model"]
    assert "frame" not in read["losses"] and "embedded_max_bytes" not in read["data"]


def test_resume_ignores_what_the_run_does_not_read():
    """A MoE run saved by older code (an unused ``model.dsc`` group with a field since
    removed, another value in it) resumes; a change it reads is refused."""
    config = load_config("tiny")
    config.model.ffn = "moe"
    saved = config_lib.plain_config(config)
    saved["model"]["dsc"]["retired_field"] = 1.0
    saved["model"]["dsc"]["num_bases"] = 999
    saved["bank_projection"] = "none"
    del saved["model"]["dsc"]["tau"]
    assert config_lib.resume_changes(saved, config) == ([], [])
    saved["model"]["moe"]["top_k"] = 1
    allowed, refused = config_lib.resume_changes(saved, config)
    assert not allowed and [key for key, _, _ in refused] == ["model.moe.top_k"]


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
    for name, study in STUDIES.items():
        for run in runner.plan(study, "/x", runner.method_variants(study.methods), [0]):
            assert config_lib.unread_changes(run.config) == [], (name, run.variant.name)
