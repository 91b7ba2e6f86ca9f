"""DSCLayer(router="product_key"): exact two-stage top-K, the atoms actually used, per-token
queries, regularisers without [N, M] arrays, equivalence to a flat router with the factorised
kernel, and clear errors for bad M."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsc_jax import DSCConfig, GPTConfig
from dsc_jax.layers import common, dsc_product_key, dsc_router
from dsc_jax.layers.dsc import DSCLayer
from dsc_jax.layers.dsc_router import normalize_rows
from dsc_jax.models.gpt import GPT

D = 12


def _layer(**overrides) -> DSCLayer:
    fields = dict(num_bases=32, top_k=3, hidden_dim=8, router="product_key", product_key_rows=4)
    fields.update(overrides)
    return DSCLayer(**fields)


def _params(layer: DSCLayer, seed: int = 0, key_scale: float = 60.0) -> dict:
    """Initialised params with large sub-key tables (spread-out routing) and random banks."""
    x = jnp.zeros((1, D))
    params = nn.unbox(layer.init(jax.random.key(seed), x)["params"])
    keys = jax.random.split(jax.random.key(seed + 1), 4)
    router = jax.tree.map(lambda p: p * key_scale, params["router"])
    for i, name in enumerate(("keys_1", "keys_2")):
        router[name]["bias"] = jax.random.normal(keys[i], router[name]["bias"].shape)
    params["router"] = router
    params["basis_u"] = jax.random.normal(keys[2], params["basis_u"].shape)
    params["basis_v"] = jax.random.normal(keys[3], params["basis_v"].shape)
    params["gamma"] = jnp.ones_like(params["gamma"])
    return params


def _brute_force(s1: jax.Array, s2: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    sums = (s1[:, :, None] + s2[:, None, :]).reshape(s1.shape[0], -1)
    values, ids = jax.lax.top_k(sums, top_k)
    return ids, values


@pytest.mark.parametrize("rows,cols,top_k", [(5, 7, 4), (3, 8, 6), (16, 16, 4), (1, 9, 2)])
def test_two_stage_top_k_is_exact(rows: int, cols: int, top_k: int) -> None:
    k1, k2 = jax.random.split(jax.random.key(rows * cols + top_k))
    s1 = jax.random.normal(k1, (64, rows))
    s2 = jax.random.normal(k2, (64, cols))
    ids, selected = dsc_product_key.product_key_top_k(s1, s2, top_k)
    want_ids, want_values = _brute_force(s1, s2, top_k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(selected, want_values, rtol=0, atol=0)


def test_two_stage_top_k_ties_take_the_lowest_atom_id() -> None:
    # Small integers: the sums are exact, so many exact ties; lax.top_k on all M keeps the
    # lowest index among equal values, and so must the two-stage search.
    k1, k2 = jax.random.split(jax.random.key(3))
    s1 = jax.random.randint(k1, (200, 6), 0, 3).astype(jnp.float32)
    s2 = jax.random.randint(k2, (200, 5), 0, 3).astype(jnp.float32)
    ids, _ = dsc_product_key.product_key_top_k(s1, s2, 4)
    np.testing.assert_array_equal(ids, _brute_force(s1, s2, 4)[0])


def _reference_output(layer: DSCLayer, params: dict, x: jax.Array) -> tuple[jax.Array, ...]:
    """Materialise the selected atoms by id from the brute-force top-K over all M sums
    (basic variant: the router input is x itself)."""
    half = D // 2
    r = params["router"]
    s1 = x[:, :half] @ r["keys_1"]["kernel"] + r["keys_1"]["bias"]
    s2 = x[:, half:] @ r["keys_2"]["kernel"] + r["keys_2"]["bias"]
    ids, selected = _brute_force(s1, s2, layer.top_k)
    phi = jax.nn.softplus(jnp.clip(selected, -layer.tau, layer.tau))
    signal = phi.sum(-1)
    gates = phi / (signal + layer.eps)[:, None] * jnp.tanh(signal)[:, None]
    u = normalize_rows(params["basis_u"], layer.eps)[ids]  # [N, K, d], gathered BY ATOM ID
    v = normalize_rows(params["basis_v"], layer.eps)[ids]
    dynamic = jnp.einsum("nk,nkd->nd", gates * jnp.einsum("nd,nkd->nk", x, u), v)
    static = jax.nn.gelu(x @ params["mlp_in"]["kernel"], approximate=False)
    static = static @ params["mlp_out"]["kernel"]
    return static + dynamic * params["gamma"], ids, gates


@pytest.mark.parametrize("compute", ["gather", "dense"])
def test_output_uses_the_routed_atoms(compute: str) -> None:
    layer = _layer(variant="basic", compute=compute)
    params = _params(layer)
    x = jax.random.normal(jax.random.key(7), (40, D))
    y, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    want, want_ids, want_gates = _reference_output(layer, params, x)
    sown = state["intermediates"]
    np.testing.assert_array_equal(sown["top_k_indices"][0], want_ids)
    np.testing.assert_allclose(sown["gates"][0], want_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
    assert int(jnp.max(want_ids)) >= layer.top_k  # not just atoms 0..K-1
    assert len(np.unique(np.asarray(want_ids))) > 2 * layer.top_k


def test_matches_flat_router_with_the_factorised_kernel() -> None:
    pk = _layer(variant="refined")
    flat = _layer(variant="refined", router="flat", product_key_rows=0)
    params = _params(pk, key_scale=20.0)
    x = jax.random.normal(jax.random.key(8), (2, 10, D))
    rows, cols, half = 4, 8, D // 2
    r = params["router"]
    kernel = jnp.concatenate(
        [
            jnp.repeat(r["keys_1"]["kernel"], cols, axis=1),  # column j uses row-key j // cols
            jnp.tile(r["keys_2"]["kernel"], (1, rows)),  # ... and column-key j % cols
        ],
        axis=0,
    )
    bias = jnp.repeat(r["keys_1"]["bias"], cols) + jnp.tile(r["keys_2"]["bias"], rows)
    flat_params = {**params, "router": {"kernel": kernel, "bias": bias}}
    assert kernel.shape == (D, 32) and half == 6

    def run(module, p):
        return module.apply(
            {"params": p}, x, deterministic=False, mutable=["losses", "intermediates"]
        )

    y_pk, s_pk = run(pk, params)
    y_flat, s_flat = run(flat, flat_params)
    np.testing.assert_array_equal(
        s_pk["intermediates"]["top_k_indices"][0], s_flat["intermediates"]["top_k_indices"][0]
    )
    np.testing.assert_allclose(y_pk, y_flat, rtol=1e-5, atol=1e-6)
    # z-loss: logsumexp over all M sums = lse(s1) + lse(s2): the flat z-loss exactly.
    np.testing.assert_allclose(s_pk["losses"]["z"][0], s_flat["losses"]["z"][0], rtol=1e-5)
    np.testing.assert_allclose(s_pk["losses"]["frame"][0], s_flat["losses"]["frame"][0])

    # Gradients of the output w.r.t. the shared parameters agree too.
    cot = jax.random.normal(jax.random.key(9), y_pk.shape)

    def grads(module, p):
        return jax.grad(lambda q: jnp.sum(module.apply({"params": q}, x) * cot))(p)

    g_pk, g_flat = grads(pk, params), grads(flat, flat_params)
    for name in ("basis_u", "basis_v", "gamma", "mlp_in", "router_norm"):
        np.testing.assert_allclose(
            jax.tree.leaves(g_pk[name]), jax.tree.leaves(g_flat[name]), rtol=1e-4, atol=1e-6
        )
    # Chain rule through the factorisation: d keys_1 = Σ over the column keys.
    want_k1 = g_flat["router"]["kernel"][:half].reshape(half, rows, cols).sum(-1)
    np.testing.assert_allclose(g_pk["router"]["keys_1"]["kernel"], want_k1, rtol=1e-4, atol=1e-6)


def test_query_is_normalised_per_token() -> None:
    layer = _layer(variant="refined")
    params = _params(layer)
    x = jax.random.normal(jax.random.key(10), (1, 9, D))
    y = layer.apply({"params": params}, x)
    changed = x.at[0, 6].set(100.0 * jax.random.normal(jax.random.key(11), (D,)))
    y_changed = layer.apply({"params": params}, changed)
    keep = np.arange(9) != 6
    np.testing.assert_array_equal(np.asarray(y)[0, keep], np.asarray(y_changed)[0, keep])
    assert not np.allclose(y[0, 6], y_changed[0, 6])


def test_regularisers_without_pool_sized_arrays() -> None:
    zeros = jnp.zeros((5, 8))
    assert float(dsc_product_key.product_key_aux_loss(zeros, zeros, 20.0)) == pytest.approx(1.0)
    s1 = jax.random.normal(jax.random.key(12), (5, 4))
    s2 = jax.random.normal(jax.random.key(13), (5, 8))
    full = (s1[:, :, None] + s2[:, None, :]).reshape(5, 32)
    np.testing.assert_allclose(
        dsc_product_key.product_key_z_loss(s1, s2), common.z_loss(full), rtol=1e-6
    )
    layer = _layer(frame_regularizer=False)
    _, state = layer.apply(
        {"params": _params(layer)}, jnp.ones((3, D)), deterministic=False, mutable=["losses"]
    )
    assert set(state["losses"]) == {"aux", "budget", "z"}


def test_joint_aux_equals_the_flat_aux_over_all_atoms() -> None:
    """``product_key_aux="joint"`` is the flat router's ``M Σ P²`` on the ``[N, M]`` sums
    (float32, rtol 1e-5; scores below τ/2 so clipping the halves equals clipping the sum),
    and it sees a joint collapse that the marginal loss cannot."""
    s1 = jax.random.normal(jax.random.key(14), (2, 6, 4))
    s2 = jax.random.normal(jax.random.key(15), (2, 6, 8))
    full = (s1[..., :, None] + s2[..., None, :]).reshape(2, 6, 32)
    np.testing.assert_allclose(
        dsc_product_key.product_key_joint_aux_loss(s1, s2, 20.0),
        dsc_router.aux_loss(jnp.clip(full, -20.0, 20.0)),
        rtol=1e-5,
    )
    # two tokens, each sure of one atom: (0, 0) and (1, 1). Rows and columns are used
    # evenly by both (marginals balanced on a 2x2 grid), but only 2 of the 4 atoms are used.
    peaked = 50.0 * jnp.eye(2)
    marginal = dsc_product_key.product_key_aux_loss(peaked, peaked, 100.0)
    joint = dsc_product_key.product_key_joint_aux_loss(peaked, peaked, 100.0)
    assert float(marginal) == pytest.approx(1.0, rel=1e-4)  # "balanced"
    assert float(joint) == pytest.approx(2.0, rel=1e-4)  # 4 · (½² + ½²): half the atoms idle
    layer = _layer(product_key_aux="joint")
    _, state = layer.apply(
        {"params": _params(layer)}, jnp.ones((3, D)), deterministic=False, mutable=["losses"]
    )
    assert np.isfinite(float(state["losses"]["aux"][0]))
    with pytest.raises(ValueError, match="product_key_aux='both'"):
        _layer(product_key_aux="both")


def test_selection_aux_is_switch_style_over_all_atoms() -> None:
    """``product_key_aux="selection"``: ``M Σ_j f_j P_j`` with ``f`` the top-K pick fractions
    and ``P`` the mean atom probabilities, brute force on the ``[N, M]`` sums (rtol 1e-5);
    1 when picks and probabilities are uniform; its gradient lowers the picked atoms' logits."""
    s1 = jax.random.normal(jax.random.key(16), (6, 4))
    s2 = jax.random.normal(jax.random.key(17), (6, 8))
    indices, _ = dsc_product_key.product_key_top_k(s1, s2, 3)
    full = (s1[:, :, None] + s2[:, None, :]).reshape(6, 32)
    probs = jnp.mean(jax.nn.softmax(full, axis=-1), axis=0)
    fractions = jnp.zeros(32).at[indices.reshape(-1)].add(1.0) / indices.size
    np.testing.assert_allclose(
        dsc_product_key.product_key_selection_aux_loss(s1, s2, indices, 20.0),
        32 * jnp.sum(fractions * probs),
        rtol=1e-5,
    )
    every_atom = jnp.arange(32).reshape(4, 8)  # each atom picked once, flat scores
    zeros_1, zeros_2 = jnp.zeros((4, 4)), jnp.zeros((4, 8))
    uniform = dsc_product_key.product_key_selection_aux_loss(zeros_1, zeros_2, every_atom, 20.0)
    assert float(uniform) == pytest.approx(1.0)
    # every token picked atom 0 = (row 0, column 0): descent lowers exactly those scores
    collapsed = jnp.zeros((6, 1), jnp.int32)
    grads = jax.grad(dsc_product_key.product_key_selection_aux_loss, argnums=(0, 1))(
        s1, s2, collapsed, 20.0
    )
    for grad in grads:
        assert bool(jnp.all(grad[:, 0] > 0)) and bool(jnp.all(grad[:, 1:] < 0))


def _scores_reference(params: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two score tables ``s₁ [N, n₁]``, ``s₂ [N, n₂]`` in float64 (refined router)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    q = (x - mean) / np.sqrt(var + 1e-5) * p["router_norm"]["scale"] + p["router_norm"]["bias"]
    keys = p["router"]
    half = x.shape[-1] // 2
    s1 = q[:, :half] @ keys["keys_1"]["kernel"] + keys["keys_1"]["bias"]
    s2 = q[:, half:] @ keys["keys_2"]["kernel"] + keys["keys_2"]["bias"]
    return s1, s2


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_product_key_aux_choice_through_the_layer() -> None:
    """The layer sows the chosen load-balancing loss: each ``product_key_aux`` against its
    float64 formula on the layer's own score tables and picks (rtol 1e-4; scores below τ/2,
    so no clipping), and the three values differ (a wrong dispatch fails)."""
    x = np.asarray(jax.random.normal(jax.random.key(20), (9, D)), np.float64)
    got = {}
    for kind in ("marginal", "joint", "selection"):
        layer = _layer(product_key_aux=kind)
        params = _params(layer, seed=4, key_scale=8.0)
        _, state = layer.apply(
            {"params": params},
            jnp.asarray(x, jnp.float32),
            mutable=["losses", "intermediates"],
        )
        got[kind] = float(state["losses"]["aux"][0])
        indices = np.asarray(state["intermediates"]["top_k_indices"][0]).reshape(-1)
    s1, s2 = _scores_reference(params, x)  # same seed: the same parameters for every kind
    assert max(np.abs(s1).max(), np.abs(s2).max()) < 10.0  # < τ/2: the clips change nothing
    p1, p2 = _softmax(s1).mean(0), _softmax(s2).mean(0)
    full = (s1[:, :, None] + s2[:, None, :]).reshape(len(x), -1)
    atoms = _softmax(full).mean(0)  # [M]
    picks = np.bincount(indices, minlength=atoms.size) / indices.size
    want = {
        "marginal": 0.5 * (p1.size * np.sum(p1**2) + p2.size * np.sum(p2**2)),
        "joint": atoms.size * np.sum(atoms**2),
        "selection": atoms.size * np.sum(picks * atoms),
    }
    for kind, value in want.items():
        assert got[kind] == pytest.approx(value, rel=1e-4), kind
    assert (
        min(
            abs(want[a] - want[b])
            for a, b in [("marginal", "joint"), ("joint", "selection"), ("marginal", "selection")]
        )
        > 1e-2
    )


def test_bad_bank_sizes_raise_clearly() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        DSCLayer(num_bases=50, top_k=2, hidden_dim=4, router="product_key")
    with pytest.raises(ValueError, match="product_key_rows=3"):
        DSCLayer(num_bases=16, top_k=2, hidden_dim=4, router="product_key", product_key_rows=3)
    with pytest.raises(ValueError, match="router='flat'"):
        DSCLayer(num_bases=16, top_k=2, hidden_dim=4, product_key_rows=4)
    with pytest.raises(ValueError, match="router"):
        DSCLayer(num_bases=16, top_k=2, hidden_dim=4, router="tree")
    assert dsc_product_key.product_key_shape("t", 65536, 0) == (256, 256)


def test_gpt_with_product_key_trains_one_step() -> None:
    ffn = DSCConfig(num_bases=64, top_k=2, hidden_dim=8, router="product_key")
    cfg = GPTConfig(ffn=ffn, vocab_size=32, max_seq_len=8, num_layers=1, num_heads=2, d_model=8)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    params = model.init(jax.random.key(1), tokens)["params"]

    def loss(p):
        logits, state = model.apply(
            {"params": p},
            tokens,
            deterministic=False,
            rngs={"dropout": jax.random.key(2)},
            mutable=["losses"],
        )
        return jnp.mean(logits) + sum(jnp.sum(v) for v in jax.tree.leaves(state["losses"]))

    grads = jax.grad(loss)(params)
    router = nn.unbox(grads)["block_0"]["ffn"]["router"]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(router))
    assert float(jnp.abs(router["keys_2"]["kernel"]).sum()) > 0
