"""dsc_jax.nnx: the NNX faces compute exactly what the Linen layers compute.

Tolerances: NNX and Linen run the same Linen ``apply`` on the same float32 arrays, so outputs
and regularisers must agree to ``atol=rtol=1e-6`` (float32 round-off headroom only).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dsc_jax
from dsc_jax import nnx as dnnx
from dsc_jax.layers import DenseFFN, DSCLayer, MoELayer, MoLoRALayer

pytestmark = pytest.mark.usefixtures("fast_compiles")

D = 16
TOL = {"atol": 1e-6, "rtol": 1e-6}
LAYERS = {
    "dsc": (DSCLayer, dnnx.DSCLayer, {"num_bases": 8, "top_k": 2, "hidden_dim": 16}),
    "dsc_product_key": (
        DSCLayer,
        dnnx.DSCLayer,
        {"num_bases": 64, "top_k": 2, "hidden_dim": 16, "router": "product_key"},
    ),
    "moe": (
        MoELayer,
        dnnx.MoELayer,
        {"num_experts": 4, "top_k": 2, "hidden_dim": 8, "jitter_std": 0.1},
    ),
    "molora": (
        MoLoRALayer,
        dnnx.MoLoRALayer,
        {"num_experts": 4, "rank": 2, "top_k": 2, "hidden_dim": 16},
    ),
    "dense": (DenseFFN, dnnx.DenseFFN, {"hidden_dim": 16}),
}
KINDS = tuple(LAYERS)


def inputs(shape=(2, 3, D), seed=1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def make_pair(kind: str, **overrides):
    linen_cls, nnx_cls, fields = LAYERS[kind]
    fields = {**fields, "dropout_rate": 0.1, **overrides}
    return linen_cls(**fields), nnx_cls(D, **fields, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_regularizers_match_linen(kind):
    """Training mode (dropout 0.1, MoE jitter) with the same dropout key, and eval mode."""
    linen_layer, layer = make_pair(kind)
    x, key = inputs(), jax.random.key(7)
    variables = {"params": layer.params}
    y_ref, state = linen_layer.apply(
        variables, x, False, rngs={"dropout": key}, mutable=["losses", "intermediates"]
    )
    y = layer(x, deterministic=False, rngs=key)
    chex.assert_trees_all_close(y, y_ref, **TOL)
    chex.assert_trees_all_close(
        dnnx.collect_regularizers(layer), dict(state.get("losses", {})), **TOL
    )
    if kind != "dense":
        assert set(dnnx.collect_regularizers(layer)) == (
            {"aux", "budget", "frame", "z"} if kind.startswith("dsc") else {"aux", "z"}
        )
        assert float(dnnx.collect_diagnostics(layer)["tokens"]) == 6.0
    chex.assert_trees_all_close(layer(x), linen_layer.apply(variables, x), **TOL)
    with pytest.raises(ValueError, match="rngs= is only used with deterministic=False"):
        layer(x, deterministic=True, rngs=key)  # would be ignored
    # eval computes no regulariser: zeros of the same structure
    chex.assert_trees_all_equal_structs(
        dnnx.collect_regularizers(layer), dict(state.get("losses", {}))
    )
    assert all(float(v) == 0.0 for v in jax.tree.leaves(dnnx.collect_regularizers(layer)))


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_names_shapes_and_init_match_linen(kind):
    """Same tree, shapes and initial values as ``linen.init`` with ``Rngs(0).params()``; every
    Linen path is an attribute path; logical axis names kept as ``out_sharding`` metadata."""
    linen_layer, layer = make_pair(kind)
    boxed = linen_layer.init({"params": nnx.Rngs(0).params()}, inputs((1, D)))["params"]
    chex.assert_trees_all_equal(layer.params, nn.unbox(boxed))
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]:
        node = layer
        for entry in path:
            node = getattr(node, entry.key)
        assert isinstance(node, nnx.Param) and node.shape == leaf.shape, path
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(layer, nnx.Param)))
    assert specs == nn.get_partition_spec(boxed)


def test_dsc_attribute_names():
    _, layer = make_pair("dsc")
    assert layer.mlp_in.kernel.shape == (D, 16) and layer.mlp_out.kernel.shape == (16, D)
    assert layer.basis_u.shape == (8, D) and layer.router.bias.shape == (8,)
    assert layer.gamma.get_metadata()["out_sharding"] == ("embed",)


def test_dsc_product_key_attributes_and_routed_ids():
    """``router="product_key"``: two sub-key tables of ``√M`` keys over the halves of ``d``;
    the diagnostics count usage over all ``M`` atoms by atom id."""
    _, layer = make_pair("dsc_product_key")
    assert layer.router.keys_1.kernel.shape == (D // 2, 8)
    assert layer.router.keys_2.kernel.shape == (D - D // 2, 8)
    assert layer.basis_u.shape == (64, D) and not hasattr(layer.router, "bias")
    x = inputs((4, 16, D))
    layer(x, deterministic=False)
    usage = dnnx.collect_diagnostics(layer)["usage"]
    chex.assert_shape(usage, (64,))
    assert float(usage.sum()) == 4 * 16 * 2
    assert int(jnp.count_nonzero(usage)) > 2  # ids are atom ids, not positions in the top-K


def test_abstract_construction_and_split_merge():
    """``nnx.eval_shape`` builds the layer without computing (sharded-init recipe), and a
    split/merge round trip keeps the per-call variables."""
    abstract = nnx.eval_shape(lambda: make_pair("dsc")[1])
    assert abstract.basis_u.shape == (8, D)
    _, layer = make_pair("dsc")
    graphdef, state = nnx.split(layer)
    merged = nnx.merge(graphdef, state)
    chex.assert_trees_all_close(merged(inputs()), layer(inputs()), **TOL)


@pytest.mark.parametrize("kind", ["dsc", "dsc_product_key", "moe"])
def test_jit_train_step_traces_once_and_regularizers_do_not_accumulate(kind):
    _, layer = make_pair(kind)
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    x, target = inputs(), inputs(seed=2)
    traces, eval_traces = [], []

    @nnx.jit
    def train_step(model, optimizer, x, target):
        traces.append(1)  # Python side effect: runs once per trace

        def loss_fn(model):
            mse = jnp.mean((model(x, deterministic=False) - target) ** 2)
            reg, _ = dsc_jax.regularization_loss(dnnx.collect_regularizers(model))
            return mse + reg, reg

        (_, reg), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return reg

    @nnx.jit
    def eval_step(model, x):
        eval_traces.append(1)
        return model(x)

    before = layer.params
    regs = []
    for _ in range(4):
        regs.append(float(train_step(layer, optimizer, x, target)))
        eval_step(layer, x)  # eval in between must not change the structure
    assert len(traces) == 1 and len(eval_traces) == 1
    # each term holds this call's single value (Linen ``sow`` tuples of length one)
    assert all(len(v) == 1 for v in dnnx.collect_regularizers(layer).values())
    router_kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(layer.params["router"])
        if path[-1].key == "kernel"
    ]  # product keys: keys_1/kernel, keys_2/kernel
    before_kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(before["router"])
        if path[-1].key == "kernel"
    ]
    for after_kernel, before_kernel in zip(router_kernels, before_kernels, strict=True):
        assert not np.allclose(after_kernel, before_kernel)
    # the collection holds the last call's terms only: two more calls on the same parameters
    # and inputs give the same total up to MoE's router jitter (accumulated terms would
    # double it)
    assert regs[0] > 0
    totals = []
    for _ in range(2):
        layer(x, deterministic=False)
        totals.append(float(dsc_jax.regularization_loss(dnnx.collect_regularizers(layer))[0]))
    np.testing.assert_allclose(totals[1], totals[0], rtol=0.05)
    assert totals[0] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_works_without_a_mesh(kind):
    assert jax.sharding.get_abstract_mesh().empty
    _, layer = make_pair(kind)
    y = layer(inputs(), deterministic=False)
    assert y.shape == (2, 3, D) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_params_construct_and_run(kind):
    _, layer = make_pair(kind, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(layer.params)} == {jnp.dtype(jnp.bfloat16)}
    y = layer(inputs(), deterministic=False)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    jax.tree.map(
        lambda v: np.testing.assert_(np.isfinite(v).all()), dnnx.collect_regularizers(layer)
    )


def test_pop_regularizers_resets_to_zero():
    _, layer = make_pair("dsc")
    layer(inputs(), deterministic=False)
    popped = dnnx.pop_regularizers(layer)
    assert float(popped["aux"][0]) > 0
    assert all(float(v) == 0.0 for v in jax.tree.leaves(dnnx.collect_regularizers(layer)))


def test_gpt_matches_linen():
    cfg = dsc_jax.GPTConfig(
        vocab_size=32,
        max_seq_len=8,
        num_layers=1,
        num_heads=2,
        d_model=16,
        ffn=dsc_jax.DSCConfig(num_bases=8, top_k=2, hidden_dim=16),
    )
    model = dnnx.GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 32)
    linen_model = dsc_jax.GPT(cfg)
    ref = nn.unbox(linen_model.init({"params": nnx.Rngs(0).params()}, tokens[:1, :1])["params"])
    chex.assert_trees_all_equal(model.params, ref)
    assert model.block_0.ffn.basis_u.shape == (8, 16)
    variables = {"params": model.params}
    chex.assert_trees_all_close(model(tokens), linen_model.apply(variables, tokens), **TOL)
    key = jax.random.key(5)
    logits, state = linen_model.apply(
        variables, tokens, False, rngs={"dropout": key}, mutable=["losses"]
    )
    chex.assert_trees_all_close(model(tokens, deterministic=False, rngs=key), logits, **TOL)
    chex.assert_trees_all_close(dnnx.collect_regularizers(model), state["losses"], **TOL)
    assert set(dnnx.collect_diagnostics(model)) == {"block_0/ffn"}


def test_from_linen_wraps_a_config_layer():
    layer = dnnx.from_linen(
        dsc_jax.MoEConfig(num_experts=4, top_k=1, hidden_dim=8).make(), D, rngs=nnx.Rngs(0)
    )
    assert layer(inputs()).shape == (2, 3, D)
    assert layer.expert_in.shape == (4, D, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_shape_under_a_mesh_gives_a_sharded_restore(kind):
    """``nnx.eval_shape`` of a layer under ``jax.set_mesh`` and our logical rules: every
    variable gets a sharding (parameters by their logical names, the per-call regulariser
    and diagnostic variables replicated), and parameters put there restore a model that
    computes what the original does. NNX maps each logical name on its own (no per-array
    rule priority as in Linen), so MoE's ``[experts, embed, mlp]`` weights need ``experts``
    kept off ``tensor``, which ``mlp`` takes."""
    from dsc_jax.sharding import make_mesh, merge_rules

    mesh = make_mesh((2, 2, 2))
    nnx_cls, fields = LAYERS[kind][1:]
    own_rules = (("experts", None),) if kind == "moe" else ()

    def make():
        return nnx_cls(D, **fields, rngs=nnx.Rngs(0))

    rules = merge_rules(own_rules, dsc_jax.LOGICAL_AXIS_RULES, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    specs = jax.tree.map(lambda v: v.sharding.spec, pure)
    P = jax.sharding.PartitionSpec
    if kind == "moe":
        assert specs["expert_in"] == P(None, "fsdp", "tensor")
    else:
        assert specs["mlp_in"]["kernel"] == P("fsdp", "tensor")
    if kind == "dsc":
        assert specs["basis_u"] == P("tensor", "fsdp")
    per_call = [specs.get(name, {}) for name in ("regularizers", "diagnostics")]
    assert all(
        spec == P() for spec in jax.tree.leaves(per_call, is_leaf=lambda x: isinstance(x, P))
    )
    shardings = jax.tree.map(lambda v: jax.sharding.NamedSharding(mesh, v.sharding.spec), pure)
    original = make()
    nnx.replace_by_pure_dict(
        state, jax.device_put(nnx.to_pure_dict(nnx.state(original)), shardings)
    )
    restored = nnx.merge(graphdef, state)
    assert restored.params.keys() == original.params.keys()
    chex.assert_trees_all_close(restored(inputs()), original(inputs()), **TOL)


def test_regularizers_after_deterministic_calls_linen_and_nnx():
    """What ``regularization_loss``'s error text says: Linen sows the terms whatever
    ``deterministic`` (once ``"losses"`` is mutable); an NNX deterministic call leaves zeros;
    the empty-collection error names both recipes."""
    linen_layer, layer = make_pair("dsc")
    x = inputs()
    _, state = linen_layer.apply({"params": layer.params}, x, mutable=["losses"])
    total, _ = dsc_jax.regularization_loss(state["losses"])
    assert float(total) > 0
    layer(x, deterministic=True)
    total, _ = dsc_jax.regularization_loss(dnnx.collect_regularizers(layer))
    assert float(total) == 0.0
    with pytest.raises(ValueError, match=r"mutable=\['losses'\].*NNX.*deterministic=False"):
        dsc_jax.regularization_loss({})
