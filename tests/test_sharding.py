"""Mesh construction, logical-axis rules, divisibility fallback and sharded jitted steps."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax import sharding as sh

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_make_mesh_shapes_and_fill() -> None:
    for shape, want in [
        ((8, 1, 1), (8, 1, 1)),
        ((-1, 1, 1), (8, 1, 1)),
        ((2, -1, 2), (2, 2, 2)),
        ((1, 4, -1), (1, 4, 2)),
    ]:
        mesh = sh.make_mesh(shape)
        assert mesh.axis_names == sh.MESH_AXES
        assert tuple(mesh.shape.values()) == want
        assert all(t == AxisType.Auto for t in mesh.axis_types)
    mesh = sh.make_mesh((2, 1, -1), devices=jax.devices()[:4])
    assert tuple(mesh.shape.values()) == (2, 1, 2)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, -1, 1), r"\(3, -1, 1\).*device count 8"),
        ((2, 2, 1), r"\(2, 2, 1\).*8 devices"),
        ((4, 4, 1), r"\(4, 4, 1\).*8 devices"),
        ((-1, -1, 1), "at most one -1"),
        ((8, 0, 1), "positive"),
        ((8, 1), "3 entries"),
    ],
)
def test_make_mesh_errors(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sh.make_mesh(shape)


def test_default_config_and_overrides() -> None:
    cfg = sh.default_mesh_config()
    assert tuple(cfg.shape) == (-1, 1, 1)
    assert sh.rules_from_config(cfg) == sh.LOGICAL_AXIS_RULES
    cfg.logical_axis_rules = "bases=, embed=fsdp+tensor"
    rules = dict(sh.rules_from_config(cfg))
    assert rules["bases"] is None
    assert rules["embed"] == ("fsdp", "tensor")
    assert rules["mlp"] == "tensor"
    # A typo'd logical name used to be appended (and silently ignored): now it is refused.
    with pytest.raises(ValueError, match=r"unknown logical name 'base'.*'bases'"):
        sh.parse_rule_overrides("base=")
    with pytest.raises(ValueError, match="not in"):
        sh.parse_rule_overrides("embed=model")
    with pytest.raises(ValueError, match="name=axis"):
        sh.parse_rule_overrides("embed")


def test_rules_cover_design_names() -> None:
    rules = dict(sh.LOGICAL_AXIS_RULES)
    for name in ("embed", "mlp", "heads", "kv", "vocab", "position", "bases", "experts", "rank"):
        assert name in rules
    assert rules["batch"] == ("data", "fsdp")
    assert rules["embed"] == "fsdp"
    assert rules["bases"] == rules["mlp"] == rules["vocab"] == rules["heads"] == "tensor"


def test_logical_to_mesh_spec_priority_and_fallback(caplog: pytest.LogCaptureFixture) -> None:
    mesh = sh.make_mesh((2, 2, 2))
    spec = sh.logical_to_mesh_spec
    assert spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert spec(("experts", "embed", "mlp"), mesh) == P(None, "fsdp", "tensor")
    assert spec(("experts", "embed", "rank"), mesh) == P("tensor", "fsdp", None)
    # activation: batch takes data+fsdp, so embed finds fsdp taken and stays whole
    assert spec(("batch", "length", "embed"), mesh) == P(("data", "fsdp"), None, None)
    assert spec(("vocab", "embed"), mesh) == P("tensor", "fsdp")
    assert spec((None, "kv"), mesh) == P(None, None)
    assert spec(("bases", "embed"), mesh, {"bases": "tensor"}) == P("tensor", None)
    with caplog.at_level(logging.INFO, logger="dsc_jax.sharding"):
        # M = 1523 atoms (prime) on tensor=2: replicated, logged once
        assert spec(("bases", "embed"), mesh, shape=(1523, 8)) == P(None, "fsdp")
        assert spec(("bases", "embed"), mesh, shape=(1523, 8)) == P(None, "fsdp")
        # tuple axes keep the longest dividing prefix: 2 rows on data x fsdp = 4
        assert spec(("batch", "length"), mesh, shape=(2, 5)) == P("data", None)
    notes = [r for r in caplog.records if "1523" in r.getMessage()]
    assert len(notes) == 1
    with pytest.raises(ValueError, match="do not match"):
        spec(("embed",), mesh, shape=(4, 4))


class _Toy(nn.Module):
    """Tiny two-layer net with DSC-style logical names (bank rows = bases)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.5)
        w1 = self.param("w1", nn.with_logical_partitioning(init, ("embed", "mlp")), (8, 16))
        w2 = self.param("w2", nn.with_logical_partitioning(init, ("mlp", "embed")), (16, 8))
        bank = self.param("bank", nn.with_logical_partitioning(init, ("bases", "embed")), (6, 8))
        odd = self.param("odd", nn.with_logical_partitioning(init, ("bases", "embed")), (5, 8))
        h = jax.nn.gelu(x @ w1) @ w2
        c = jnp.tanh(h @ bank.T)
        return h + c @ bank + jnp.mean(odd) * x


def _init(key: jax.Array) -> dict:
    return _Toy().init(key, jnp.ones((4, 8)))["params"]


EXPECTED_SPECS = {
    (8, 1, 1): {"w1": P("fsdp", "tensor"), "bank": P("tensor", "fsdp"), "odd": P("tensor", "fsdp")},
    (2, 2, 2): {"w1": P("fsdp", "tensor"), "bank": P("tensor", "fsdp"), "odd": P(None, "fsdp")},
}


def test_logical_to_shardings_trees() -> None:
    mesh = sh.make_mesh((2, 2, 2))
    abstract = jax.eval_shape(_init, jax.random.key(0))
    shardings = sh.logical_to_shardings(abstract, mesh)
    got = {k: v.spec for k, v in shardings.items()}
    assert got["w1"] == P("fsdp", "tensor") and got["w2"] == P("tensor", "fsdp")
    assert got["bank"] == P("tensor", "fsdp") and got["odd"] == P(None, "fsdp")
    # PartitionSpec leaves (nn.get_partition_spec) + shapes give the same answer
    specs = nn.get_partition_spec(abstract)
    shapes = nn.unbox(abstract)
    same = sh.logical_to_shardings(specs, mesh, shapes=shapes)
    assert jax.tree.map(lambda s: s.spec, same) == jax.tree.map(lambda s: s.spec, shardings)
    # without shapes there is no fallback; plain arrays are replicated
    assert sh.logical_to_shardings(specs, mesh)["odd"].spec == P("tensor", "fsdp")
    assert sh.logical_to_shardings({"a": jnp.ones(3)}, mesh)["a"].spec == P()


def test_batch_sharding_and_shard_batch() -> None:
    mesh = sh.make_mesh((2, 4, 1))
    s = sh.batch_sharding(mesh)
    assert s.spec == P(("data", "fsdp"), None)
    assert sh.batch_sharding(mesh, ndim=3).spec == P(("data", "fsdp"), None, None)
    x = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    arr = sh.shard_batch({"tokens": x}, mesh)["tokens"]
    assert arr.sharding.is_equivalent_to(s, 2)
    np.testing.assert_array_equal(np.asarray(arr), x)
    assert {sh_.data.shape for sh_ in arr.addressable_shards} == {(2, 3)}
    with pytest.raises(ValueError, match="not divisible"):
        sh.shard_batch(np.zeros((6, 3)), mesh)


def test_create_sharded_matches_unsharded_init() -> None:
    key = jax.random.key(3)
    ref = nn.unbox(_init(key))
    tx = optax.adamw(1e-2)
    for shape in [(8, 1, 1), (2, 2, 2)]:
        mesh = sh.make_mesh(shape)

        def init_state(k: jax.Array) -> tuple:
            params = _init(k)
            return params, tx.init(params)

        (params, opt_state), shardings = sh.create_sharded(init_state, mesh, args=(key,))
        for name, spec in EXPECTED_SPECS[shape].items():
            assert params[name].sharding.spec == spec, (shape, name)
            assert shardings[0][name].spec == spec
            assert opt_state[0].mu[name].sharding.spec == spec  # optimiser state follows
        assert opt_state[0].count.sharding.spec == P()
        # Same draws; the eager reference and the jitted sharded init may round erf_inv's
        # last bit differently (float32: rtol 1e-6).
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), params, ref)


def _loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(_Toy().apply({"params": params}, x) - y))


def _train_step(params: dict, opt_state: optax.OptState, x: jax.Array, y: jax.Array):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, opt_state = _TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


_TX = optax.adamw(1e-2)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_jitted_step_matches_unsharded(shape: tuple[int, int, int]) -> None:
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jax.random.normal(jax.random.key(2), (16, 8))

    # reference: single device, no shardings
    params = nn.unbox(_init(key))
    opt_state = _TX.init(params)
    ref_step = jax.jit(_train_step)
    ref_losses = []
    for _ in range(3):
        params, opt_state, loss = ref_step(params, opt_state, x, y)
        ref_losses.append(float(loss))

    mesh = sh.make_mesh(shape)

    def init_state(k: jax.Array) -> tuple:
        p = _init(k)
        return p, _TX.init(p)

    (sparams, sopt), (p_sh, o_sh) = sh.create_sharded(init_state, mesh, args=(key,))
    data_sh = sh.batch_sharding(mesh)
    loss_sh = NamedSharding(mesh, P())
    step = jax.jit(
        _train_step,
        in_shardings=(p_sh, o_sh, data_sh, data_sh),
        out_shardings=(p_sh, o_sh, loss_sh),
        donate_argnums=(0, 1),
    )
    xs, ys = jax.device_put(x, data_sh), jax.device_put(y, data_sh)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(3):
            sparams, sopt, loss = step(sparams, sopt, xs, ys)
            losses.append(float(loss))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sparams, params
    )
    assert sparams["w1"].sharding.spec == P("fsdp", "tensor")
    assert sparams["w1"].sharding.mesh.shape == mesh.shape


def test_initialize_distributed_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster_vars = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "OMPI_MCA_orte_hnp_uri")
    for var in (*cluster_vars, "TPU_WORKER_HOSTNAMES", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    from dsc_jax.distributed import initialize_distributed

    assert initialize_distributed() is False  # no cluster: plain single-process run
    assert initialize_distributed(num_processes=1) is False
    assert not jax.distributed.is_initialized()


class _Heads(nn.Module):
    """DenseGeneral with a rank-3 logical kernel (its init reshapes a rank-2 kernel)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "heads", "kv"))
        return nn.DenseGeneral((4, 2), kernel_init=init, use_bias=False)(x)


def test_create_sharded_dense_general_and_masked_optimizer() -> None:
    mesh = sh.make_mesh((2, 2, 2))
    tx = optax.masked(optax.adam(1e-3), {"DenseGeneral_0": {"kernel": False}})

    def init_state(k: jax.Array) -> tuple:
        params = _Heads().init(k, jnp.ones((2, 8)))["params"]
        return params, tx.init(params)

    (params, opt_state), (_, o_sh) = sh.create_sharded(init_state, mesh, args=(jax.random.key(0),))
    assert params["DenseGeneral_0"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert jax.tree.structure(o_sh) == jax.tree.structure(opt_state)
