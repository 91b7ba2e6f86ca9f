"""Config validation (before any compute) and the shipped configs (paper = the paper's Table 2)."""

from __future__ import annotations

import re

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
        ("model.ffn", "mlp", "model.ffn='mlp' is not allowed"),
        ("model.max_seq_len", 16, "model.max_seq_len=16 is invalid"),
        ("model.dsc.top_k", 5000, "model.dsc: DSCLayer.top_k=5000 is invalid"),
        ("model.dsc.tau", float("inf"), "model.dsc: DSCLayer.tau=inf is invalid"),
        ("model.moe.dispatch", "x", "model.moe: MoELayer.dispatch='x' is not allowed"),
        ("model.dtype", "int8", "GPTConfig.dtype='int8' is not allowed"),
        ("optim.decay_gamma", "no", "optim.decay_gamma='no' is not allowed"),
        ("losses.frame", -1.0, "LossWeights.frame=-1.0 is invalid"),
        ("data.source", "imagenet", "data.source='imagenet' is not allowed"),
        ("mesh.shape", (2, -1, -1), "mesh.shape=(2, -1, -1) is invalid"),
        ("mesh.logical_axis_rules", "bases=nowhere", "mesh.logical_axis_rules='bases=nowhere'"),
        ("mesh.logical_axis_rules", "base=tensor", "unknown logical name 'base'"),
        ("model.dsc.tau", float("nan"), "model.dsc: DSCLayer.tau=nan is invalid"),
        ("start_over", "yes", "config.start_over='yes' is not allowed"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, message):
    config = base_config()
    _set(config, key, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_config(config)


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


def test_paper_configs_are_spec_section_7():
    for ffn in ("dsc", "moe", "dense", "molora"):
        c = load_config(f"paper_{ffn}")
        assert c.model.ffn == ffn and c.seed == 42
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
    config.model.dsc.compute = "dense"
    config.model.dsc.top_k = 2
    config.model.dtype = "bfloat16"
    config.losses.budget = 0.5
    allowed, refused = resume_changes(saved, config)
    assert [k for k, _, _ in allowed] == [
        "compilation_cache_dir",
        "model.dsc.compute",
        "num_train_steps",
    ]
    assert [k for k, _, _ in refused] == ["losses.budget", "model.dsc.top_k", "model.dtype"]
    assert not is_mutable_on_resume("model.ffn.top_k") and not is_mutable_on_resume("brand_new")
    assert is_mutable_on_resume("model.ffn.compute")
    # A key the saved config lacks is unchanged at its default, refused otherwise.
    del saved["start_over"]
    assert resume_changes(saved, base_config()) == ([], [])
    saved["removed_key"] = 1
    assert [k for k, _, _ in resume_changes(saved, base_config())[1]] == ["removed_key"]
