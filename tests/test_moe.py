"""MoELayer (the paper's Standard MoE baseline, Table 1) against an independent float64 NumPy
computation."""

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

from dsc_jax.layers.moe import MoELayer, expert_capacity

D, E, K, H = 16, 4, 2, 32
X_SHAPE = (4, 8, D)  # N = 32 tokens
N = 32
MUTABLE = ["losses", "intermediates"]
NO_DROP = {"dispatch": "capacity", "capacity_factor": float(E)}  # C = min(N, N·k) = N


def rng_key(seed: int) -> jax.Array:
    """PRNG key of the "rbg" kind: the layers are PRNG-agnostic and it compiles faster."""
    return jax.random.key(seed, impl="rbg")


def make(**overrides) -> MoELayer:
    config = {"num_experts": E, "top_k": K, "hidden_dim": H, "out_init_std": 0.1}
    return MoELayer(**{**config, **overrides})


def inputs(seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(X_SHAPE), jnp.float32)


def random_params(seed: int = 0) -> dict:
    """O(1) logits and outputs so that absolute tolerances are meaningful (NumPy RNG: no
    per-shape XLA compilations)."""
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)

    return {
        "router_norm": {"scale": 1.0 + normal((D,), 0.1), "bias": normal((D,), 0.1)},
        "router": {"kernel": normal((D, E), 1 / math.sqrt(D))},
        "expert_in": normal((E, D, H), 1 / math.sqrt(D)),
        "expert_out": normal((E, H, D), 1 / math.sqrt(H)),
    }


def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_moe(params: dict, x: jax.Array, top_k: int = K, capacity: int | None = None) -> dict:
    """Float64 MoE written from the paper's reference code; ``capacity`` drops slots (first
    choices first)."""
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(x, np.float64).reshape(-1, D)
    mean = tokens.mean(-1, keepdims=True)
    var = ((tokens - mean) ** 2).mean(-1, keepdims=True)
    normed = (tokens - mean) / np.sqrt(var + 1e-5) * p64["router_norm"]["scale"]
    normed = normed + p64["router_norm"]["bias"]
    logits = normed @ p64["router"]["kernel"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    indices = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    gates = np.take_along_axis(probs, indices, axis=-1)
    kept = np.ones(indices.shape, bool)
    if capacity is not None:
        filled = np.zeros(E, int)
        for choice in range(top_k):
            for token in range(len(tokens)):
                expert = indices[token, choice]
                kept[token, choice] = filled[expert] < capacity
                filled[expert] += 1
    y = np.zeros_like(tokens)
    for token in range(len(tokens)):
        for choice in range(top_k):
            if kept[token, choice]:
                e = indices[token, choice]
                hidden = np_gelu(tokens[token] @ p64["expert_in"][e])
                y[token] += gates[token, choice] * hidden @ p64["expert_out"][e]
    load = np.bincount(indices.ravel(), minlength=E)
    aux = E / len(tokens) ** 2 * np.sum(probs.sum(0) * load)
    lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    return {
        "y": y.reshape(x.shape),
        "indices": indices,
        "gates": gates,
        "dropped_fraction": 1.0 - kept.mean(),
        "aux": aux,
        "z": np.mean(lse**2),
    }


def run(layer: MoELayer, params: dict, x: jax.Array, **kwargs) -> tuple[jax.Array, dict]:
    """Apply with the "losses" and "intermediates" collections mutable."""
    return layer.apply({"params": params}, x, mutable=MUTABLE, **kwargs)


def test_param_tree_shapes_logical_axes_and_init():
    layer = make(dispatch="dense")  # the cheapest mode to compile; parameters are the same
    variables = jax.jit(layer.init)(rng_key(0), inputs())
    assert nn.get_partition_spec(variables)["params"] == {
        "router_norm": {"scale": P("embed"), "bias": P("embed")},
        "router": {"kernel": P("embed", "experts")},
        "expert_in": P("experts", "embed", "mlp"),
        "expert_out": P("experts", "mlp", "embed"),
    }
    params = nn.unbox(variables["params"])
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, random_params())
    np.testing.assert_array_equal(params["router_norm"]["scale"], np.ones(D))
    np.testing.assert_array_equal(params["router_norm"]["bias"], np.zeros(D))
    # >= 2048 samples for the experts: sample std within a few % of the target.
    np.testing.assert_allclose(np.std(params["expert_in"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(params["expert_out"]), 0.1, rtol=0.1)
    np.testing.assert_allclose(np.std(params["router"]["kernel"]), 0.02, rtol=0.25)  # 64 samples
    # Boxed and unboxed trees give the same output (one compilation for both).
    boxed, unboxed = jax.jit(lambda v, p, x: (layer.apply(v, x), layer.apply(p, x)))(
        {"params": variables["params"]}, {"params": params}, inputs()
    )
    np.testing.assert_array_equal(boxed, unboxed)


class MoEVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("dense", {"dispatch": "dense"}),
        ("dropless", {"dispatch": "dropless"}),
        ("sorted", {"dispatch": "sorted"}),
        ("sorted_small_tiles", {"dispatch": "sorted", "tile_size": 3}),
        ("auto", {}),
        ("capacity_no_drop", NO_DROP),
    )
    def test_matches_numpy(self, overrides):
        params, x = random_params(), inputs()
        y, state = self.variant(lambda p, v: run(make(**overrides), p, v))(params, x)
        ref = np_moe(params, x)
        assert y.shape == X_SHAPE and y.dtype == jnp.float32
        # fp32 ("highest" matmuls) vs float64 on O(1) values: errors ~1e-6.
        np.testing.assert_allclose(y, ref["y"], atol=2e-5, rtol=1e-5)
        inter = state["intermediates"]
        np.testing.assert_array_equal(inter["top_k_indices"][0].reshape(N, K), ref["indices"])
        np.testing.assert_allclose(inter["gates"][0].reshape(N, K), ref["gates"], atol=1e-6)
        np.testing.assert_allclose(state["losses"]["aux"][0], ref["aux"], rtol=1e-5)
        np.testing.assert_allclose(state["losses"]["z"][0], ref["z"], rtol=1e-5)
        if overrides.get("dispatch") == "capacity":
            assert float(inter["dropped_fraction"][0]) == 0.0
        else:
            assert "dropped_fraction" not in inter


def test_dispatch_modes_agree_including_gradients():
    params, x = random_params(), inputs()

    def loss(p, layer):
        y, state = run(layer, p, x)
        return jnp.sum(y**2) + state["losses"]["aux"][0] + state["losses"]["z"][0]

    @jax.jit
    def all_grads(p):  # one compilation for the three modes
        modes = (
            {"dispatch": "dense"},
            {"dispatch": "dropless"},
            {},
            NO_DROP,
            {"dispatch": "sorted", "tile_size": 5},
        )
        return [jax.grad(loss)(p, make(**o)) for o in modes]

    grads = all_grads(params)
    for leaf in jax.tree.leaves(grads[0]):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
    # Same math, different summation order: fp32 differences ~1e-6 relative.
    for other in grads[1:]:
        chex.assert_trees_all_close(grads[0], other, atol=1e-5, rtol=1e-5)


def test_capacity_drops_slots_and_reports_fraction():
    params, x = random_params(), inputs()
    layer = make(dispatch="capacity", capacity_factor=0.5)
    capacity = expert_capacity(0.5, N, K, E)
    assert capacity == math.ceil(0.5 * N * K / E) == 8
    assert expert_capacity(float(E), N, K, E) == N  # capped: an expert sees a token once

    @jax.jit
    def forward_and_grad(p):
        grads = jax.grad(lambda q: jnp.sum(run(layer, q, x)[0] ** 2))(p)
        return run(layer, p, x), grads

    (y, state), grads = forward_and_grad(params)
    ref = np_moe(params, x, capacity=capacity)
    assert ref["dropped_fraction"] > 0
    dropped = state["intermediates"]["dropped_fraction"][0]
    np.testing.assert_allclose(dropped, ref["dropped_fraction"], rtol=1e-6)
    np.testing.assert_allclose(y, ref["y"], atol=2e-5, rtol=1e-5)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))


def test_jitter_and_dropout_only_when_not_deterministic():
    params, x = random_params(), inputs()
    # The router and dropout do not depend on the dispatch: use the cheapest one to compile.
    jittery = make(dispatch="dense", jitter_std=0.5)  # large, so routing visibly changes
    dropping = make(dispatch="dense", jitter_std=0.0, dropout_rate=0.5)

    @jax.jit
    def outputs(key0, key1):
        def train(layer, key):
            return run(layer, params, x, deterministic=False, rngs={"dropout": key})

        return {
            "eval": run(jittery, params, x, rngs={"dropout": key0}),
            "train0": train(jittery, key0),
            "train0_again": train(jittery, key0),
            "train1": train(jittery, key1),
            "no_noise": train(make(dispatch="dense", jitter_std=0.0), key0),
            "dropout": train(dropping, key0)[0],
        }

    out = outputs(rng_key(0), rng_key(1))
    y_eval = out["eval"][0]
    np.testing.assert_allclose(y_eval, np_moe(params, x)["y"], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(out["no_noise"][0], y_eval)
    np.testing.assert_array_equal(out["train0"][0], out["train0_again"][0])
    y0, y1 = out["train0"][0], out["train1"][0]
    assert not np.allclose(y0, y1) and not np.allclose(y0, y_eval)
    # z-loss is computed on the logits before jitter: unchanged by the noise.
    z_eval, z_train = out["eval"][1]["losses"]["z"][0], out["train0"][1]["losses"]["z"][0]
    np.testing.assert_allclose(z_train, z_eval, rtol=1e-6)
    # Dropout on the output: about half the entries zeroed, the rest scaled by 1/(1-0.5).
    y_drop = np.asarray(out["dropout"])
    kept = y_drop != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y_drop[kept], 2 * np.asarray(y_eval)[kept], atol=1e-6, rtol=1e-5)


def test_bf16_compute_close_to_f32():
    params, x = random_params(), inputs()
    modes = ({"dispatch": "dense"}, {}, NO_DROP)
    outputs = jax.jit(
        lambda p: [make(dtype=jnp.bfloat16, **o).apply({"params": p}, x) for o in modes]
    )(params)
    reference = np_moe(params, x)["y"]
    for y16 in outputs:
        assert y16.dtype == jnp.bfloat16
        # Router stays float32 and routes identically here; bf16 expert matmuls (8-bit
        # mantissa, relative step 2^-8) stay within 3% of the largest output magnitude.
        err = np.max(np.abs(np.asarray(y16, np.float64) - reference))
        assert err < 3e-2 * np.max(np.abs(reference))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": E + 1}, "top_k"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"dispatch": "sparse"}, "dispatch"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"tile_size": 0}, "tile_size"),
        ({"jitter_std": -0.01}, "jitter_std"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
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


def test_auto_dispatch_rule():
    from dsc_jax.layers.moe import resolve_dispatch

    assert MoELayer(num_experts=5, top_k=2, hidden_dim=4).dispatch == "auto"
    assert resolve_dispatch("auto", 5, 2, "cpu") == "sorted"
    assert resolve_dispatch("auto", 64, 2, "cpu") == "sorted"
    assert resolve_dispatch("auto", 2, 2, "cpu") == "dense"
    assert resolve_dispatch("auto", 5, 2, "cpu", num_tokens=4096) == "sorted"
    # Few tokens: the padding (E·(tile − 1) rows) outweighs dense's E·N rows.
    assert resolve_dispatch("auto", 5, 2, "cpu", num_tokens=32) == "dense"
    assert resolve_dispatch("auto", 5, 2, "cpu", num_tokens=32, tile_size=4) == "sorted"
    assert resolve_dispatch("auto", 5, 2, "gpu") == "dropless"
    assert resolve_dispatch("auto", 3, 2, "tpu") == "dense"
    assert resolve_dispatch("capacity", 5, 2, "cpu") == "capacity"


def test_sorted_dispatch_equals_dropless_on_skewed_routing():
    from dsc_jax.layers.moe import sorted_tile_dispatch

    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.standard_normal((37, D)), jnp.float32)
    w_in = jnp.asarray(rng.standard_normal((E, D, H)) / 4, jnp.float32)
    w_out = jnp.asarray(rng.standard_normal((E, H, D)) / 6, jnp.float32)
    # Expert 0 gets most slots, expert 3 none: groups of very different sizes.
    indices = jnp.asarray(rng.choice(3, size=(37, K), p=[0.8, 0.15, 0.05]), jnp.int32)
    indices = indices.at[:, 1].set((indices[:, 0] + 1) % 3)
    gates = jnp.asarray(rng.uniform(size=(37, K)), jnp.float32)
    want = make(dispatch="dropless")._dropless_dispatch(tokens, w_in, w_out, indices, gates)
    for tile in (1, 4, 16, 128):
        got = sorted_tile_dispatch(tokens, w_in, w_out, indices, gates, tile)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
