"""Flax NNX transforms over the ``dsc_jax.nnx`` faces: ``nnx.vmap`` ensembles, ``nnx.scan``
over stacked layers, ``nnx.remat``, and a stacked ensemble placed on a mesh.

Each transformed model is checked against its untransformed members (sliced out of the
stacked state with ``nnx.merge``), on the gather compute path (the custom-JVP contraction
and logit rules). Tolerances: the same float32 math in another program order, so
``atol=rtol=1e-5`` for outputs and regularisers, ``atol=1e-5, rtol=1e-4`` for gradients.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

import dsc_jax
from dsc_jax import nnx as dnnx
from dsc_jax.sharding import merge_rules

pytestmark = pytest.mark.usefixtures("fast_compiles")

D = 16
MEMBERS = 3
FIELDS = {"num_bases": 64, "top_k": 2, "hidden_dim": 16, "compute": "gather"}
OUT_TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}


def make_ensemble(seed: int = 0) -> dnnx.DSCLayer:
    """``MEMBERS`` DSC layers stacked on a leading axis (``nnx.split_rngs`` + ``nnx.vmap``);
    ``transform_metadata`` names that axis ``layers`` in the parameters' sharding metadata."""

    @nnx.split_rngs(splits=MEMBERS)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> dnnx.DSCLayer:
        return dnnx.DSCLayer(D, **FIELDS, rngs=rngs)

    return make(nnx.Rngs(seed))


def member(ensemble: nnx.Module, index: int) -> nnx.Module:
    """Member ``index`` of a stacked ensemble, as an ordinary (unstacked) module."""
    graphdef, state = nnx.split(ensemble)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[index], state))


def inputs(shape=(2, 5, D), seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_vmap_ensemble_equals_its_members_with_regularizers():
    """Outputs and the sown regularisers of an ``nnx.vmap`` ensemble are its members'."""
    ensemble, x = make_ensemble(), inputs()

    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def run(layer: dnnx.DSCLayer, x: jax.Array) -> jax.Array:
        return layer(x, deterministic=False)

    stacked = run(ensemble, x)
    chex.assert_shape(stacked, (MEMBERS, *x.shape))
    regs = dnnx.collect_regularizers(ensemble)
    assert set(regs) == {"aux", "budget", "frame", "z"}
    for i in range(MEMBERS):
        alone = member(ensemble, i)
        np.testing.assert_allclose(stacked[i], alone(x, deterministic=False), **OUT_TOL)
        mine = dnnx.collect_regularizers(alone)
        for term, (value,) in regs.items():
            np.testing.assert_allclose(value[i], mine[term][0], **OUT_TOL)
    # distinct members (split_rngs really split): outputs differ between members
    assert float(jnp.abs(stacked[0] - stacked[1]).max()) > 1e-3


def scan_forward(ensemble: dnnx.DSCLayer, x: jax.Array) -> jax.Array:
    """``x`` through the stacked layers in order (``nnx.scan``), with residuals."""

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def step(layer: dnnx.DSCLayer, h: jax.Array) -> jax.Array:
        return h + layer(h, deterministic=False)

    return step(ensemble, x)


def loop_forward(layers: list[nnx.Module], x: jax.Array) -> jax.Array:
    for layer in layers:
        x = x + layer(x, deterministic=False)
    return x


def test_scan_over_stacked_layers_equals_the_loop_and_its_gradients():
    ensemble, x = make_ensemble(), inputs()
    layers = [member(ensemble, i) for i in range(MEMBERS)]
    np.testing.assert_allclose(scan_forward(ensemble, x), loop_forward(layers, x), **OUT_TOL)

    def scan_loss(model: dnnx.DSCLayer) -> jax.Array:
        return jnp.sum(scan_forward(model, x) ** 2)

    def loop_loss(models: list[nnx.Module]) -> jax.Array:
        return jnp.sum(loop_forward(models, x) ** 2)

    scanned = nnx.to_pure_dict(nnx.grad(scan_loss)(ensemble))  # gradients of the Params
    looped = nnx.to_pure_dict(nnx.grad(loop_loss)(nnx.List(layers)))
    assert len(looped) == MEMBERS
    for i in range(MEMBERS):
        mine = jax.tree.map(lambda leaf, i=i: leaf[i], scanned)
        chex.assert_trees_all_close(mine, looped[i], **GRAD_TOL)
    assert np.abs(np.asarray(scanned["basis_u"])).max() > 0  # the bank is in the graph


def test_remat_gradients_equal_the_plain_layer():
    """``nnx.remat`` of the call (regularisers sown inside) gives the plain gradients."""
    layer, x = dnnx.DSCLayer(D, **FIELDS, rngs=nnx.Rngs(0)), inputs()

    def objective(model: dnnx.DSCLayer, call) -> jax.Array:
        y = call(model, x)
        reg, _ = dsc_jax.regularization_loss(dnnx.collect_regularizers(model))
        return jnp.sum(y**2) + reg

    def plain(model, x):
        return model(x, deterministic=False)

    rematted = nnx.remat(plain)
    g_plain = nnx.grad(lambda m: objective(m, plain))(layer)
    g_remat = nnx.grad(lambda m: objective(m, rematted))(layer)
    chex.assert_trees_all_close(nnx.to_pure_dict(g_remat), nnx.to_pure_dict(g_plain), **GRAD_TOL)
    # the regularisers reach the gradient: the frame term moves the bank even with y ignored
    g_reg = nnx.grad(lambda m: objective(m, lambda mm, xx: 0.0 * rematted(mm, xx)))(layer)
    assert np.abs(np.asarray(nnx.to_pure_dict(g_reg)["basis_u"])).max() > 0


def test_stacked_ensemble_placed_on_a_mesh_with_the_abstract_models_shardings():
    """The documented recipe for a sharded ``nnx.vmap`` ensemble on XLA:CPU: create it
    outside the mesh, then place it with the shardings ``nnx.eval_shape`` gives under it."""
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = merge_rules((("layers", None),), dsc_jax.LOGICAL_AXIS_RULES, mesh=mesh)
    ensemble = make_ensemble()
    x = inputs()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = nnx.eval_shape(make_ensemble)
        shardings = nnx.get_named_sharding(nnx.state(abstract), mesh)
        graphdef, state = nnx.split(ensemble)
        placed = nnx.merge(graphdef, jax.device_put(state, shardings))
    bank = placed.basis_u.get_value()
    assert isinstance(bank.sharding, NamedSharding)
    assert tuple(bank.sharding.spec) == (None, "tensor", "fsdp"), bank.sharding.spec
    assert len({str(s.index) for s in bank.addressable_shards}) == 4  # split, not replicated

    @nnx.jit
    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def run(layer: dnnx.DSCLayer, x: jax.Array) -> jax.Array:
        return layer(x)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded_out = run(placed, x)
    np.testing.assert_allclose(sharded_out, run(ensemble, x), **OUT_TOL)
