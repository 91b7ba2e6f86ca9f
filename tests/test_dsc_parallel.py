"""DSCLayer under data parallelism (shard_map, pmap) and basis parallelism (bank sharded on bases).

All variants must reproduce the single-program ``jit`` result: data parallelism splits the
tokens (every token's routing is local), basis parallelism splits the M atoms of the bank and
the router columns over a mesh axis while XLA keeps top-K exact over all M.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax import sharding as sh
from dsc_jax.layers.dsc import DSCLayer

D_MODEL, NUM_BASES, TOP_K, HIDDEN = 16, 32, 4, 24
BATCH, SEQ = 8, 4  # 32 tokens
ATOL, RTOL = 1e-5, 1e-5


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _layer(compute: str = "gather", variant: str = "refined") -> DSCLayer:
    return DSCLayer(
        num_bases=NUM_BASES, top_k=TOP_K, hidden_dim=HIDDEN, variant=variant, compute=compute
    )


def _params(layer: DSCLayer) -> dict:
    """Initialised params with a spread-out router, so the top-K has clear margins."""
    params = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((2, D_MODEL)))["params"])
    k1, k2 = jax.random.split(jax.random.key(7))
    router = {
        "kernel": 0.5 * jax.random.normal(k1, params["router"]["kernel"].shape),
        "bias": 0.5 * jax.random.normal(k2, params["router"]["bias"].shape),
    }
    return {**params, "router": router, "gamma": params["gamma"] + 0.3}


def _x() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (BATCH, SEQ, D_MODEL))


def _apply(layer: DSCLayer, params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    y, state = layer.apply({"params": params}, x, mutable=["losses", "intermediates"])
    indices = state["intermediates"]["top_k_indices"][0]
    losses = {k: v[0] for k, v in state["losses"].items()}
    return y, indices, losses


@pytest.mark.parametrize("compute", ["gather", "dense"])
def test_shard_map_data_parallel_matches_jit(compute: str) -> None:
    layer = _layer(compute)
    params, x = _params(layer), _x()
    y_ref, idx_ref, loss_ref = jax.jit(lambda p, x: _apply(layer, p, x))(params, x)

    mesh = sh.make_mesh((8, 1, 1))

    def per_shard(p: dict, xs: jax.Array):
        y, idx, losses = _apply(layer, p, xs)
        # mean-over-tokens terms combine exactly with a mean over equal shards
        z = jax.lax.pmean(losses["z"], ("data", "fsdp"))
        return y, idx, z, losses["frame"]

    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(P(), P(sh.BATCH_AXES)),
            out_specs=(P(sh.BATCH_AXES), P(sh.BATCH_AXES), P(), P()),
        )
    )
    y, idx, z, frame = fn(params, x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(sh.BATCH_AXES)), y.ndim)
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(z, loss_ref["z"], rtol=RTOL)
    np.testing.assert_allclose(frame, loss_ref["frame"], rtol=RTOL)


@pytest.mark.parametrize(
    ("shape", "compute", "variant"),
    [
        ((1, 1, 8), "gather", "refined"),
        ((1, 2, 4), "dense", "basic"),
    ],
)
def test_basis_parallel_bank_sharded_matches_unsharded(
    shape: tuple[int, int, int], compute: str, variant: str
) -> None:
    layer = _layer(compute, variant)
    params, x = _params(layer), _x()
    y_ref, idx_ref, loss_ref = jax.jit(lambda p, x: _apply(layer, p, x))(params, x)

    mesh = sh.make_mesh(shape)
    abstract = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((2, D_MODEL)))["params"]
    shardings = sh.logical_to_shardings(abstract, mesh)
    tensor = shape[2]
    # bank rows and router columns are split along bases over the tensor axis
    assert shardings["basis_u"].spec == P("tensor", "fsdp")
    assert shardings["router"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["router"]["bias"].spec == P("tensor")
    sharded_params = jax.device_put(params, shardings)
    assert sharded_params["basis_v"].addressable_shards[0].data.shape[0] == NUM_BASES // tensor
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(sh.BATCH_AXES)))

    fn = jax.jit(
        lambda p, x: _apply(layer, p, x),
        in_shardings=(shardings, NamedSharding(mesh, P(sh.BATCH_AXES))),
    )
    with jax.set_mesh(mesh):
        y, idx, losses = fn(sharded_params, x_sharded)
    np.testing.assert_array_equal(idx, idx_ref)  # top-K over all M atoms, exactly
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=RTOL)
    for name, value in loss_ref.items():
        np.testing.assert_allclose(losses[name], value, rtol=1e-4, atol=1e-6, err_msg=name)

    # gradients through the sharded bank equal the unsharded ones
    def loss_fn(p: dict, x: jax.Array) -> jax.Array:
        y, _, losses = _apply(layer, p, x)
        return jnp.mean(jnp.square(y)) + losses["frame"] + losses["aux"]

    g_ref = jax.jit(jax.grad(loss_fn))(params, x)
    with jax.set_mesh(mesh):
        g = jax.jit(jax.grad(loss_fn), out_shardings=shardings)(sharded_params, x_sharded)
    assert g["basis_u"].sharding.spec == P("tensor", "fsdp")
    # float32 sums in another order: the error scales with the largest gradient entry (the
    # bank's are ~1/bank_radius = 50x the others)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, atol=1e-5 + 2e-6 * float(np.max(np.abs(b))), rtol=1e-4
        ),
        g,
        g_ref,
    )


def test_pmap_matches_jit() -> None:
    layer = _layer("gather")
    params, x = _params(layer), _x()
    y_ref, idx_ref, _ = jax.jit(lambda p, x: _apply(layer, p, x))(params, x)
    n = jax.local_device_count()
    xs = x.reshape(n, BATCH // n, SEQ, D_MODEL)
    y, idx, losses = jax.pmap(lambda p, x: _apply(layer, p, x), in_axes=(None, 0))(params, xs)
    np.testing.assert_allclose(y.reshape(y_ref.shape), y_ref, atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(idx.reshape(idx_ref.shape), idx_ref)
    assert losses["frame"].shape == (n,)
