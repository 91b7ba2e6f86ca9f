"""DSCLayer under JAX's transforms: derivatives of every order and mode (grad-of-grad,
forward-over-reverse, reverse-over-forward, forward-over-forward, ``jvp``, ``linearize``,
``jacfwd``) against a plain-JAX reference without custom derivative rules
(:func:`tests._reference.plain_dsc_apply`), on every compute path; ``jax.export`` with a
symbolic batch; ``vmap`` over a parameter ensemble.

Float32 with ``highest`` matmul precision (tests/conftest.py); tolerances relative to each
leaf's largest entry. The router kernels are scaled up so that the gating is far from its
linear regime (larger second derivatives), no logit reaches ``τ`` (no clip kink) and no two
logits tie.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from dsc_jax.layers.dsc import DSCLayer
from tests._reference import plain_dsc_apply

pytestmark = pytest.mark.usefixtures("fast_compiles")

D, K, H = 8, 3, 8
SHAPE = (2, 5, D)  # N = 10 tokens, N·K = 30 gathered slots
# (router, compute, M): the gather path normalises the whole bank when M <= N·K and only the
# gathered rows when M > N·K; both are covered for both routers.
CASES = [
    ("flat", "gather", 24),
    ("flat", "gather", 40),
    ("flat", "dense", 40),
    ("product_key", "gather", 16),
    ("product_key", "gather", 64),
    ("product_key", "dense", 64),
]
CASE_IDS = [f"{r}-{c}-M{m}" for r, c, m in CASES]
TOL = 2e-4  # relative to each leaf's max |reference|


def _setup(router: str, compute: str, num_bases: int):
    layer = DSCLayer(num_bases=num_bases, top_k=K, hidden_dim=H, compute=compute, router=router)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    params = nn.meta.unbox(layer.init(jax.random.key(1), x)["params"])
    params["router"] = jax.tree.map(lambda w: w * 25.0, params["router"])  # spread the logits
    params["basis_u"] = params["basis_u"] * 1.7  # raw rows of norm != 1: the normalisation counts
    leaves, treedef = jax.tree.flatten((params, x))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    direction = jax.tree.unflatten(
        treedef, [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
    )
    cotangent = jax.random.normal(jax.random.key(3), SHAPE)
    return layer, params, x, direction, cotangent


def _functions(layer, cotangent):
    """``(apply, plain)`` on ``z = (params, x)`` and their objectives ``Σ sin(y) ⊙ c``."""

    def apply(z):
        return layer.apply({"params": z[0]}, z[1])

    def plain(z):
        return plain_dsc_apply(layer, z[0], z[1])

    def objective(fn):
        return lambda z: jnp.sum(jnp.sin(fn(z)) * cotangent)

    return apply, plain, objective(apply), objective(plain)


def _vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _assert_trees_close(got, want, what: str, tol: float = TOL) -> None:
    for (path, g), w in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
        scale = float(jnp.max(jnp.abs(w))) + 1e-12
        np.testing.assert_allclose(
            g, w, atol=tol * scale, rtol=tol, err_msg=f"{what} {jax.tree_util.keystr(path)}"
        )


def _router_leaves(tree) -> list[jax.Array]:
    return jax.tree.leaves(tree[0]["router"])


@pytest.mark.parametrize(("router", "compute", "num_bases"), CASES, ids=CASE_IDS)
def test_hessian_vector_products_match_plain_autodiff(router, compute, num_bases):
    """``H v`` by reverse-over-reverse, forward-over-reverse and reverse-over-forward, and
    ``vᵀ H v`` by forward-over-forward, equal the plain reference's ``H v``. The custom rules
    must differentiate to the right second derivative: a stopped gradient inside them once
    made the router parameters' reverse-over-reverse ``H v`` exactly zero."""
    layer, params, x, v, c = _setup(router, compute, num_bases)
    _, _, objective, plain_objective = _functions(layer, c)
    z = (params, x)
    want = jax.jit(lambda z: jax.jvp(jax.grad(plain_objective), (z,), (v,))[1])(z)
    assert min(float(jnp.max(jnp.abs(w))) for w in _router_leaves(want)) > 1e-3  # sensitive

    hvps = {
        "grad(grad)": lambda z: jax.grad(lambda z: _vdot(jax.grad(objective)(z), v))(z),
        "jvp(grad)": lambda z: jax.jvp(jax.grad(objective), (z,), (v,))[1],
        "grad(jvp)": lambda z: jax.grad(lambda z: jax.jvp(objective, (z,), (v,))[1])(z),
    }
    for name, hvp in hvps.items():
        _assert_trees_close(jax.jit(hvp)(z), want, name)
    vhv = jax.jit(lambda z: jax.jvp(lambda z: jax.jvp(objective, (z,), (v,))[1], (z,), (v,))[1])(z)
    np.testing.assert_allclose(vhv, _vdot(want, v), rtol=TOL, atol=TOL * float(jnp.abs(vhv)))


@pytest.mark.parametrize(("router", "compute", "num_bases"), CASES, ids=CASE_IDS)
def test_forward_mode_matches_plain_autodiff(router, compute, num_bases):
    """``jax.jvp``, ``jax.linearize`` and ``jax.jacfwd`` run through every compute path and
    equal the plain reference (and ``jacfwd`` equals ``jacrev``)."""
    layer, params, x, v, c = _setup(router, compute, num_bases)
    apply, plain, _, _ = _functions(layer, c)
    z = (params, x)
    y, tangent = jax.jit(lambda z, v: jax.jvp(apply, (z,), (v,)))(z, v)
    y_ref, tangent_ref = jax.jvp(plain, (z,), (v,))
    _assert_trees_close(y, y_ref, "value", tol=1e-5)
    _assert_trees_close(tangent, tangent_ref, "jvp")

    y_lin, linear = jax.linearize(apply, z)
    _assert_trees_close(y_lin, y_ref, "linearize value", tol=1e-5)
    _assert_trees_close(linear(v), tangent_ref, "linearize")

    def of_x(fn):
        return lambda x: fn((params, x))

    jac = jax.jit(jax.jacfwd(of_x(apply)))(x)  # [2, 5, 8, 2, 5, 8]
    assert jac.shape == SHAPE + SHAPE
    _assert_trees_close(jac, jax.jacrev(of_x(plain))(x), "jacfwd")
    _assert_trees_close(jac, jax.jit(jax.jacrev(of_x(apply)))(x), "jacfwd vs jacrev")


@pytest.mark.parametrize(("router", "compute", "num_bases"), CASES[:2] + CASES[3:5])
def test_forward_mode_of_the_training_objective_equals_reverse_mode(router, compute, num_bases):
    """With the regularisers sown (training path), ``jvp`` of output + losses equals the
    gradient's projection on the same direction."""
    layer, params, x, v, c = _setup(router, compute, num_bases)

    def training_objective(z):
        y, state = layer.apply({"params": z[0]}, z[1], mutable=["losses"])
        losses = sum(jnp.sum(value[0]) for value in state["losses"].values())
        return jnp.sum(jnp.sin(y) * c) + 0.1 * losses

    z = (params, x)
    tangent = jax.jit(lambda z: jax.jvp(training_objective, (z,), (v,))[1])(z)
    projected = _vdot(jax.jit(jax.grad(training_objective))(z), v)
    np.testing.assert_allclose(tangent, projected, rtol=1e-4, atol=1e-4 * float(jnp.abs(tangent)))


@pytest.mark.parametrize(
    ("router", "num_bases"), [("flat", 64), ("flat", 2048), ("product_key", 64)]
)
def test_export_with_a_symbolic_batch(router, num_bases):
    """``jax.export`` of the gather path (forward and gradient) with a symbolic batch size;
    the exported functions equal the layer at batch 3."""
    layer = DSCLayer(num_bases=num_bases, top_k=2, hidden_dim=16, compute="gather", router=router)
    x = jax.random.normal(jax.random.key(0), (3, 16, D))
    params = layer.init(jax.random.key(1), x)["params"]
    (batch,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, 16, D), jnp.float32)

    def forward(p, x):
        return layer.apply({"params": p}, x)

    def grads(p, x):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(forward(p, x))), (0, 1))(p, x)

    for fn in (forward, grads):
        exported = export.export(jax.jit(fn))(params, spec)
        _assert_trees_close(exported.call(params, x), fn(params, x), fn.__name__, tol=1e-5)


def test_vmap_over_a_parameter_ensemble_on_the_gather_path():
    """``jax.vmap`` of ``apply`` and of its gradient over 3 stacked parameter sets equals a
    loop over the members."""
    layer = DSCLayer(num_bases=40, top_k=K, hidden_dim=H, compute="gather")
    x = jax.random.normal(jax.random.key(0), SHAPE)
    members = [layer.init(jax.random.key(i), x)["params"] for i in range(3)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)

    def loss(p):
        return jnp.sum(jnp.sin(layer.apply({"params": p}, x)))

    ys = jax.jit(jax.vmap(lambda p: layer.apply({"params": p}, x)))(stacked)
    grads = jax.jit(jax.vmap(jax.grad(loss)))(stacked)
    single_grad = jax.jit(jax.grad(loss))
    for i, member in enumerate(members):
        _assert_trees_close(ys[i], layer.apply({"params": member}, x), f"member {i}", 1e-5)
        _assert_trees_close(
            jax.tree.map(lambda g, i=i: g[i], grads), single_grad(member), f"grad {i}", 1e-5
        )
