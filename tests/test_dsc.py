"""DSCLayer against an independent float64 NumPy reference (tests/_reference.py).

Tolerances: float32 layer vs float64 reference, |err| <= 1e-5 absolute + 1e-4 relative
(matmul precision is "highest" in conftest); bfloat16 compute within 3e-2 of float32.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsc_jax.layers.dsc import DSCLayer, resolve_compute
from tests._reference import dsc_reference, to_numpy64

D_MODEL, NUM_BASES, TOP_K, HIDDEN = 16, 24, 4, 20
ATOL, RTOL = 1e-5, 1e-4


def make_layer(variant: str = "refined", **overrides) -> DSCLayer:
    fields = dict(num_bases=NUM_BASES, top_k=TOP_K, hidden_dim=HIDDEN, variant=variant)
    fields.update(overrides)
    return DSCLayer(**fields)


def init_params(layer: DSCLayer, seed: int = 0, randomize: bool = True) -> dict:
    """Initialise, then perturb γ, the router norm and the bank scale so no term is trivial."""
    x = jnp.zeros((2, D_MODEL))
    params = nn.meta.unbox(layer.init(jax.random.key(seed), x)["params"])
    if not randomize:
        return params
    keys = jax.random.split(jax.random.key(seed + 100), 6)
    params = dict(params)
    params["gamma"] = 0.1 + 0.3 * jax.random.uniform(keys[0], params["gamma"].shape)
    params["basis_u"] = params["basis_u"] * 3.0  # unnormalised rows: forward must normalise
    params["router"] = {
        "kernel": jax.random.normal(keys[1], params["router"]["kernel"].shape) * 0.5,
        "bias": jax.random.normal(keys[2], params["router"]["bias"].shape) * 0.5,
    }
    if "router_norm" in params:
        params["router_norm"] = {
            "scale": 1.0 + 0.2 * jax.random.normal(keys[3], (D_MODEL,)),
            "bias": 0.1 * jax.random.normal(keys[4], (D_MODEL,)),
        }
    return params


def inputs(seed: int = 1, shape: tuple[int, ...] = (3, 5)) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (*shape, D_MODEL))


def apply_all(layer: DSCLayer, params: dict, x: jax.Array):
    y, state = layer.apply({"params": params}, x, mutable=["losses", "intermediates"])
    losses = {name: value[0] for name, value in state["losses"].items()}
    return y, state["intermediates"], losses


@pytest.mark.parametrize("variant", ["refined", "basic"])
@pytest.mark.parametrize("compute", ["gather", "dense"])
def test_forward_matches_float64_reference(variant, compute):
    layer = make_layer(variant, compute=compute)
    params = init_params(layer)
    x = inputs()
    y, inter, losses = apply_all(layer, params, x)
    ref = dsc_reference(to_numpy64(params), np.asarray(x).reshape(-1, D_MODEL), TOP_K, variant)
    chex.assert_shape(y, x.shape)
    np.testing.assert_allclose(y.reshape(-1, D_MODEL), ref["output"], atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(inter["top_k_indices"][0].reshape(-1, TOP_K), ref["indices"])
    np.testing.assert_allclose(
        inter["gates"][0].reshape(-1, TOP_K), ref["gates"], atol=1e-6, rtol=1e-5
    )
    np.testing.assert_allclose(inter["signal"][0].reshape(-1), ref["signal"], rtol=1e-5)
    for name in ("aux", "budget", "frame", "z"):
        np.testing.assert_allclose(losses[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_param_tree_shapes_and_logical_names():
    refined = make_layer("refined").init(jax.random.key(0), inputs())
    basic = make_layer("basic").init(jax.random.key(0), inputs())
    assert set(refined) == {"params"}, "init must not leak sown losses/intermediates"
    expected = {
        ("mlp_in", "kernel"): ((D_MODEL, HIDDEN), ("embed", "mlp")),
        ("mlp_out", "kernel"): ((HIDDEN, D_MODEL), ("mlp", "embed")),
        ("router_norm", "scale"): ((D_MODEL,), ("embed",)),
        ("router_norm", "bias"): ((D_MODEL,), ("embed",)),
        ("router", "kernel"): ((D_MODEL, NUM_BASES), ("embed", "bases")),
        ("router", "bias"): ((NUM_BASES,), ("bases",)),
        ("basis_u",): ((NUM_BASES, D_MODEL), ("bases", "embed")),
        ("basis_v",): ((NUM_BASES, D_MODEL), ("bases", "embed")),
        ("gamma",): ((D_MODEL,), ("embed",)),
    }
    flat = {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            refined["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned)
        )[0]
    }
    assert set(flat) == set(expected)
    for path, (shape, names) in expected.items():
        assert flat[path].value.shape == shape, path
        assert flat[path].names == names, path
    basic_params = nn.meta.unbox(basic["params"])
    assert "router_norm" not in basic_params
    assert basic_params["gamma"].shape == ()
    np.testing.assert_allclose(basic_params["gamma"], 0.1)
    # The initial bank has unit rows after normalisation and no NaN.
    assert np.all(np.isfinite(np.asarray(basic_params["basis_u"])))


def test_frame_identity_matches_gram_form():
    from dsc_jax.layers.dsc_router import frame_loss, normalize_rows

    bank_u = normalize_rows(jax.random.normal(jax.random.key(3), (40, 12)), 1e-6)
    bank_v = normalize_rows(jax.random.normal(jax.random.key(4), (40, 12)), 1e-6)
    u, v = np.asarray(bank_u, np.float64), np.asarray(bank_v, np.float64)
    off = ~np.eye(40, dtype=bool)
    gram_form = np.sum((u @ u.T)[off] ** 2) + np.sum((v @ v.T)[off] ** 2)
    np.testing.assert_allclose(frame_loss(bank_u, bank_v), gram_form, rtol=1e-4)


def _harmonic_tight_frame(num_bases: int, d_model: int) -> np.ndarray:
    """``[M, d]`` unit rows ``√(2/d)·(cos 2πjk/M, sin 2πjk/M)_{k=1..d/2}``: a tight frame
    (``UᵀU = (M/d)·I``) for ``M > d``, which meets Welch's bound."""
    j = np.arange(num_bases)[:, None]
    k = np.arange(1, d_model // 2 + 1)[None, :]
    angle = 2 * np.pi * j * k / num_bases
    return np.sqrt(2.0 / d_model) * np.concatenate([np.cos(angle), np.sin(angle)], axis=1)


def test_frame_excess_is_zero_at_the_welch_bound():
    """The sown frame term is the paper's ``L_frame`` less ``2·max(0, M²/d − M)``: 0 for tight
    frames (here M = 48 unit rows in d = 12, where ``L_frame`` itself is 2·144), > 0 for a
    random bank, 0 floor for M <= d, and the same gradient as ``L_frame``."""
    from dsc_jax.layers.dsc_router import frame_excess, frame_floor, frame_loss

    tight = jnp.asarray(_harmonic_tight_frame(48, 12), jnp.float32)
    np.testing.assert_allclose(np.linalg.norm(tight, axis=-1), 1.0, rtol=1e-6)
    assert frame_floor(48, 12) == 2 * (48**2 / 12 - 48)
    np.testing.assert_allclose(frame_loss(tight, tight), frame_floor(48, 12), rtol=1e-5)
    np.testing.assert_allclose(frame_excess(tight, tight), 0.0, atol=1e-3)
    assert frame_floor(8, 12) == 0.0
    rand = normalize_rows_np(np.random.default_rng(0).normal(size=(48, 12)))
    rand = jnp.asarray(rand, jnp.float32)
    assert float(frame_excess(rand, rand)) > 10.0
    g_loss = jax.grad(lambda u: frame_loss(u, rand))(rand)
    g_excess = jax.grad(lambda u: frame_excess(u, rand))(rand)
    np.testing.assert_allclose(g_excess, g_loss, rtol=1e-6)


def normalize_rows_np(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contraction_and_continuity_at_identity():
    layer = make_layer("refined")
    params = init_params(layer)
    x = inputs()
    _, inter, _ = apply_all(layer, params, x)
    # Σ ẑ = S/(S+ε)·tanh(S) < 1 exactly; float32 tanh rounds to 1 for S ≳ 9, hence <= here
    # and strict < in the float64 reference.
    assert np.all(np.sum(inter["gates"][0], -1) <= 1.0)
    ref = dsc_reference(to_numpy64(params), np.asarray(x).reshape(-1, D_MODEL), TOP_K, "refined")
    assert np.all(ref["gates"].sum(-1) < 1.0)
    # Push every logit down: S → 0 and ẑ → 0 monotonically, and y → the static FFN alone.
    static_only = dict(params, gamma=jnp.zeros_like(params["gamma"]))
    y_static = layer.apply({"params": static_only}, x)
    x_norms = np.linalg.norm(np.asarray(x), axis=-1)
    gamma_inf = float(jnp.max(jnp.abs(params["gamma"])))
    previous_sum = np.inf
    for shift in (0.0, -4.0, -8.0, -12.0, -19.0):
        shifted = dict(
            params, router={**params["router"], "bias": params["router"]["bias"] + shift}
        )
        y, inter, _ = apply_all(layer, shifted, x)
        coefficient_sums = np.sum(inter["gates"][0], -1)
        # ẑ shrinks monotonically, and so does the dynamic part: |y - f(x)| <= |x| ‖γ‖∞ Σ ẑ.
        assert coefficient_sums.max() < previous_sum
        gaps = np.linalg.norm(np.asarray(y - y_static), axis=-1)
        assert np.all(gaps <= x_norms * gamma_inf * coefficient_sums + 1e-6)
        previous_sum = coefficient_sums.max()
    assert previous_sum < 1e-4  # ẑ ≈ S² as S → 0


@pytest.mark.parametrize("variant", ["refined", "basic"])
def test_spectral_bound(variant):
    layer = make_layer(variant)
    params = init_params(layer, seed=5)
    params["router"] = dict(params["router"], bias=params["router"]["bias"] + 6.0)  # large S
    ref = dsc_reference(
        to_numpy64(params), np.asarray(inputs(7)).reshape(-1, D_MODEL), TOP_K, variant
    )
    gamma_inf = np.max(np.abs(to_numpy64(params)["gamma"]))
    spectral = np.linalg.norm(ref["delta_w"], ord=2, axis=(1, 2))
    assert np.all(spectral < gamma_inf), (spectral.max(), gamma_inf)
    assert spectral.max() > 0.15 * gamma_inf  # the bound is not met trivially


def test_auto_compute_rule():
    assert resolve_compute("auto", num_bases=64, top_k=4) == "dense"
    assert resolve_compute("auto", num_bases=1523, top_k=4) == "gather"
    assert resolve_compute("gather", num_bases=8, top_k=4) == "gather"


class TestTransforms(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_no_jit_agree(self):
        layer = make_layer("refined")
        params = init_params(layer)
        x = inputs()
        expected = jax.jit(layer.apply)({"params": params}, x)
        out = self.variant(lambda p, x: layer.apply({"params": p}, x))(params, x)
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_vmap_and_pmap_match_jit():
    layer = make_layer("refined")
    params = init_params(layer)
    x = inputs(shape=(8, 4))
    expected = jax.jit(layer.apply)({"params": params}, x)
    mapped = jax.vmap(lambda row: layer.apply({"params": params}, row))(x)
    np.testing.assert_allclose(mapped, expected, atol=1e-6)
    assert jax.device_count() == 8
    replicated = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (8, *leaf.shape)), params)
    pmapped = jax.pmap(lambda p, row: layer.apply({"params": p}, row))(replicated, x)
    np.testing.assert_allclose(pmapped, expected, atol=1e-6)


def test_losses_only_when_mutable():
    layer = make_layer("refined")
    params = init_params(layer)
    _, state = layer.apply({"params": params}, inputs(), mutable=["intermediates"])
    assert "losses" not in state
    _, state = layer.apply({"params": params}, inputs(), mutable=["losses"])
    assert set(state["losses"]) == {"aux", "budget", "frame", "z"}


@pytest.mark.parametrize("case", ["zero_input", "tied_logits"])
def test_gradients_are_finite(case):
    layer = make_layer("refined")
    params = init_params(layer)
    x = inputs()
    if case == "zero_input":
        x = jnp.zeros_like(x)
    else:  # every logit equal: top-K among ties
        params["router"] = jax.tree.map(jnp.zeros_like, params["router"])

    def loss_fn(params, x):
        y, state = layer.apply({"params": params}, x, mutable=["losses"])
        return jnp.sum(y**2) + sum(v[0] for v in state["losses"].values())

    grads = jax.grad(loss_fn, argnums=(0, 1))(params, x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bfloat16_close_to_float32():
    params = init_params(make_layer("refined"))
    x = inputs()
    y32 = make_layer("refined").apply({"params": params}, x)
    y16 = make_layer("refined", dtype=jnp.bfloat16).apply({"params": params}, x)
    assert y16.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(y32)))
    assert float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32))) < 3e-2 * scale


def test_dropout_only_in_training():
    layer = make_layer("refined", dropout_rate=0.5)
    params = init_params(layer)
    x = inputs()
    eval_out = layer.apply({"params": params}, x)
    np.testing.assert_allclose(eval_out, layer.apply({"params": params}, x, deterministic=True))
    train_out = layer.apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    assert float(jnp.mean(train_out == 0.0)) > 0.3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": NUM_BASES + 1}, "top_k"),
        ({"num_bases": 0}, "num_bases"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"eps": 0.0}, "eps"),
        ({"variant": "fancy"}, "variant"),
        ({"compute": "sparse"}, "compute"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
    ],
)
def test_bad_config_raises(overrides, field):
    with pytest.raises(ValueError, match=rf"DSCLayer\.{field}="):
        make_layer(**overrides)


def test_bad_inputs_raise():
    layer = make_layer()
    params = init_params(layer, randomize=False)
    with pytest.raises(ValueError, match=r"last dimension 12 .* model dimension 16"):
        layer.apply({"params": params}, jnp.ones((2, 12)))
    with pytest.raises(ValueError, match="dtype int32 is not allowed"):
        layer.apply({"params": params}, jnp.ones((2, D_MODEL), jnp.int32))
    with pytest.raises(ValueError, match="dtype int32 is not allowed"):
        layer.init(jax.random.key(0), jnp.ones((2, D_MODEL), jnp.int32))


@pytest.mark.parametrize("compute", ["gather", "dense"])
def test_logit_clip_tau_bounds_phi(compute):
    """φ = softplus(clip(r, -τ, τ)): at τ = 1 with logits spread to ±4 most selected logits
    exceed τ, so a plain softplus would give other gates, a larger S and other picks."""
    tau = 1.0
    layer = make_layer("refined", compute=compute, tau=tau)
    params = init_params(layer, seed=2)
    params["router"] = jax.tree.map(lambda w: w * 4.0, params["router"])
    x = inputs(4)
    y, inter, _ = apply_all(layer, params, x)
    ref = dsc_reference(
        to_numpy64(params), np.asarray(x).reshape(-1, D_MODEL), TOP_K, "refined", tau=tau
    )
    raw = _raw_logits_reference(to_numpy64(params), np.asarray(x).reshape(-1, D_MODEL))
    selected = np.take_along_axis(raw, ref["indices"], -1)
    assert np.mean(selected > tau) > 0.5  # the clip is active
    np.testing.assert_array_equal(inter["top_k_indices"][0].reshape(-1, TOP_K), ref["indices"])
    np.testing.assert_allclose(inter["gates"][0].reshape(-1, TOP_K), ref["gates"], atol=1e-6)
    signal = inter["signal"][0].reshape(-1)
    np.testing.assert_allclose(signal, ref["signal"], rtol=1e-5)
    assert np.all(signal <= TOP_K * np.log1p(np.exp(tau)) + 1e-5)
    np.testing.assert_allclose(y.reshape(-1, D_MODEL), ref["output"], atol=ATOL, rtol=RTOL)


def _raw_logits_reference(p64: dict, x: np.ndarray) -> np.ndarray:
    """``LN(x) @ W + b`` in float64 (the refined router's raw logits)."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    normed = (x - mean) / np.sqrt(var + 1e-5) * p64["router_norm"]["scale"]
    normed = normed + p64["router_norm"]["bias"]
    return normed @ p64["router"]["kernel"] + p64["router"]["bias"]


@pytest.mark.parametrize("compute", ["gather", "dense"])
def test_budget_loss_below_target(compute):
    """S < μ: ``L_budget = (μ − mean S)²`` > 0 against the float64 signal, and its gradient
    raises every selected router bias (more signal) and none of the others."""
    target = 2.0
    layer = make_layer("refined", compute=compute, budget_target=target)
    params = init_params(layer, seed=3)
    params["router"] = dict(params["router"], bias=params["router"]["bias"] - 6.0)  # small S
    x = inputs(5)
    losses = apply_all(layer, params, x)[2]
    ref = dsc_reference(to_numpy64(params), np.asarray(x).reshape(-1, D_MODEL), TOP_K, "refined")
    assert ref["signal"].mean() < target - 0.5
    want = (target - ref["signal"].mean()) ** 2
    np.testing.assert_allclose(losses["budget"], want, rtol=1e-5)

    def budget(bias):
        p = dict(params, router=dict(params["router"], bias=bias))
        return apply_all(layer, p, x)[2]["budget"]

    grad = np.asarray(jax.grad(budget)(params["router"]["bias"]))
    picked = np.zeros(NUM_BASES, bool)
    picked[np.unique(ref["indices"])] = True
    assert np.all(grad[picked] < 0) and np.all(grad[~picked] == 0), grad
