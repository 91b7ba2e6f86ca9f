"""MoLoRALayer (the MoLoRA baseline of the paper's complexity comparison) against an
independent float64 NumPy computation."""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from dsc_jax.layers.molora import MoLoRALayer

D, E, R, K, H = 16, 4, 3, 2, 32
X_SHAPE = (4, 8, D)  # N = 32 tokens
N = 32
MUTABLE = ["losses", "intermediates"]


def rng_key(seed: int) -> jax.Array:
    """PRNG key of the "rbg" kind: the layers are PRNG-agnostic and it compiles faster."""
    return jax.random.key(seed, impl="rbg")


def make(**overrides) -> MoLoRALayer:
    config = {"num_experts": E, "rank": R, "top_k": K, "hidden_dim": H, "out_init_std": 0.1}
    return MoLoRALayer(**{**config, **overrides})


def inputs(seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(X_SHAPE), jnp.float32)


def random_params(seed: int = 0) -> dict:
    """O(1) logits and a non-zero LoRA update (NumPy RNG: no per-shape XLA compilations)."""
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)

    return {
        "mlp_in": {"kernel": normal((D, H), 1 / math.sqrt(D))},
        "mlp_out": {"kernel": normal((H, D), 1 / math.sqrt(H))},
        "router": {"kernel": normal((D, E), 1 / math.sqrt(D)), "bias": normal((E,), 0.3)},
        "lora_a": normal((E, D, R), 1 / math.sqrt(D)),
        "lora_b": normal((E, R, D), 1 / math.sqrt(R)),
    }


def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def np_molora(params: dict, x: jax.Array, top_k: int = K) -> dict:
    """Float64 MoLoRA written from its definition (docs/method.md): router on raw x, softmax
    over the k logits."""
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(x, np.float64).reshape(-1, D)
    y = np_gelu(tokens @ p64["mlp_in"]["kernel"]) @ p64["mlp_out"]["kernel"]
    logits = tokens @ p64["router"]["kernel"] + p64["router"]["bias"]
    indices = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
    gates = np_softmax(np.take_along_axis(logits, indices, axis=-1))
    for token in range(len(tokens)):
        for choice in range(top_k):
            e = indices[token, choice]
            update = tokens[token] @ p64["lora_a"][e] @ p64["lora_b"][e]
            y[token] += gates[token, choice] * update
    load = np.bincount(indices.ravel(), minlength=E)
    aux = E / len(tokens) ** 2 * np.sum(np_softmax(logits).sum(0) * load)
    lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    return {
        "y": y.reshape(x.shape),
        "indices": indices,
        "gates": gates,
        "aux": aux,
        "z": np.mean(lse**2),
    }


def run(layer: MoLoRALayer, params: dict, x: jax.Array, **kwargs) -> tuple[jax.Array, dict]:
    """Apply with the "losses" and "intermediates" collections mutable."""
    return layer.apply({"params": params}, x, mutable=MUTABLE, **kwargs)


def test_param_tree_logical_axes_init_and_zero_lora_start():
    x = inputs()
    variables = jax.jit(make().init)(rng_key(0), x)
    assert nn.get_partition_spec(variables)["params"] == {
        "mlp_in": {"kernel": P("embed", "mlp")},
        "mlp_out": {"kernel": P("mlp", "embed")},
        "router": {"kernel": P("embed", "experts"), "bias": P("experts")},
        "lora_a": P("experts", "embed", "rank"),
        "lora_b": P("experts", "rank", "embed"),
    }
    params = nn.unbox(variables["params"])
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, random_params())
    np.testing.assert_array_equal(params["lora_b"], np.zeros((E, R, D)))
    np.testing.assert_array_equal(params["router"]["bias"], np.zeros(E))
    np.testing.assert_allclose(np.std(params["mlp_in"]["kernel"]), 0.02, rtol=0.15)
    np.testing.assert_allclose(np.std(params["mlp_out"]["kernel"]), 0.1, rtol=0.15)
    np.testing.assert_allclose(np.std(params["lora_a"]), 0.02, rtol=0.15)

    @jax.jit
    def outputs_and_grads(boxed, unboxed):
        def loss(p):
            return jnp.sum(make().apply({"params": p}, x) ** 2)

        return make().apply(boxed, x), make().apply(unboxed, x), jax.grad(loss)(params)

    y_boxed, y, grads = outputs_and_grads({"params": variables["params"]}, {"params": params})
    np.testing.assert_array_equal(y_boxed, y)
    # With B = 0 the layer is exactly the static FFN; A gets no gradient yet, B does.
    static_only = {**params, "lora_b": jnp.zeros((E, R, D)), "lora_a": jnp.zeros((E, D, R))}
    np.testing.assert_allclose(y, np_molora(static_only, x)["y"], atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(grads["lora_a"], np.zeros((E, D, R)))
    assert np.any(grads["lora_b"] != 0) and np.all(np.isfinite(grads["lora_b"]))


class MoLoRAVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("top1", 1), ("top2", 2), ("top_all", E))
    def test_matches_numpy(self, top_k):
        params, x = random_params(), inputs()
        y, state = self.variant(lambda p, v: run(make(top_k=top_k), p, v))(params, x)
        ref = np_molora(params, x, top_k)
        assert y.shape == X_SHAPE and y.dtype == jnp.float32
        # fp32 ("highest" matmuls) vs float64 on O(1) values: errors ~1e-6.
        np.testing.assert_allclose(y, ref["y"], atol=2e-5, rtol=1e-5)
        inter = state["intermediates"]
        indices = inter["top_k_indices"][0].reshape(N, top_k)
        np.testing.assert_array_equal(indices, ref["indices"])
        np.testing.assert_allclose(inter["gates"][0].reshape(N, top_k), ref["gates"], atol=1e-6)
        np.testing.assert_allclose(state["losses"]["aux"][0], ref["aux"], rtol=1e-5)
        np.testing.assert_allclose(state["losses"]["z"][0], ref["z"], rtol=1e-5)


def test_dropout_bf16_and_gradients():
    params, x = random_params(), inputs()
    dropping = make(dropout_rate=0.5)

    @jax.jit
    def outputs(key0, key1):
        def loss(p):
            y, state = run(make(), p, x)
            return jnp.sum(y**2) + state["losses"]["aux"][0] + state["losses"]["z"][0]

        def train(key):
            return dropping.apply({"params": params}, x, deterministic=False, rngs={"dropout": key})

        return {
            "eval": make().apply({"params": params}, x),
            "eval_dropping": dropping.apply({"params": params}, x),
            "train0": train(key0),
            "train1": train(key1),
            "bf16": make(dtype=jnp.bfloat16).apply({"params": params}, x.astype(jnp.bfloat16)),
            "grads": jax.grad(loss)(params),
        }

    out = outputs(rng_key(0), rng_key(1))
    y_eval = np.asarray(out["eval"])
    np.testing.assert_array_equal(out["eval_dropping"], y_eval)
    y0 = np.asarray(out["train0"])
    assert not np.array_equal(y0, out["train1"])
    kept = y0 != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y0[kept], 2 * y_eval[kept], atol=1e-6, rtol=1e-5)
    assert out["bf16"].dtype == jnp.bfloat16
    # Router stays float32; bf16 FFN and LoRA matmuls (8-bit mantissa, relative step
    # 2^-8) stay within 3% of the largest output magnitude.
    err = np.max(np.abs(np.asarray(out["bf16"], np.float32) - y_eval))
    assert err < 3e-2 * np.max(np.abs(y_eval))
    for leaf in jax.tree.leaves(out["grads"]):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"rank": 0}, "rank"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": E + 1}, "top_k"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"dropout_rate": 1.5}, "dropout_rate"),
        ({"out_init_std": -0.02}, "out_init_std"),
    ],
)
def test_bad_config_raises(overrides, field):
    with pytest.raises(ValueError, match=field):
        make(**overrides)


def test_bad_inputs_raise():
    variables = {"params": random_params()}
    with pytest.raises(ValueError, match="dtype"):
        make().apply(variables, jnp.ones(X_SHAPE, jnp.int32))
    with pytest.raises(ValueError, match="feature axis"):
        make().apply(variables, jnp.float32(1.0))
    with pytest.raises(ValueError, match="last dimension 8"):
        make().apply(variables, jnp.ones((2, 8)))
