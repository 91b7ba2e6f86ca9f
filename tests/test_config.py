"""Config validation (before any compute) and the shipped configs (paper = the paper's Table 2)."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import pytest

from dsc_jax.train.config import base_config, model_config, validate_config
from tests._train_utils import load_config

CONFIGS = ("default", "tiny", "paper_dsc", "paper_moe", "paper_dense", "paper_molora")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    config = load_config(name)
    validate_config(config)
    assert config.name == name


def _set(config, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    with node.ignore_type():
        node[last] = value


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bank_projection", "sphere", "config.bank_projection='sphere' is not allowed"),
        ("micro_batches", 3, "config.micro_batches=3 is invalid; expected a divisor"),
        ("num_train_steps", 0, "config.num_train_steps=0 is invalid"),
        ("seed", -1, "config.seed=-1 is invalid"),
        ("keep_checkpoints", 0, "config.keep_checkpoints=0 is invalid"),
        ("router_lr_multiplier", 0.0, "config.router_lr_multiplier=0.0 is invalid"),
        ("async_checkpointing", "yes", "config.async_checkpointing='yes' is not allowed"),
        ("optim.learning_rate", -1e-3, "optim.learning_rate=-0.001 is invalid"),
        ("optim.warmup_steps", 5000, "optim.warmup_steps=5000 is invalid"),
        ("optim.min_learning_rate", 1.0, "optim.min_learning_rate=1.0 is invalid"),
        ("optim.b2", 1.0, "optim.b2=1.0 is invalid"),
        ("model.ffn.kind", "mlp", "model.ffn.kind='mlp' is not allowed"),
        ("model.ffn.kind", "moe", "model.ffn.kind='moe' is invalid: model.ffn holds the fields"),
        ("model.ffn", "moe", "model.ffn='moe' is invalid; expected the group of one FFN kind"),
        ("model.max_seq_len", 16, "model.max_seq_len=16 is invalid"),
        ("model.ffn.top_k", 5000, "model.ffn: DSCLayer.top_k=5000 is invalid"),
        ("model.ffn.tau", float("inf"), "model.ffn: DSCLayer.tau=inf is invalid"),
        ("model.dtype", "int8", "GPTConfig.dtype='int8' is not allowed"),
        ("optim.decay_gamma", "no", "optim.decay_gamma='no' is not allowed"),
        ("losses.frame", -1.0, "LossWeights.frame=-1.0 is invalid"),
        ("data.source", "imagenet", "data.source='imagenet' is not allowed"),
        ("mesh.shape", (2, -1, -1), "mesh.shape=(2, -1, -1) is invalid"),
        ("mesh.logical_axis_rules", "bases=nowhere", "mesh.logical_axis_rules='bases=nowhere'"),
        ("mesh.logical_axis_rules", "base=tensor", "unknown logical name 'base'"),
        ("model.ffn.tau", float("nan"), "model.ffn: DSCLayer.tau=nan is invalid"),
        ("start_over", "yes", "config.start_over='yes' is not allowed"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, message):
    config = base_config()
    _set(config, key, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_config(config)


def test_bad_value_of_another_kind_names_its_group():
    config = base_config("moe")
    config.model.ffn.dispatch = "x"
    with pytest.raises(ValueError, match=re.escape("model.ffn: MoELayer.dispatch='x' is not")):
        validate_config(config)


@pytest.mark.parametrize("kind", ["dense", "moe", "molora", "dsc"])
def test_the_run_config_holds_the_chosen_kinds_group_only(kind):
    from dsc_jax.layers.configs import FFN_CONFIGS

    config = base_config(kind)
    fields = {f.name for f in dataclasses.fields(FFN_CONFIGS[kind])}
    assert set(config.model.ffn) == fields | {"kind"} and config.model.ffn.kind == kind
    assert not set(config.model) & set(FFN_CONFIGS)  # no group per kind
    assert model_config(config).ffn == FFN_CONFIGS[kind]()
    del config.model.ffn["top_k" if kind != "dense" else "init_std"]
    with pytest.raises(ValueError, match=r"model.ffn: missing key\(s\)"):
        validate_config(config)


def test_config_files_take_the_ffn_kind_as_their_argument():
    """``--config=configs/tiny.py:moe``: the kind's group with the preset's sizes."""
    config = load_config("tiny", "moe")
    validate_config(config)
    assert config.model.ffn.kind == "moe" and config.model.ffn.num_experts == 4
    with pytest.raises(ValueError, match=r"tiny: ffn_kind='mlp' is not allowed"):
        load_config("tiny", "mlp")


@pytest.mark.parametrize("group", [None, "model", "optim", "data", "losses", "mesh"])
def test_unknown_key_is_rejected(group):
    config = base_config()
    node = config if group is None else config[group]
    node.no_such_key = 1
    with pytest.raises(ValueError, match=r"unknown (key|field)\(s\) \['no_such_key'\]"):
        validate_config(config)


def test_model_takes_vocab_and_length_from_data_and_run():
    config = base_config()
    model = model_config(config, vocab_size=50304)
    assert (model.vocab_size, model.max_seq_len) == (50304, config.seq_len)
    config.model.vocab_size = 256
    with pytest.raises(ValueError, match=re.escape("model.vocab_size=256 is invalid")):
        model_config(config, vocab_size=50304)


def test_paper_configs_are_the_papers_recipe():
    for ffn in ("dsc", "moe", "dense", "molora"):
        c = load_config(f"paper_{ffn}")
        assert c.model.ffn.kind == ffn and c.seed == 42
        assert (c.model.d_model, c.model.num_layers, c.model.num_heads, c.seq_len) == (
            384, 6, 6, 256,
        )  # fmt: skip
        assert c.model.dropout_rate == 0.1 and c.model.tie_embeddings
        assert (c.batch_size, c.micro_batches, c.batch_size // c.micro_batches) == (128, 8, 16)
        o = c.optim
        assert (o.learning_rate, o.min_learning_rate, o.warmup_steps, o.decay_steps) == (
            6e-4, 6e-5, 150, 2000,
        )  # fmt: skip
        assert (o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip_norm) == (0.9, 0.95, 1e-8, 0.02, 1)
        assert c.router_lr_multiplier == 5.0 and c.num_train_steps == 2000
        assert (c.eval_every_steps, c.eval_batches, c.eval_batch_size) == (250, 50, 16)
        assert (c.losses.aux, c.losses.budget, c.losses.frame, c.losses.z) == (
            0.01, 0.01, 0.001, 1e-4,
        )  # fmt: skip
        d = c.data
        assert (d.source, d.tokenizer, d.pipeline) == ("wikitext103", "gpt2", "paper")
        assert (d.max_chars, d.calc_prob, d.min_line_chars, d.train_fraction) == (
            20_000_000, 0.15, 10, 0.9,
        )  # fmt: skip
    dsc = model_config(load_config("paper_dsc"), 50304).ffn
    assert (dsc.kind, dsc.num_bases, dsc.top_k, dsc.hidden_dim) == ("dsc", 1523, 4, 327)
    moe = model_config(load_config("paper_moe"), 50304).ffn
    assert (moe.kind, moe.num_experts, moe.top_k, moe.hidden_dim) == ("moe", 5, 2, 545)
    dense = model_config(load_config("paper_dense"), 50304).ffn
    assert (dense.kind, dense.hidden_dim) == ("dense", 2611)


def test_resume_allow_list_is_key_path_based_and_refuses_new_keys():
    """Cadence and paths may change on resume; anything else (including keys added later, or
    a nested model section after a rename) must match."""
    from dsc_jax.train.config import is_mutable_on_resume, plain_config, resume_changes

    saved = plain_config(base_config())
    config = base_config()
    config.num_train_steps = 5000
    config.compilation_cache_dir = "/elsewhere"
    config.model.ffn.compute = "dense"
    config.model.ffn.top_k = 2
    config.model.dtype = "bfloat16"
    config.losses.budget = 0.5
    allowed, refused = resume_changes(saved, config)
    assert [k for k, _, _ in allowed] == [
        "compilation_cache_dir",
        "model.ffn.compute",
        "num_train_steps",
    ]
    assert [k for k, _, _ in refused] == ["losses.budget", "model.dtype", "model.ffn.top_k"]
    assert not is_mutable_on_resume("model.ffn.top_k") and not is_mutable_on_resume("brand_new")
    assert is_mutable_on_resume("model.ffn.compute")
    # A key the saved config lacks is unchanged at its default, refused otherwise.
    del saved["start_over"]
    assert resume_changes(saved, base_config()) == ([], [])
    saved["removed_key"] = 1
    assert [k for k, _, _ in resume_changes(saved, base_config())[1]] == ["removed_key"]


def test_a_config_saved_in_the_older_layout_is_compared_by_its_kinds_group():
    """Older runs saved one group per FFN kind and ``model.ffn`` as the kind's name: the
    group of that kind is compared, the others ignored, a field added since (``init_std``)
    counts as unchanged at its default."""
    from dsc_jax.train.config import plain_config, resume_changes, upgrade_saved

    config = base_config("moe")
    new = plain_config(config)
    old = {**new, "model": {k: v for k, v in new["model"].items() if k != "ffn"}}
    group = {k: v for k, v in new["model"]["ffn"].items() if k not in ("kind", "init_std")}
    old["model"].update(ffn="moe", moe=group, dsc={"num_bases": 7, "gone": 1}, dense={})
    assert upgrade_saved(old)["model"]["ffn"] == {"kind": "moe", **group}
    assert resume_changes(old, config) == ([], [])
    old["model"]["moe"] = {**group, "top_k": 1}
    assert [k for k, _, _ in resume_changes(old, config)[1]] == ["model.ffn.top_k"]
    old["model"]["ffn"] = "mlp"
    with pytest.raises(ValueError, match=r"model.ffn='mlp' without"):
        resume_changes(old, config)


@pytest.mark.parametrize("kind", ["dense", "moe", "molora", "dsc"])
def test_ffn_config_fields_are_the_layers(kind):
    """Every Linen field of the layer (less what the model supplies) is a config field with
    the layer's default; only the sizes the layer requires and ``out_init_std`` differ."""
    from dsc_jax import paper
    from dsc_jax.layers.configs import FFN_CONFIGS, MODEL_FIELDS

    cls = FFN_CONFIGS[kind]
    layer = {f.name: f for f in dataclasses.fields(cls.layer_class) if f.name not in MODEL_FIELDS}
    config = {f.name: f for f in dataclasses.fields(cls)}
    assert list(config) == list(layer)
    own = {n for n, f in layer.items() if f.default is dataclasses.MISSING} | {"out_init_std"}
    for name, f in layer.items():
        if name not in own:
            assert config[name].default == f.default, name
    assert cls().out_init_std == (paper.INIT_STD if kind == "dsc" else None)
    made = cls().make(dropout_rate=0.1, out_init_std=0.5)
    for name in layer:
        if name != "out_init_std":
            assert getattr(made, name) == getattr(cls(), name), name


def test_a_field_added_to_a_layer_is_in_its_config():
    import flax.linen as nn

    from dsc_jax.layers.configs import _FFNConfig, _from_layer

    class Layer(nn.Module):
        width: int
        new_option: float = 0.5
        dropout_rate: float = 0.0
        dtype: object = None
        param_dtype: object = None

        def __call__(self, x):
            return x

    @_from_layer(Layer, width=3)
    class LayerConfig(_FFNConfig):
        kind: ClassVar[str] = "test"

    assert [f.name for f in dataclasses.fields(LayerConfig)] == ["width", "new_option"]
    assert LayerConfig().make().new_option == 0.5
    with pytest.raises(TypeError, match=r"Layer.width needs a default"):
        _from_layer(Layer)(type("NoSizes", (_FFNConfig,), {}))
