"""The DSC fast paths against their plain definitions: the block-pruned top-K, the custom-JVP
gathered contraction and the sparse router-logit gradient (values and gradients; higher
orders and forward mode in tests/test_transforms.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsc_jax.layers import dsc_contract, dsc_router
from dsc_jax.layers.dsc import DSCLayer
from tests._reference import dsc_reference, plain_dsc_apply, to_numpy64

TAU = 5.0


def plain_top_k(raw: jax.Array, top_k: int, tau: float = TAU) -> jax.Array:
    """The definition: ``lax.top_k`` of ``softplus(clip(r))`` over all M."""
    return jax.lax.top_k(jax.nn.softplus(jnp.clip(raw, -tau, tau)), top_k)[1]


def tie_heavy_logits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Logits on a coarse grid (many exact ties), a quarter beyond ±τ (ties after the clip),
    and one row of all-equal values."""
    grid = jnp.round(jax.random.normal(key, shape) * 3.0 * 4) / 4
    return grid.at[..., 0, :].set(1.5)


@pytest.mark.parametrize("block", [None, 3, 4, 8, 16])
@pytest.mark.parametrize("num_bases", [64, 97])
@pytest.mark.parametrize("top_k", [1, 4])
def test_pruned_top_k_equals_lax_top_k_with_ties(block, num_bases, top_k):
    for seed, scale in ((0, None), (1, 1.0), (2, 20.0)):
        key = jax.random.key(seed)
        shape = (3, 40, num_bases)
        raw = (
            tie_heavy_logits(key, shape) if scale is None else jax.random.normal(key, shape) * scale
        )
        got = dsc_router.top_k_indices(raw, top_k, TAU, block=block)
        assert got.dtype == jnp.int32 and got.shape == (3, 40, top_k)
        np.testing.assert_array_equal(got, plain_top_k(raw, top_k), err_msg=f"seed {seed}")


def test_auto_block_rule_and_default_path():
    assert dsc_router.pruning_block(24, 4) is None  # small banks: plain top-K
    assert dsc_router.pruning_block(1523, 4) == dsc_router.BLOCK_SIZE
    raw = tie_heavy_logits(jax.random.key(3), (64, 1523))
    np.testing.assert_array_equal(dsc_router.top_k_indices(raw, 4, TAU), plain_top_k(raw, 4))


def test_softplus_is_monotone_on_adjacent_floats():
    """The pruning ranks blocks by softplus(max) = max(softplus): softplus must not decrease
    between adjacent float32 values (checked around 0, ±1 and the clip bounds)."""
    for centre in (-TAU, -1.0, 0.0, 1.0, TAU, -20.0, 20.0):
        start = np.float32(centre)
        values = [start]
        for _ in range(4096):
            values.append(np.nextafter(values[-1], np.float32(np.inf), dtype=np.float32))
        lo = np.float32(centre)
        for _ in range(4096):
            lo = np.nextafter(lo, np.float32(-np.inf), dtype=np.float32)
        values = np.sort(np.concatenate([np.array(values), np.linspace(lo, start, 4096)]))
        out = np.asarray(jax.jit(jax.nn.softplus)(jnp.asarray(values, jnp.float32)))
        assert np.all(np.diff(out) >= 0), centre


def einsum_contraction(x, unit_u, unit_v, indices, gates):
    """The plain form (autodiff through take + einsum)."""
    su, sv = jnp.take(unit_u, indices, axis=0), jnp.take(unit_v, indices, axis=0)
    projections = jnp.einsum("nd,nkd->nk", x, su, preferred_element_type=jnp.float32)
    return jnp.einsum("nk,nkd->nd", (projections * gates).astype(x.dtype), sv)


def test_gathered_contraction_value_and_vjp():
    keys = jax.random.split(jax.random.key(4), 6)
    n, m, k, d = 50, 30, 4, 12
    x = jax.random.normal(keys[0], (n, d))
    unit_u = jax.random.normal(keys[1], (m, d))
    unit_v = jax.random.normal(keys[2], (m, d))
    indices = jax.random.randint(keys[3], (n, k), 0, m)  # repeats: the scatter must add
    gates = jax.random.uniform(keys[4], (n, k))
    cotangent = jax.random.normal(keys[5], (n, d))
    args = (x, unit_u, unit_v, indices, gates)
    got, got_vjp = jax.vjp(dsc_contract.gathered_contraction, *args)
    want, want_vjp = jax.vjp(einsum_contraction, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for index in (0, 1, 2, 4):
        np.testing.assert_allclose(
            got_vjp(cotangent)[index], want_vjp(cotangent)[index], rtol=1e-5, atol=1e-5
        )


def test_normalized_gathered_contraction_value_and_vjp():
    """Normalising only the gathered rows (custom Jacobian) = normalise the whole bank first
    (autodiff), including a row shorter than ε (gradient g / ε there)."""
    keys = jax.random.split(jax.random.key(6), 6)
    n, m, k, d, eps = 50, 30, 4, 12, 1e-3
    x = jax.random.normal(keys[0], (n, d))
    bank_u = jax.random.normal(keys[1], (m, d)) * 3.0
    bank_v = jax.random.normal(keys[2], (m, d)) * 0.5
    bank_u = bank_u.at[3].set(1e-5)  # ‖row‖ < ε
    indices = jax.random.randint(keys[3], (n, k), 0, m).at[0, 0].set(3)
    gates = jax.random.uniform(keys[4], (n, k))
    cotangent = jax.random.normal(keys[5], (n, d))

    def plain(x, bu, bv, idx, g):
        unit_u, unit_v = dsc_router.normalize_rows(bu, eps), dsc_router.normalize_rows(bv, eps)
        return einsum_contraction(x, unit_u, unit_v, idx, g)

    args = (x, bank_u, bank_v, indices, gates)
    got, got_vjp = jax.vjp(lambda *a: dsc_contract.normalized_gathered_contraction(*a, eps), *args)
    want, want_vjp = jax.vjp(plain, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for index in (0, 1, 2, 4):
        np.testing.assert_allclose(
            got_vjp(cotangent)[index], want_vjp(cotangent)[index], rtol=1e-4, atol=1e-4
        )


def test_sparse_logit_gradient_matches_dense_autodiff():
    keys = jax.random.split(jax.random.key(5), 5)
    n, m, k, d = 40, 33, 3, 8
    inputs = jax.random.normal(keys[0], (n, d))
    kernel = jax.random.normal(keys[1], (d, m))
    bias = jax.random.normal(keys[2], (m,))
    indices = jax.random.randint(keys[3], (n, k), 0, m)
    weights = jax.random.normal(keys[4], (n, k))

    def dense(inputs, kernel, bias):
        logits = inputs @ kernel + bias
        return jnp.sum(jnp.sin(jnp.take_along_axis(logits, indices, -1)) * weights)

    def sparse(inputs, kernel, bias):
        selected = jnp.take_along_axis(jax.lax.stop_gradient(inputs @ kernel + bias), indices, -1)
        selected = dsc_contract.sparse_logit_gradient(selected, inputs, kernel, bias, indices)
        return jnp.sum(jnp.sin(selected) * weights)

    np.testing.assert_allclose(sparse(inputs, kernel, bias), dense(inputs, kernel, bias))
    for got, want in zip(
        jax.grad(sparse, (0, 1, 2))(inputs, kernel, bias),
        jax.grad(dense, (0, 1, 2))(inputs, kernel, bias),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute", ["gather", "dense"])
def test_layer_with_pruned_top_k_matches_reference_and_plain_gradients(compute):
    """M=320 (pruning on): indices exact, output vs float64, gradients vs a plain JAX form."""
    d, m, k, h = 16, 320, 4, 20
    layer = DSCLayer(num_bases=m, top_k=k, hidden_dim=h, compute=compute)
    assert dsc_router.pruning_block(m, k) is not None
    x = jax.random.normal(jax.random.key(6), (6, 7, d))
    params = nn.meta.unbox(layer.init(jax.random.key(7), x)["params"])
    params["router"]["kernel"] = params["router"]["kernel"] * 40.0  # spread the logits
    y, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    ref = dsc_reference(to_numpy64(params), np.asarray(x).reshape(-1, d), k, "refined")
    np.testing.assert_array_equal(
        state["intermediates"]["top_k_indices"][0].reshape(-1, k), ref["indices"]
    )
    np.testing.assert_allclose(y.reshape(-1, d), ref["output"], atol=1e-5, rtol=1e-4)

    def plain(params, x):  # the pre-fast-path math: dense autodiff everywhere
        return plain_dsc_apply(layer, params, x)

    cotangent = jax.random.normal(jax.random.key(8), x.shape)

    def loss(fn):
        return lambda params, x: jnp.sum(fn(params, x) * cotangent)

    got = jax.grad(loss(lambda p, x: layer.apply({"params": p}, x)), (0, 1))(params, x)
    want = jax.grad(loss(plain), (0, 1))(params, x)
    for (path, g), w in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
        scale = float(jnp.max(jnp.abs(w))) + 1e-12
        np.testing.assert_allclose(g, w, atol=2e-5 * scale, rtol=1e-4, err_msg=str(path))
