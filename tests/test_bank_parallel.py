"""Bank parallelism on 8 fake CPU devices: the sharded contraction equals the unsharded one
(values and gradients), and no device holds more than its share of the bank.

Tolerances: the same float32 terms summed in another order across shards, so
``atol=1e-5, rtol=1e-5`` (outputs and gradients are O(1)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax.layers.bank_parallel import contract_sharded_banks
from dsc_jax.layers.dsc_contract import contract_raw_banks

pytestmark = pytest.mark.usefixtures("fast_compiles")

TOL = {"atol": 1e-5, "rtol": 1e-5}
EPS = 1e-6


def mesh_2x4() -> Mesh:
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    return Mesh(devices, ("data", "bank"), axis_types=(AxisType.Auto, AxisType.Auto))


def problem(tokens=64, top_k=4, num_bases=512, d=32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (tokens, d))
    bank_u = 0.02 * jax.random.normal(keys[1], (num_bases, d))  # raw rows at any norm
    bank_v = 0.02 * jax.random.normal(keys[2], (num_bases, d))
    indices = jax.random.randint(keys[3], (tokens, top_k), 0, num_bases)
    gates = jax.random.uniform(keys[4], (tokens, top_k))
    return x, bank_u, bank_v, indices, gates


def objective(contract, indices):
    def loss(x, bank_u, bank_v, gates):
        return jnp.sum(jnp.sin(3.0 * contract(x, bank_u, bank_v, indices, gates, EPS)))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def sharded(x, bank_u, bank_v, indices, gates, eps):
    return contract_sharded_banks(x, bank_u, bank_v, indices, gates, eps, axis_name="bank")


def place(mesh, x, bank_u, bank_v, gates):
    bank, tokens = NamedSharding(mesh, P("bank", None)), NamedSharding(mesh, P("data"))
    return (
        jax.device_put(x, tokens),
        jax.device_put(bank_u, bank),
        jax.device_put(bank_v, bank),
        jax.device_put(gates, tokens),
    )


@pytest.mark.parametrize("tokens", [64, 18], ids=["tokens_split", "tokens_whole"])
def test_sharded_contraction_equals_the_unsharded_one_with_gradients(tokens):
    """64 tokens split along the bank axis (all-gather + reduce-scatter); 18 tokens are not a
    multiple of its 4 devices (kept whole, psum)."""
    x, bank_u, bank_v, indices, gates = problem(tokens=tokens)
    want = objective(contract_raw_banks, indices)(x, bank_u, bank_v, gates)
    mesh = mesh_2x4()
    with jax.set_mesh(mesh):
        got = jax.jit(objective(sharded, indices))(*place(mesh, x, bank_u, bank_v, gates))
    value, grads = got
    np.testing.assert_allclose(value, want[0], **TOL)
    for name, g, w in zip(("x", "bank_u", "bank_v", "gates"), grads, want[1], strict=True):
        np.testing.assert_allclose(g, w, err_msg=name, **TOL)
    assert tuple(grads[1].sharding.spec)[:1] == ("bank",)  # bank gradient stays sharded
    # every shard saw some picks: the test exercises the cross-shard sum
    owners = np.unique(np.asarray(indices) // (bank_u.shape[0] // 4))
    assert owners.tolist() == [0, 1, 2, 3]


def test_picks_of_other_shards_contribute_nothing_locally():
    """All picks on shard 2's atoms: the output is exactly the unsharded layer's (a device
    that counted another shard's pick as its own would add a wrong row)."""
    x, bank_u, bank_v, _, gates = problem()
    rows = bank_u.shape[0] // 4
    indices = jax.random.randint(jax.random.key(5), gates.shape, 2 * rows, 3 * rows)
    want = contract_raw_banks(x, bank_u, bank_v, indices, gates, EPS)
    mesh = mesh_2x4()
    with jax.set_mesh(mesh):
        got = jax.jit(sharded)(*place(mesh, x, bank_u, bank_v, gates)[:3], indices, gates, EPS)
    np.testing.assert_allclose(got, want, **TOL)


def _memory(fn, *args):
    return fn.lower(*args).compile().memory_analysis()


def test_no_device_holds_more_than_its_share_of_the_bank():
    """From the compiled programs' memory analysis: the sharded forward+backward takes 1/4 of
    the bank per device and never builds a whole bank in its temporaries; the same jit of the
    unsharded contraction on the same sharded banks all-gathers them (the failure this
    guards against)."""
    x, bank_u, bank_v, indices, gates = problem(tokens=64, top_k=4, num_bases=8192, d=32)
    bank_bytes = bank_u.size * 4
    mesh = mesh_2x4()
    with jax.set_mesh(mesh):
        args = place(mesh, x, bank_u, bank_v, gates)
        ours = _memory(jax.jit(objective(sharded, indices)), *args)
        naive = _memory(jax.jit(objective(contract_raw_banks, indices)), *args)
    # arguments: two bank shards + this device's tokens and gates
    assert 2 * bank_bytes / 4 <= ours.argument_size_in_bytes < 2 * bank_bytes / 4 * 1.2
    assert ours.temp_size_in_bytes < bank_bytes / 2, ours
    assert naive.temp_size_in_bytes >= bank_bytes, naive  # the whole bank, gathered


def test_bad_bank_axis_and_sizes_raise():
    x, bank_u, bank_v, indices, gates = problem()
    with pytest.raises(ValueError, match="no mesh is active"):
        sharded(x, bank_u, bank_v, indices, gates, EPS)
    with jax.set_mesh(mesh_2x4()):
        with pytest.raises(ValueError, match=r"'experts' is not an axis of the active mesh"):
            contract_sharded_banks(x, bank_u, bank_v, indices, gates, EPS, axis_name="experts")
        with pytest.raises(ValueError, match="num_bases=510 is not a multiple of the 4"):
            sharded(x, bank_u[:510], bank_v[:510], indices % 510, gates, EPS)


# --- the layer: DSCLayer(bank_axis=...) under jit on a (data=2, tensor=4) mesh ----------------

D_MODEL = 16
LAYER_FIELDS = {
    "flat": {"num_bases": 64, "top_k": 4, "hidden_dim": 16, "compute": "gather"},
    "product_key": {"num_bases": 64, "top_k": 4, "hidden_dim": 16, "router": "product_key"},
}
#: flat: the bank's ``embed`` dim also sharded over ``data`` (an FSDP-style mapping, which
#: the layer all-gathers); product keys: ``embed`` replicated.
EMBED_AXIS = {"flat": "data", "product_key": None}


def mesh_data_tensor() -> Mesh:
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    return Mesh(devices, ("data", "tensor"), axis_types=(AxisType.Auto, AxisType.Auto))


def layer_objective(layer, x):
    """``(y, losses), grads``: a scalar of the output and every regulariser, and its gradient
    with respect to the parameters."""

    def loss(params):
        y, state = layer.apply({"params": params}, x, mutable=["losses"])
        losses = state["losses"]
        total = jnp.sum(jnp.sin(3.0 * y)) + sum(jax.tree.leaves(losses))
        return total, (y, losses)

    return jax.value_and_grad(loss, has_aux=True)


@pytest.mark.parametrize("router", list(LAYER_FIELDS))
def test_layer_with_bank_axis_equals_the_unsharded_layer(router):
    """Outputs, regularisers and parameter gradients of ``DSCLayer(bank_axis="tensor")`` under
    ``jax.jit`` on a ``(data=2, tensor=4)`` mesh with ``bases -> tensor`` equal those of the
    layer without ``bank_axis`` on the same placed parameters (so the parts ``bank_axis``
    does not touch, e.g. the frame loss, whose Welch-bound excess cancels to a few 1e-5
    relative under the compiler's resharding, are partitioned alike on both sides); the
    program runs the sharded contraction and the bank gradient stays sharded."""
    import flax.linen as nn

    from dsc_jax.layers import DSCLayer
    from dsc_jax.sharding import LOGICAL_AXIS_RULES, logical_to_shardings, merge_rules

    fields = LAYER_FIELDS[router]
    x = jax.random.normal(jax.random.key(1), (4, 8, D_MODEL))  # 32 tokens: split over 4
    boxed = DSCLayer(**fields).init(jax.random.key(0), x)["params"]
    mesh = mesh_data_tensor()
    rules = merge_rules((("embed", EMBED_AXIS[router]),), LOGICAL_AXIS_RULES, mesh=mesh)
    with jax.set_mesh(mesh):
        shardings = logical_to_shardings(boxed, mesh, rules)
        placed = jax.device_put(nn.unbox(boxed), shardings)
        plain = jax.jit(layer_objective(DSCLayer(**fields), x))
        (want_total, (want_y, want_losses)), want_grads = plain(placed)
        fn = jax.jit(layer_objective(DSCLayer(**fields, bank_axis="tensor"), x))
        assert "shard_map" in str(jax.make_jaxpr(fn)(placed))  # the sharded path ran
        assert "shard_map" not in str(jax.make_jaxpr(plain)(placed))
        (total, (y, losses)), grads = fn(placed)
    assert shardings["basis_u"].spec == P("tensor", EMBED_AXIS[router])
    np.testing.assert_allclose(y, want_y, **TOL)
    np.testing.assert_allclose(total, want_total, **TOL)
    assert set(losses) == set(want_losses) and {"aux", "budget", "frame", "z"} <= set(losses)
    for name in want_losses:
        np.testing.assert_allclose(losses[name], want_losses[name], err_msg=name, **TOL)
    flat_grads = jax.tree_util.tree_leaves_with_path(grads)
    for (path, g), w in zip(flat_grads, jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, err_msg=jax.tree_util.keystr(path), **TOL)
    assert tuple(grads["basis_u"].sharding.spec)[:1] == ("tensor",)


def test_nnx_layer_with_bank_axis_equals_the_unsharded_layer():
    """The NNX face passes ``bank_axis`` through: built and applied under the mesh (its
    construction traces a call), it computes what the same layer without it does."""
    from flax import nnx

    import dsc_jax.nnx as dnnx

    fields = LAYER_FIELDS["flat"]
    x = jax.random.normal(jax.random.key(1), (4, 8, D_MODEL))
    plain = dnnx.DSCLayer(D_MODEL, **fields, rngs=nnx.Rngs(0))
    want = plain(x, deterministic=False, rngs=jax.random.key(2))
    want_losses = plain.regularizer_values()
    with jax.set_mesh(mesh_data_tensor()):
        layer = dnnx.DSCLayer(D_MODEL, **fields, bank_axis="tensor", rngs=nnx.Rngs(0))
        assert layer.linen.bank_axis == "tensor"
        got = nnx.jit(lambda m, x: m(x, deterministic=False, rngs=jax.random.key(2)))(layer, x)
    np.testing.assert_allclose(got, want, **TOL)
    for name, value in want_losses.items():
        np.testing.assert_allclose(layer.regularizer_values()[name], value, **TOL)


def test_bank_axis_field_validation():
    from dsc_jax.layers import DSCLayer

    with pytest.raises(ValueError, match=r"compute='dense' is invalid with bank_axis='tensor'"):
        DSCLayer(num_bases=64, top_k=4, hidden_dim=8, compute="dense", bank_axis="tensor")
    with pytest.raises(ValueError, match=r"bank_axis='' is invalid"):
        DSCLayer(num_bases=64, top_k=4, hidden_dim=8, bank_axis="")
    layer = DSCLayer(num_bases=64, top_k=4, hidden_dim=8, bank_axis="tensor")
    x = jnp.ones((2, D_MODEL))
    variables = layer.init(jax.random.key(0), x)  # init needs no mesh
    with pytest.raises(ValueError, match="no mesh is active"):
        layer.apply(variables, x)


def test_trainer_refuses_bank_axis_before_any_compute():
    """``--config.model.ffn.bank_axis=tensor`` reaches validation (the field is a str
    placeholder) and is refused in one line: the trainer's step does not run under
    ``jax.set_mesh`` yet. An axis the trainer's mesh lacks is named as such."""
    from dsc_jax.train import config as config_lib

    config = config_lib.base_config("dsc")
    config_lib.validate_config(config)  # unset: fine
    config.model.ffn.bank_axis = "tensor"
    assert config_lib.model_config(config).ffn.bank_axis == "tensor"
    with pytest.raises(ValueError, match=r"bank_axis='tensor': the trainer does not support"):
        config_lib.validate_config(config)
    config.model.ffn.bank_axis = "bank"
    with pytest.raises(ValueError, match=r"bank_axis='bank' is invalid.*'data', 'fsdp', 'tensor'"):
        config_lib.validate_config(config)
