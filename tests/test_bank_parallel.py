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
