"""Bank projection as an optax transform: rows of basis_u/basis_v stay on the sphere of
radius ``bank_radius`` after any number of updates ("retract", "tangent"); with "none" they
drift. Toy parameter trees, the trainer's TrainState, plain optax chains and bfloat16
parameters; the radius sets the atoms' angular step as the reference code's raw rows do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsc_jax import bank_retraction, retract_bank
from dsc_jax.bank import DEFAULT_BANK_RADIUS, tangent_project_bank
from dsc_jax.train.optim import default_optim_config, make_optimizer
from dsc_jax.train.state import TrainState

M, D, STEPS = 12, 8, 60
RADII = (DEFAULT_BANK_RADIUS, 1.0)


def toy_params(seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        "ffn": {
            "basis_u": jax.random.normal(keys[0], (M, D)),
            "basis_v": 3.0 * jax.random.normal(keys[1], (M, D)),
            "router": {"kernel": 0.02 * jax.random.normal(keys[2], (D, M))},
        },
        "w": jax.random.normal(keys[3], (D, D)),
    }


def make_state(projection: str, radius: float = 1.0) -> TrainState:
    cfg = default_optim_config()
    cfg.learning_rate, cfg.min_learning_rate, cfg.warmup_steps = 3e-2, 3e-3, 5
    cfg.weight_decay = 0.1  # radial shrink: makes "none" drift quickly
    tx, _ = make_optimizer(cfg, num_train_steps=STEPS, router_lr_multiplier=5.0)
    params = toy_params()
    if projection == "none":  # start on the sphere too, so any drift comes from the updates
        params = retract_bank(params, bank_radius=radius)
    return TrainState.create(
        apply_fn=None, params=params, tx=tx, bank_projection=projection, bank_radius=radius
    )


def row_norms(state: TrainState) -> np.ndarray:
    ffn = state.params["ffn"]
    return np.concatenate(
        [np.linalg.norm(np.asarray(ffn[n], np.float64), axis=-1) for n in ("basis_u", "basis_v")]
    )


@jax.jit
def run_steps(state: TrainState, key: jax.Array) -> tuple[TrainState, jax.Array]:
    """STEPS updates with random gradients; returns the final state and the max relative
    row-norm deviation from ``state.bank_radius`` seen after each step."""
    radius = state.bank_radius

    def body(i, carry):
        state, worst = carry
        leaves, treedef = jax.tree.flatten(state.params)
        keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
        grads = treedef.unflatten(
            [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        )
        state = state.apply_gradients(grads=grads)
        ffn = state.params["ffn"]
        norms = jnp.concatenate([jnp.linalg.norm(ffn[n], axis=-1) for n in ("basis_u", "basis_v")])
        return state, jnp.maximum(worst, jnp.max(jnp.abs(norms / radius - 1.0)))

    return jax.lax.fori_loop(0, STEPS, body, (state, jnp.zeros(())))


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("projection", ["retract", "tangent"])
def test_rows_stay_on_their_sphere(projection, radius):
    state = make_state(projection, radius)
    np.testing.assert_allclose(row_norms(state), radius, rtol=1e-6)  # put there at create
    final, worst = run_steps(state, jax.random.key(1))
    assert int(final.step) == STEPS
    assert float(worst) <= 1e-6, float(worst)  # after every one of the STEPS updates
    np.testing.assert_allclose(row_norms(final), radius, rtol=1e-6)
    # Non-bank parameters are untouched by the projection.
    assert not np.allclose(np.linalg.norm(np.asarray(final.params["w"]), axis=-1), 1.0)


@pytest.mark.parametrize("radius", RADII)
def test_none_drifts(radius):
    final, worst = run_steps(make_state("none", radius), jax.random.key(1))
    assert float(worst) > 1e-3
    assert np.max(np.abs(row_norms(final) / radius - 1.0)) > 1e-3


def test_tangent_projection_removes_the_radial_part():
    params = toy_params()
    updates = jax.tree.map(lambda p: jnp.ones_like(p), params)
    projected = tangent_project_bank(params, updates)
    for name in ("basis_u", "basis_v"):
        unit = np.asarray(retract_bank(params, bank_radius=1.0)["ffn"][name])
        radial = np.sum(np.asarray(projected["ffn"][name]) * unit, axis=-1)
        np.testing.assert_allclose(radial, 0.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(projected["w"]), np.asarray(updates["w"]))


def test_unknown_projection_is_rejected():
    with pytest.raises(ValueError, match="bank_projection='project'"):
        make_state("project")


@pytest.mark.parametrize("projection", ["retract", "tangent"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_optax_chain_keeps_rows_unit(projection, dtype):
    """``optax.chain(adamw, bank_retraction(bank_radius=1))`` + ``optax.apply_updates``: unit
    rows after every step (bfloat16 rows are unit to bfloat16 rounding), other leaves move
    freely."""
    tx = optax.chain(
        optax.adamw(0.05, weight_decay=0.1), bank_retraction(projection, bank_radius=1.0)
    )
    params = jax.tree.map(lambda p: p.astype(dtype), toy_params())
    opt_state = tx.init(params)
    atol = 1e-6 if dtype == jnp.float32 else 1e-2
    for i in range(5):
        key = jax.random.key(i)
        grads = jax.tree.map(lambda p, key=key: jax.random.normal(key, p.shape, p.dtype), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        assert params["ffn"]["basis_u"].dtype == dtype
        for name in ("basis_u", "basis_v"):
            norms = np.linalg.norm(np.asarray(params["ffn"][name], np.float64), axis=-1)
            np.testing.assert_allclose(norms, 1.0, atol=atol)
    assert not np.allclose(np.linalg.norm(np.asarray(params["w"], np.float64), axis=-1), 1.0)


def test_optax_chain_without_the_transform_drifts():
    """The same chain without the transform leaves the sphere (so the test above can fail)."""
    tx = optax.adamw(0.05, weight_decay=0.1)
    params = retract_bank(toy_params(), bank_radius=1.0)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    norms = np.linalg.norm(np.asarray(params["ffn"]["basis_u"]), axis=-1)
    assert np.max(np.abs(norms - 1.0)) > 1e-2


def test_optax_transform_needs_params_and_a_known_projection():
    tx = bank_retraction()
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(toy_params(), tx.init(toy_params()))
    with pytest.raises(ValueError, match="projection='sphere' is not allowed"):
        bank_retraction("sphere")
    with pytest.raises(ValueError, match=r"bank_radius=0\.0"):
        bank_retraction(bank_radius=0.0)


def _row_angles(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Angle (radians) between each row of ``before`` and of ``after``, in float64."""
    a = np.asarray(before, np.float64)
    b = np.asarray(after, np.float64)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.arccos(np.clip(cos, -1.0, 1.0))


def _one_trainer_step(radius: float, bank_init: str, projection: str) -> tuple[dict, dict]:
    """Params before and after one step of the trainer's AdamW (weight decay on, as the
    reference code's bank) on a real DSC layer with a squared-error loss."""
    from flax import linen as nn

    from dsc_jax import DSCLayer

    layer = DSCLayer(num_bases=16, top_k=4, hidden_dim=8, bank_radius=radius, bank_init=bank_init)
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    target = jax.random.normal(jax.random.key(1), (4, 8, 16))
    params = nn.unbox(layer.init(jax.random.key(2), x)["params"])
    cfg = default_optim_config()
    cfg.learning_rate, cfg.warmup_steps = 1e-3, 0
    tx, _ = make_optimizer(cfg, num_train_steps=10, router_lr_multiplier=1.0)
    state = TrainState.create(
        apply_fn=layer.apply, params=params, tx=tx, bank_projection=projection, bank_radius=radius
    )
    grads = jax.grad(lambda p: jnp.mean((layer.apply({"params": p}, x) - target) ** 2))(
        state.params
    )
    return state.params, state.apply_gradients(grads=grads).params


def test_radius_matches_the_reference_angular_step():
    """Rows retracted to radius 0.02 turn in one Adam step exactly as the reference code's
    free raw rows of norm 0.02 (its weight decay is radial), and far more than unit rows
    (Adam moves each raw coordinate by ~lr whatever the row's norm: the angle is ~lr·√d/r)."""
    ref_before, ref_after = _one_trainer_step(0.02, "orthogonal", "none")
    new_before, new_after = _one_trainer_step(0.02, "sphere", "retract")
    unit_before, unit_after = _one_trainer_step(1.0, "sphere", "retract")
    for name in ("basis_u", "basis_v"):
        # Same directions at init (M <= d: the orthogonal matrix has unit rows).
        np.testing.assert_allclose(ref_before[name], new_before[name], rtol=1e-6, atol=1e-9)
        ref = _row_angles(ref_before[name], ref_after[name])
        new = _row_angles(new_before[name], new_after[name])
        unit = _row_angles(unit_before[name], unit_after[name])
        np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(np.linalg.norm(new_after[name], axis=-1), 0.02, rtol=1e-6)
        moved = unit > 1e-6  # atoms that got a gradient (the top-K picked them)
        assert moved.sum() >= 4
        ratio = np.tan(new[moved]) / np.tan(unit[moved])
        assert 20.0 < np.median(ratio) < 80.0, ratio  # ≈ 1 / 0.02 = 50


def test_sphere_init_puts_every_row_at_the_radius():
    """``bank_init="sphere"``: every raw row at norm ``bank_radius`` even when M > d (an
    orthogonal [M, d] matrix with M > d has orthonormal columns, not rows);
    ``"orthogonal"`` (the reference code's) does not."""
    from flax import linen as nn

    from dsc_jax import DSCLayer

    x = jnp.ones((2, 3, 16))
    for init, expect_on_sphere in (("sphere", True), ("orthogonal", False)):
        layer = DSCLayer(num_bases=64, top_k=2, hidden_dim=8, bank_radius=0.5, bank_init=init)
        params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
        norms = np.linalg.norm(np.asarray(params["basis_u"]), axis=-1)
        assert np.allclose(norms, 0.5, rtol=1e-5) == expect_on_sphere, norms
    with pytest.raises(ValueError, match="bank_init='unit'"):
        DSCLayer(num_bases=64, top_k=2, hidden_dim=8, bank_init="unit")


def test_tangent_projection_keeps_the_tangential_part():
    """``Δ − (Δ·u) u`` exactly (float64 by hand), not merely something without a radial part
    (zeros would pass that check); non-bank leaves pass through."""
    params = toy_params(1)
    keys = jax.random.split(jax.random.key(7), 3)
    updates = {
        "ffn": {
            "basis_u": jax.random.normal(keys[0], (M, D)),
            "basis_v": jax.random.normal(keys[1], (M, D)),
            "router": {"kernel": jax.random.normal(keys[2], (D, M))},
        },
        "w": jnp.ones((D, D)),
    }
    projected = tangent_project_bank(params, updates)
    for name in ("basis_u", "basis_v"):
        rows = np.asarray(params["ffn"][name], np.float64)
        unit = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
        delta = np.asarray(updates["ffn"][name], np.float64)
        want = delta - np.sum(delta * unit, -1, keepdims=True) * unit
        assert np.min(np.linalg.norm(want, axis=-1)) > 0.3  # far from zero
        np.testing.assert_allclose(projected["ffn"][name], want, atol=1e-5, err_msg=name)
    for path in (("ffn", "router", "kernel"), ("w",)):
        got, want = projected, updates
        for key in path:
            got, want = got[key], want[key]
        np.testing.assert_array_equal(got, want)
