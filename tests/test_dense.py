"""DenseFFN (the paper's Dense baseline) against an independent float64 NumPy computation."""

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

from dsc_jax.layers.dense import DenseFFN

D, H = 16, 32
X_SHAPE = (2, 8, D)  # 16 tokens


def rng_key(seed: int) -> jax.Array:
    """PRNG key of the "rbg" kind: the layers are PRNG-agnostic and it compiles faster."""
    return jax.random.key(seed, impl="rbg")


def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_dense(params: dict, x: np.ndarray) -> np.ndarray:
    w1 = np.asarray(params["mlp_in"]["kernel"], np.float64)
    w2 = np.asarray(params["mlp_out"]["kernel"], np.float64)
    return np_gelu(np.asarray(x, np.float64) @ w1) @ w2


def make(**overrides) -> DenseFFN:
    return DenseFFN(**{"hidden_dim": H, "out_init_std": 0.1, **overrides})


def random_params(seed: int = 0) -> dict:
    """Unit-scale weights so that outputs are O(1) (NumPy RNG: no per-shape compilations)."""
    rng = np.random.default_rng(seed)
    return {
        "mlp_in": {"kernel": jnp.asarray(rng.standard_normal((D, H)) / math.sqrt(D), jnp.float32)},
        "mlp_out": {"kernel": jnp.asarray(rng.standard_normal((H, D)) / math.sqrt(H), jnp.float32)},
    }


def inputs(seed: int = 1, shape: tuple[int, ...] = X_SHAPE) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_param_tree_shapes_logical_axes_and_init():
    x = inputs()
    variables = jax.jit(make().init)(rng_key(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs == {
        "mlp_in": {"kernel": P("embed", "mlp")},
        "mlp_out": {"kernel": P("mlp", "embed")},
    }
    params = nn.unbox(variables["params"])
    assert jax.tree.map(jnp.shape, params) == {
        "mlp_in": {"kernel": (D, H)},
        "mlp_out": {"kernel": (H, D)},
    }
    # 512 samples each: the sample std is within ~10% of the target with overwhelming odds.
    np.testing.assert_allclose(np.std(params["mlp_in"]["kernel"]), 0.02, rtol=0.15)
    np.testing.assert_allclose(np.std(params["mlp_out"]["kernel"]), 0.1, rtol=0.15)
    # Boxed and unboxed trees give the same output.
    boxed, unboxed = jax.jit(lambda v, p: (make().apply(v, x), make().apply(p, x)))(
        {"params": variables["params"]}, {"params": params}
    )
    np.testing.assert_array_equal(boxed, unboxed)
    bf16_params = jax.eval_shape(make(param_dtype=jnp.bfloat16).init, rng_key(0), x)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(nn.unbox(bf16_params)))


class DenseVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("batched", X_SHAPE), ("matrix", (5, D)), ("vector", (D,)))
    def test_matches_numpy(self, shape):
        params, x = random_params(), inputs(shape=shape)
        y = self.variant(lambda p, v: make().apply({"params": p}, v))(params, x)
        assert y.shape == shape and y.dtype == jnp.float32
        # fp32 with "highest" matmul precision vs float64: errors ~1e-6 on O(1) values.
        np.testing.assert_allclose(y, np_dense(params, x), atol=1e-5, rtol=1e-5)


def test_dropout_bf16_and_gradients():
    params, x = random_params(), inputs()
    dropping = make(dropout_rate=0.5)

    @jax.jit
    def outputs(key0, key1):
        def train(key):
            return dropping.apply({"params": params}, x, deterministic=False, rngs={"dropout": key})

        def loss(p):
            return jnp.sum(make().apply({"params": p}, x) ** 2)

        return {
            "eval": make().apply({"params": params}, x),
            "eval_dropping": dropping.apply({"params": params}, x),
            "train0": train(key0),
            "train1": train(key1),
            "bf16": make(dtype=jnp.bfloat16).apply({"params": params}, x),
            "grads": jax.grad(loss)(params),
        }

    out = outputs(rng_key(0), rng_key(1))
    y_eval = np.asarray(out["eval"])
    np.testing.assert_array_equal(out["eval_dropping"], y_eval)
    y0 = np.asarray(out["train0"])
    assert not np.array_equal(y0, out["train1"])
    kept = y0 != 0
    assert 0.3 < kept.mean() < 0.7
    # Kept entries are rescaled by 1 / (1 - rate).
    np.testing.assert_allclose(y0[kept], 2.0 * y_eval[kept], atol=1e-6, rtol=1e-6)
    assert out["bf16"].dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa (relative step 2^-8 ≈ 0.4%); two matmuls over 16/32 terms
    # stay within 3% of the largest output magnitude.
    err = np.max(np.abs(np.asarray(out["bf16"], np.float32) - y_eval))
    assert err < 3e-2 * np.max(np.abs(y_eval))
    for leaf in jax.tree.leaves(out["grads"]):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"hidden_dim": 2.5}, "hidden_dim"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"dropout_rate": -0.1}, "dropout_rate"),
        ({"out_init_std": -1.0}, "out_init_std"),
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
