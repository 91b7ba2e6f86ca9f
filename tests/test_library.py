"""The layers as a library: the shared constructor contract, bfloat16/float16
parameters, ``nn.remat`` and ``nn.scan`` over blocks that hold the layers (gradients equal the
plain model's, regularisers included), the GPT's own scan/remat, and the exported logical axis
rules merged into another model's rules. Tiny sizes; fp32 tolerances stated per test."""

from __future__ import annotations

import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import errors as flax_errors
from flax import traverse_util

import dsc_jax
from dsc_jax import (
    GPT,
    LOGICAL_AXIS_RULES,
    DenseConfig,
    DSCConfig,
    GPTConfig,
    MoEConfig,
    MoLoRAConfig,
    bank_retraction,
    regularization_loss,
)

pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny programs: compile time dominates

D = 16
FFNS = {
    "dsc": DSCConfig(num_bases=12, top_k=3, hidden_dim=24),
    "moe": MoEConfig(num_experts=4, top_k=2, hidden_dim=12),
    "molora": MoLoRAConfig(num_experts=4, rank=3, top_k=2, hidden_dim=24),
    "dense": DenseConfig(hidden_dim=24),
}
ROUTED = ("dsc", "moe", "molora")
CONTRACT = ("hidden_dim", "init_std", "out_init_std", "dropout_rate", "dtype", "param_dtype")


def tokens_like(seed: int = 0, shape=(2, 6, D), dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize("kind", list(FFNS))
def test_one_constructor_contract(kind):
    """Same field names for the same things; ``deterministic`` positional-or-keyword."""
    layer = FFNS[kind].make()
    fields = {f for f in layer.__dataclass_fields__}
    assert set(CONTRACT) <= fields, set(CONTRACT) - fields
    parameter = inspect.signature(type(layer).__call__).parameters["deterministic"]
    assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert parameter.default is True


@pytest.mark.parametrize("kind", ROUTED)
def test_diagnostics_share_names(kind):
    layer = FFNS[kind].make()
    x = tokens_like()
    params = layer.init(jax.random.key(0), x)["params"]
    _, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    inter = state["intermediates"]
    chex.assert_shape(inter["top_k_indices"][0], (2, 6, FFNS[kind].top_k))
    chex.assert_shape(inter["gates"][0], (2, 6, FFNS[kind].top_k))


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", list(FFNS))
def test_low_precision_params_init_apply_and_train(kind, param_dtype):
    """Initialisers compute in float32 then cast: the low-precision init equals the float32
    init rounded (so an orthogonal bank initialises without a bfloat16 QR), and an optax
    training step with the regularisers runs and changes every parameter group."""
    x = tokens_like(dtype=param_dtype)
    layer = FFNS[kind].make(dtype=param_dtype, param_dtype=param_dtype)
    reference = FFNS[kind].make()
    params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
    params32 = nn.unbox(reference.init(jax.random.key(0), x.astype(jnp.float32))["params"])
    for low, high in zip(jax.tree.leaves(params), jax.tree.leaves(params32), strict=True):
        assert low.dtype == param_dtype
        np.testing.assert_array_equal(np.asarray(low), np.asarray(high.astype(param_dtype)))

    # Adam's default eps=1e-8 underflows to 0 in float16 (0/0 on a zero gradient).
    tx = optax.chain(optax.adam(1e-2, eps=1e-4), bank_retraction())
    opt_state = tx.init(params)

    def loss_fn(p):
        y, state = layer.apply(
            {"params": p}, x, False, rngs={"dropout": jax.random.key(1)}, mutable=["losses"]
        )
        reg, _ = regularization_loss(state.get("losses"), allow_empty=kind == "dense")
        return jnp.mean(jnp.square(y.astype(jnp.float32))) + reg

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    assert np.isfinite(float(loss))
    chex.assert_trees_all_equal_dtypes(new, params)
    chex.assert_tree_all_finite(new)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)
    ]
    assert any(moved)


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float16"])
def test_gpt_low_precision_params_train_step(param_dtype):
    cfg = GPTConfig(
        vocab_size=32, max_seq_len=8, num_layers=1, num_heads=2, d_model=D,
        ffn=FFNS["dsc"], dtype=param_dtype, param_dtype=param_dtype,
    )  # fmt: skip
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(param_dtype)}

    def loss_fn(p):
        logits, state = model.apply(
            {"params": p}, tokens, False, rngs={"dropout": jax.random.key(2)}, mutable=["losses"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
        return ce + regularization_loss(state["losses"])[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(grads)


class _UserBlock(nn.Module):
    """A user's residual block holding one of our FFNs (built from its config)."""

    ffn: object

    @nn.compact
    def __call__(self, x, deterministic):
        return x + self.ffn.make(name="ffn")(nn.LayerNorm()(x), deterministic)


class _UserStack(nn.Module):
    """Three user blocks: plain, each under ``nn.remat``, or one ``nn.scan``."""

    ffn: object  # a DSCConfig / MoEConfig / ...
    mode: str
    losses_axis: bool = True

    @nn.compact
    def __call__(self, x, deterministic=False):
        if self.mode == "scan":
            axes = {"params": 0, "intermediates": 0}
            if self.losses_axis:
                axes["losses"] = 0

            class ScanBlock(_UserBlock):
                @nn.compact
                def __call__(self, x, deterministic):
                    return super().__call__(x, deterministic), None

            scanned = nn.scan(
                ScanBlock,
                variable_axes=axes,
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,),
                length=3,
                metadata_params={nn.PARTITION_NAME: "layers"},  # our params carry axis names
            )
            x, _ = scanned(self.ffn, name="blocks")(x, deterministic)
            return x
        block = nn.remat(_UserBlock, static_argnums=(2,)) if self.mode == "remat" else _UserBlock
        for i in range(3):
            x = block(self.ffn, name=f"block_{i}")(x, deterministic)
        return x


def _stack_to_scanned(params: dict) -> dict:
    """Plain ``block_{i}`` parameters stacked into the scanned ``blocks`` layout."""
    blocks = [params[f"block_{i}"] for i in range(3)]
    return {"blocks": jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


def _loss_and_grads(model, params, x):
    def loss_fn(p):
        # Dropout 0 and no MoE jitter: the three transforms draw their keys differently.
        y, state = model.apply({"params": p}, x, False, mutable=["losses"])
        reg, terms = regularization_loss(state["losses"])
        return jnp.mean(jnp.square(y)) + reg, terms

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


# DSC on its gather path (custom JVPs): M=48 > N·K = 36 normalises only the gathered rows.
DSC_GATHER = DSCConfig(num_bases=48, top_k=3, hidden_dim=24, compute="gather")


@pytest.mark.parametrize("kind", [*ROUTED, "dsc_gather"])
def test_remat_and_scan_gradients_equal_the_plain_model(kind):
    """Loss, regulariser terms and gradients of remat / scan stacks equal the plain stack's
    (float32, rtol 1e-5, atol 1e-6); on the gather path they also equal the dense path's."""
    ffn = {"moe": FFNS["moe"].replace(jitter_std=0.0), "dsc_gather": DSC_GATHER}.get(
        kind, FFNS.get(kind)
    )
    x = tokens_like(3)
    plain = _UserStack(ffn, "plain")
    params = nn.unbox(plain.init(jax.random.key(0), x)["params"])
    (loss, terms), grads = _loss_and_grads(plain, params, x)
    assert float(terms["aux"]) > 0

    (loss_r, terms_r), grads_r = _loss_and_grads(_UserStack(ffn, "remat"), params, x)
    (loss_s, terms_s), grads_s = _loss_and_grads(
        _UserStack(ffn, "scan"), _stack_to_scanned(params), x
    )
    tol = dict(rtol=1e-5, atol=1e-6)
    for other_loss, other_terms in ((loss_r, terms_r), (loss_s, terms_s)):
        np.testing.assert_allclose(other_loss, loss, **tol)
        for name in terms:
            np.testing.assert_allclose(other_terms[name], terms[name], **tol)
    chex.assert_trees_all_close(grads_r, grads, **tol)
    chex.assert_trees_all_close(grads_s, _stack_to_scanned(grads), **tol)
    if kind == "dsc_gather":
        dense = _UserStack(ffn.replace(compute="dense"), "plain")
        (loss_d, _), grads_d = _loss_and_grads(dense, params, x)
        np.testing.assert_allclose(loss_d, loss, **tol)
        chex.assert_trees_all_close(grads, grads_d, **tol)


def test_scan_without_losses_axis_is_caught():
    """The scan mistake: without ``"losses"`` in ``variable_axes`` the regularisers vanish;
    ``regularization_loss`` raises instead of returning 0."""
    x = tokens_like()
    model = _UserStack(FFNS["dsc"], "scan", losses_axis=False)
    params = model.init(jax.random.key(0), x)["params"]
    _, state = model.apply({"params": params}, x, False, mutable=["losses"])
    with pytest.raises(ValueError, match="variable_axes"):
        regularization_loss(state.get("losses"))


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_gpt_scan_and_remat_equal_the_unrolled_gpt(remat):
    """``GPTConfig(scan_layers=True, remat=...)``: same loss, regularisers and gradients as the
    unrolled GPT (float32, rtol 1e-5, atol 1e-6)."""
    base = GPTConfig(
        vocab_size=32, max_seq_len=8, num_layers=2, num_heads=2, d_model=D,
        dropout_rate=0.0, ffn=FFNS["dsc"],
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    plain = GPT(base)
    params = nn.unbox(plain.init(jax.random.key(1), tokens)["params"])
    blocks = [params.pop(f"block_{i}") for i in range(2)]
    scanned_params = dict(params, blocks=jax.tree.map(lambda *x: jnp.stack(x), *blocks))
    params.update({f"block_{i}": b for i, b in enumerate(blocks)})

    def run(model, p):
        def loss_fn(p):
            logits, state = model.apply({"params": p}, tokens, False, mutable=["losses"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
            return ce + regularization_loss(state["losses"])[0]

        return jax.jit(jax.value_and_grad(loss_fn))(p)

    loss, grads = run(plain, params)
    scanned = GPT(base.replace(scan_layers=True, remat=remat))
    shapes = jax.eval_shape(scanned.init, jax.random.key(1), tokens)["params"]
    chex.assert_trees_all_equal_shapes(nn.unbox(shapes), scanned_params)
    assert nn.get_partition_spec(shapes)["blocks"]["ffn"]["basis_u"][0] == "layers"
    loss_s, grads_s = run(scanned, scanned_params)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5, atol=1e-6)
    grads_blocks = [grads.pop(f"block_{i}") for i in range(2)]
    expected = dict(grads, blocks=jax.tree.map(lambda *x: jnp.stack(x), *grads_blocks))
    chex.assert_trees_all_close(grads_s, expected, rtol=1e-5, atol=1e-6)


def test_logical_axis_rules_merge_into_another_models_rules():
    """A model with its own rules (nanodo-style ``nn.logical_to_mesh_sharding``) gets a
    sharding for every parameter of our layers once it includes :data:`LOGICAL_AXIS_RULES`."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    their_rules = (("embed", "fsdp"), ("mlp", "tensor"))
    x = tokens_like()
    for kind, ffn in FFNS.items():
        boxed = jax.eval_shape(ffn.make().init, jax.random.key(0), x)["params"]
        specs = nn.get_partition_spec(boxed)
        names = {
            n
            for spec in jax.tree.leaves(
                specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
            )
            for n in spec
            if n
        }
        known = {name for name, _ in LOGICAL_AXIS_RULES}
        assert names <= known, (kind, names - known)
        rules = tuple(their_rules) + tuple(
            r for r in LOGICAL_AXIS_RULES if r[0] not in dict(their_rules)
        )
        shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
        assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(boxed))
    assert dict(LOGICAL_AXIS_RULES)["bases"] == "tensor"
    assert dsc_jax.LOGICAL_AXIS_RULES is LOGICAL_AXIS_RULES


def test_layers_on_another_models_one_axis_mesh():
    """A nanodo-style model: a 1-axis ``("data",)`` mesh of 8 devices, its own rules (FSDP
    over ``data``). Plain concatenation with :data:`LOGICAL_AXIS_RULES` names mesh axes the
    mesh lacks (Flax refuses ``tensor``); ``merge_rules(..., mesh=mesh)`` and
    ``logical_to_shardings`` give every parameter a sharding, and the sharded jitted layer
    equals the unsharded one (float32, rtol 1e-5)."""
    from jax.sharding import Mesh

    from dsc_jax.sharding import logical_to_shardings, merge_rules

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    their_rules = (("batch", "data"), ("embed", "data"), ("mlp", None))
    x = tokens_like(shape=(8, 6, D))
    for kind, ffn in {**FFNS, "dsc_gather": DSC_GATHER}.items():
        layer = ffn.make()
        boxed = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
        specs = nn.get_partition_spec(boxed)
        if kind != "dense":  # routed layers name "bases" / "experts", ruled onto "tensor"
            with pytest.raises(ValueError, match="tensor"):
                nn.logical_to_mesh_sharding(specs, mesh, their_rules + LOGICAL_AXIS_RULES)
        merged = merge_rules(their_rules, LOGICAL_AXIS_RULES, mesh=mesh)
        flax_shardings = nn.logical_to_mesh_sharding(specs, mesh, merged)
        ours = logical_to_shardings(boxed, mesh, their_rules + LOGICAL_AXIS_RULES)
        for a, b in zip(jax.tree.leaves(flax_shardings), jax.tree.leaves(ours), strict=True):
            assert a.spec == b.spec, (kind, a.spec, b.spec)
        params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
        sharded = jax.device_put(params, ours)
        assert any(
            leaf.sharding.spec and leaf.sharding.spec[0] == "data"
            for leaf in jax.tree.leaves(sharded)
        )  # FSDP over the one axis is real
        y = jax.jit(lambda p, x, layer=layer: layer.apply({"params": p}, x))(sharded, x)
        np.testing.assert_allclose(y, layer.apply({"params": params}, x), rtol=1e-5, atol=1e-6)


def test_merged_rules_mean_the_same_in_linen_and_nnx():
    """A user rule that replicates the bank, placed before ours: Linen's first-wins and NNX's
    last-wins lookups disagree on the concatenation, agree on ``merge_rules``."""
    from flax import nnx

    from dsc_jax import nnx as dnnx
    from dsc_jax.sharding import merge_rules

    layer = dnnx.DSCLayer(D, num_bases=12, top_k=3, hidden_dim=24, rngs=nnx.Rngs(0))
    their_rules = (("bases", None),)

    def nnx_bank_spec(rules):
        with nn.logical_axis_rules(rules):
            return nnx.get_partition_spec(nnx.state(layer, nnx.Param))["basis_u"].get_value()

    concatenated = their_rules + LOGICAL_AXIS_RULES
    assert tuple(nn.logical_to_mesh_axes(("bases", "embed"), concatenated)) == (None, "fsdp")
    assert tuple(nnx_bank_spec(concatenated)) == ("tensor", "fsdp")  # the user's rule lost
    merged = merge_rules(their_rules, LOGICAL_AXIS_RULES)
    assert tuple(nn.logical_to_mesh_axes(("bases", "embed"), merged)) == (None, "fsdp")
    assert tuple(nnx_bank_spec(merged)) == (None, "fsdp")
    assert dict(merged) == {**dict(LOGICAL_AXIS_RULES), "bases": None}


def test_nn_vmap_ensemble_needs_metadata_params_and_equals_its_members():
    """``nn.vmap`` over a layer (an ensemble of 3, gather path): without ``metadata_params``
    Flax refuses our axis-named parameters; with it, outputs and regularisers equal each
    member's own ``apply`` (float32, rtol 1e-5) and the stacked axis is named."""
    fields = dict(num_bases=48, top_k=3, hidden_dim=24, compute="gather")
    x = tokens_like()

    def ensemble(**metadata):
        return nn.vmap(
            dsc_jax.DSCLayer,
            variable_axes={"params": 0, "losses": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=None,
            axis_size=3,
            **metadata,
        )(**fields)

    with pytest.raises(flax_errors.PartitioningUnspecifiedError):
        ensemble().init(jax.random.key(0), x)
    model = ensemble(metadata_params={nn.PARTITION_NAME: "layers"})
    boxed = model.init(jax.random.key(0), x)["params"]
    assert nn.get_partition_spec(boxed)["basis_u"] == jax.sharding.PartitionSpec(
        "layers", "bases", "embed"
    )
    params = nn.unbox(boxed)
    ys, state = model.apply({"params": params}, x, mutable=["losses"])
    assert ys.shape == (3, *x.shape)
    single = dsc_jax.DSCLayer(**fields)
    for i in range(3):
        member = jax.tree.map(lambda leaf, i=i: leaf[i], params)
        y, member_state = single.apply({"params": member}, x, mutable=["losses"])
        np.testing.assert_allclose(ys[i], y, rtol=1e-5, atol=1e-6)
        for name, (value,) in member_state["losses"].items():
            np.testing.assert_allclose(state["losses"][name][0][i], value, rtol=1e-5)


def test_param_trees_use_one_vocabulary():
    x = tokens_like()
    names = {}
    for kind, ffn in FFNS.items():
        params = jax.eval_shape(ffn.make().init, jax.random.key(0), x)["params"]
        names[kind] = {"/".join(k) for k in traverse_util.flatten_dict(nn.unbox(params))}
    assert {"mlp_in/kernel", "mlp_out/kernel"} <= names["dense"] & names["dsc"] & names["molora"]
    assert {"router/kernel", "router_norm/scale"} <= names["dsc"] & names["moe"]
    assert "router/kernel" in names["molora"]


def test_spec_choice_options():
    """Each place where the paper's text and its reference code differ is an option whose
    default is the text's (docs/layers.md "Choices")."""
    x = tokens_like()
    # Bank radius: raw rows are bank_radius × the same directions (reference: 0.02).
    ref = FFNS["dsc"].replace(bank_radius=0.02).make()
    unit = FFNS["dsc"].replace(bank_radius=1.0).make()
    small = nn.unbox(ref.init(jax.random.key(0), x)["params"])["basis_u"]
    full = nn.unbox(unit.init(jax.random.key(0), x)["params"])["basis_u"]
    np.testing.assert_allclose(small, 0.02 * full, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(full, axis=-1), 1.0, rtol=1e-5)
    # The function is the same: the forward pass normalises the rows.
    params = nn.unbox(unit.init(jax.random.key(0), x)["params"])
    y_unit = unit.apply({"params": params}, x)
    y_small = ref.apply({"params": dict(params, basis_u=0.02 * params["basis_u"])}, x)
    np.testing.assert_allclose(y_small, y_unit, rtol=1e-5, atol=1e-6)

    def gpt(**overrides):
        return GPTConfig(
            vocab_size=32, max_seq_len=8, num_layers=2, num_heads=2, d_model=64, **overrides
        )

    tokens = jnp.zeros((1, 8), jnp.int32)

    def out_std(cfg):
        params = nn.unbox(GPT(cfg).init(jax.random.key(0), tokens)["params"])
        return float(jnp.std(params["block_0"]["ffn"]["mlp_out"]["kernel"]))

    # DSC static W2: 0.02 (the paper's method) by default; None takes the GPT's
    # 0.02/sqrt(2L) = 0.01.
    big = DSCConfig(num_bases=12, top_k=3, hidden_dim=256)
    assert out_std(gpt(ffn=big)) == pytest.approx(0.02, rel=0.05)
    assert out_std(gpt(ffn=big.replace(out_init_std=None))) == pytest.approx(0.01, rel=0.05)
    assert out_std(gpt(ffn=DenseConfig(hidden_dim=256))) == pytest.approx(0.01, rel=0.05)

    # Embedding dropout: off by default (the paper's text), on by option.
    base = gpt(ffn=FFNS["dense"], dropout_rate=0.5)
    assert not base.embed_dropout
    params = nn.unbox(GPT(base).init(jax.random.key(0), tokens)["params"])
    rngs = {"dropout": jax.random.key(3)}
    on = GPT(base.replace(embed_dropout=True)).apply({"params": params}, tokens, False, rngs=rngs)
    off = GPT(base).apply({"params": params}, tokens, False, rngs=rngs)
    assert float(jnp.max(jnp.abs(on - off))) > 1e-4
