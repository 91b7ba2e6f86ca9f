"""GPT model: shapes per FFN kind, causality, tied head, init scales, dropout, logical axes."""

from __future__ import annotations

import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dsc_jax.layers.configs import DenseConfig, DSCConfig, MoEConfig, MoLoRAConfig
from dsc_jax.models.attention import causal_mask
from dsc_jax.models.gpt import GPT, GPTConfig

KINDS = ("dense", "moe", "molora", "dsc")
TINY = dict(vocab_size=64, max_seq_len=16, num_layers=2, num_heads=2, d_model=32)
TINY_FFN = {
    "dense": DenseConfig(hidden_dim=64),
    "moe": MoEConfig(num_experts=4, hidden_dim=16),
    "molora": MoLoRAConfig(num_experts=4, rank=4, hidden_dim=32),
    "dsc": DSCConfig(num_bases=16, hidden_dim=32),
}


# Tiny graphs: skip XLA's backend optimisations, compile time dominates (numerics unchanged).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def tiny_config(ffn: str, ffn_fields: dict | None = None, **overrides) -> GPTConfig:
    ffn_config = TINY_FFN[ffn].replace(**(ffn_fields or {}))
    return GPTConfig(**{**TINY, "ffn": ffn_config, **overrides})


def random_tokens(seed: int, batch: int = 2, seq_len: int = 16, vocab: int = 64) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, vocab, jnp.int32)


@functools.cache
def compiled(kind: str):
    """``(cfg, model, params, forward)`` for ``tiny_config(kind)``; ``forward`` is jitted and
    always called on ``[4, 16]`` tokens, so each kind compiles once per test process."""
    cfg = tiny_config(kind)
    model = GPT(cfg)
    params = nn.unbox(fast_jit(model.init)(jax.random.key(0), random_tokens(0))["params"])
    forward = fast_jit(lambda p, tokens: model.apply({"params": p}, tokens))
    return cfg, model, params, forward


@pytest.fixture(params=KINDS)
def tiny_model(request):
    return compiled(request.param)


def test_output_shape_dtype_and_causality(tiny_model):
    """Shapes/dtype, and: changing token t changes no logit at positions < t (float32, exact)."""
    cfg, _, params, forward = tiny_model
    tokens = random_tokens(2)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % cfg.vocab_size)
    logits = forward(params, jnp.concatenate([tokens, changed]))
    chex.assert_shape(logits, (4, 16, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    base, other = logits[:2], logits[2:]
    np.testing.assert_allclose(base[:, :9], other[:, :9], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(base[:, 9:] - other[:, 9:]))) > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_logical_axis_names_on_every_param(kind):
    """Every parameter of >= 1 axis has one logical name per axis, none of them None."""
    model = GPT(tiny_config(kind))
    boxed = jax.eval_shape(model.init, jax.random.key(0), random_tokens(0))["params"]
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    shapes = traverse_util.flatten_dict(nn.unbox(boxed))
    assert specs.keys() == shapes.keys()
    for path, value in shapes.items():
        if value.ndim == 0:
            continue
        spec = specs[path]
        assert len(spec) == value.ndim, (path, spec, value.shape)
        assert all(name is not None for name in spec), (path, spec)


def test_param_tree_and_tied_head():
    cfg, _, params, forward = compiled("dense")
    assert set(params) == {"wte", "wpe", "block_0", "block_1", "ln_f"}
    assert set(params["block_0"]) == {"ln_1", "attn", "ln_2", "ffn"}
    assert set(params["block_0"]["attn"]) == {"query", "key", "value", "out"}
    chex.assert_shape(params["wte"]["embedding"], (64, 32))
    chex.assert_shape(params["wpe"]["embedding"], (16, 32))
    chex.assert_shape(params["block_0"]["attn"]["query"]["kernel"], (32, 2, 16))
    chex.assert_shape(params["block_0"]["attn"]["out"]["kernel"], (2, 16, 32))
    # The head is wte: with ln_f mapping every state to the all-ones vector, logit v is
    # sum(wte[v]), and scaling wte by 2 (input embeddings too) scales the logits by 2.
    ones = jnp.ones((cfg.d_model,))
    frozen = {**params, "ln_f": {"scale": 0 * ones, "bias": ones}}
    scaled = {**frozen, "wte": {"embedding": 2.0 * params["wte"]["embedding"]}}
    tokens = random_tokens(3, batch=4)
    a, b = forward(frozen, tokens), forward(scaled, tokens)
    expected = jnp.broadcast_to(params["wte"]["embedding"].sum(-1), a.shape)
    np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, 2.0 * a, rtol=1e-5, atol=1e-6)

    untied = GPT(tiny_config("dense", tie_embeddings=False))
    untied_params = jax.eval_shape(untied.init, jax.random.key(0), tokens)["params"]
    assert set(untied_params) == set(params) | {"lm_head"}
    chex.assert_shape(nn.unbox(untied_params)["lm_head"]["kernel"], (32, 64))


def test_init_standard_deviations():
    """Std of 128x128-sized matrices within 5 % of normal(0.02) / normal(0.02 / sqrt(2L))
    (sampling error of a std over 16384 draws is about 0.6 %)."""
    cfg = GPTConfig(
        vocab_size=256,
        max_seq_len=8,
        num_layers=2,
        num_heads=4,
        d_model=128,
        ffn=DenseConfig(hidden_dim=128),
    )
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(fast_jit(GPT(cfg).init)(jax.random.key(0), tokens)["params"])
    resid = 0.02 / math.sqrt(2 * cfg.num_layers)
    assert cfg.residual_init_std == pytest.approx(resid)
    block = params["block_1"]
    expected = {
        "wte": (params["wte"]["embedding"], 0.02),
        "query": (block["attn"]["query"]["kernel"], 0.02),
        "attn_out": (block["attn"]["out"]["kernel"], resid),
        "ffn_in": (block["ffn"]["mlp_in"]["kernel"], 0.02),
        "ffn_out": (block["ffn"]["mlp_out"]["kernel"], resid),
    }
    for name, (value, std) in expected.items():
        assert float(jnp.std(value)) == pytest.approx(std, rel=0.05), name
        assert abs(float(jnp.mean(value))) < 0.1 * std, name
    np.testing.assert_array_equal(block["ln_1"]["scale"], 1.0)
    np.testing.assert_array_equal(block["ln_1"]["bias"], 0.0)


def test_dropout_only_when_not_deterministic():
    _, _, params, forward = compiled("dsc")
    model = GPT(tiny_config("dsc", dropout_rate=0.5))
    tokens = random_tokens(4, batch=4)

    @fast_jit
    def run(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        def one(key: jax.Array, deterministic: bool) -> jax.Array:
            rngs = {"dropout": key}
            return model.apply({"params": params}, tokens, deterministic=deterministic, rngs=rngs)

        return (
            jax.vmap(lambda key: one(key, True))(keys),
            jax.vmap(lambda key: one(key, False))(keys),
        )

    keys = jnp.stack([jax.random.key(1), jax.random.key(1), jax.random.key(2)])
    evals, trains = run(keys)
    eval_logits = forward(params, tokens)  # dropout 0.1 config, deterministic: no rng needed
    for i in range(3):
        np.testing.assert_allclose(evals[i], eval_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(trains[0], trains[1])
    assert float(jnp.max(jnp.abs(trains[0] - eval_logits))) > 1e-3
    assert float(jnp.max(jnp.abs(trains[0] - trains[2]))) > 1e-3


def test_bfloat16_compute_keeps_float32_logits_and_params():
    cfg = tiny_config("dense", dtype="bfloat16")
    assert cfg.compute_dtype == jnp.bfloat16 and cfg.params_dtype == jnp.float32
    model = GPT(cfg)

    @fast_jit
    def init_and_run(key: jax.Array, tokens: jax.Array) -> tuple[dict, jax.Array]:
        params = model.init(key, tokens)["params"]
        return params, model.apply({"params": params}, tokens)

    params, logits = init_and_run(jax.random.key(0), random_tokens(5))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.unbox(params)))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


def test_bad_inputs_raise():
    _, model, params, _ = compiled("dense")
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model.apply({"params": params}, jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"ffn": "conv"}, "GPTConfig.ffn="),
        ({"d_model": 33}, "GPTConfig.d_model="),
        ({"num_layers": 0}, "GPTConfig.num_layers="),
        ({"dropout_rate": 1.0}, "GPTConfig.dropout_rate="),
        ({"dtype": "float64"}, "GPTConfig.dtype="),
        ({"param_dtype": jnp.float32}, "GPTConfig.param_dtype="),
        ({"remat": "some"}, "GPTConfig.remat="),
        ({"tie_embeddings": "yes"}, "GPTConfig.tie_embeddings="),
        ({"attention": "flash"}, "GPTConfig.attention="),
        ({"attention": "xla"}, "attention_dropout=False"),  # dropout on probabilities
    ],
)
def test_bad_config_raises_naming_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, "ffn": TINY_FFN["dense"], **overrides})


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: DSCConfig(num_bases=16, top_k=17), "DSCLayer.top_k=17"),
        (lambda: MoEConfig(top_k=0), "MoELayer.top_k=0"),
        (lambda: MoEConfig(dispatch="sparse"), "MoELayer.dispatch='sparse'"),
        (lambda: DSCConfig(variant="fancy"), "DSCLayer.variant='fancy'"),
        (lambda: DSCConfig(tau=0.0), "DSCLayer.tau=0.0"),
        (lambda: DSCConfig(tau=float("inf")), "DSCLayer.tau=inf"),
        (lambda: MoLoRAConfig(rank=2.5), "MoLoRALayer.rank=2.5"),
        (lambda: DenseConfig(hidden_dim=0), "DenseFFN.hidden_dim=0"),
    ],
)
def test_bad_ffn_config_raises_naming_field(make, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        make()


def test_config_dict_round_trip():
    cfg = tiny_config("moe", {"dispatch": "capacity"})
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["ffn"]["kind"] == "moe"
    with pytest.raises(ValueError, match="unknown field"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embd": 3})
    with pytest.raises(ValueError, match="MoEConfig: unknown field"):
        GPTConfig.from_dict({**cfg.to_dict(), "ffn": {"kind": "moe", "num_bases": 3}})
    assert GPTConfig().ffn == DSCConfig(num_bases=1523, top_k=4, hidden_dim=327)
    assert MoEConfig().hidden_dim == 545


def test_causal_mask_with_offset():
    np.testing.assert_array_equal(causal_mask(2, 4, offset=2), [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_dot_product_attention_matches_einsum():
    """``attention="xla"`` (:func:`jax.nn.dot_product_attention`) computes the einsum path's
    function: logits, training-mode logits (residual dropout, same key) and parameter
    gradients agree to float32 round-off (atol 1e-5 on O(1) logits, rtol 1e-4 on grads)."""
    base = tiny_config("dense", attention_dropout=False)
    fused = base.replace(attention="xla")
    tokens = random_tokens(3)
    params = nn.unbox(fast_jit(GPT(base).init)(jax.random.key(0), tokens)["params"])
    key = jax.random.key(5)

    def loss(cfg, p, deterministic):
        logits = GPT(cfg).apply({"params": p}, tokens, deterministic, rngs={"dropout": key})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    for deterministic in (True, False):
        (_, y_ref), g_ref = fast_jit(
            jax.value_and_grad(
                functools.partial(loss, base, deterministic=deterministic), has_aux=True
            )
        )(params)
        (_, y_new), g_new = fast_jit(
            jax.value_and_grad(
                functools.partial(loss, fused, deterministic=deterministic), has_aux=True
            )
        )(params)
        np.testing.assert_allclose(y_new, y_ref, rtol=0, atol=1e-5)
        chex.assert_trees_all_close(g_new, g_ref, rtol=1e-4, atol=1e-7)
    # causality holds on the fused path too: a later token does not move earlier logits
    changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % 64)
    apply = fast_jit(GPT(fused).apply)
    np.testing.assert_allclose(
        apply({"params": params}, changed)[:, :-1],
        apply({"params": params}, tokens)[:, :-1],
        rtol=0,
        atol=1e-6,
    )
