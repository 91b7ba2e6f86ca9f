"""Bank projection (spec §4): rows of basis_u/basis_v stay on the unit sphere after any
number of updates ("retract", "tangent"); with "none" they drift. Toy parameter trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsc_jax.train.optim import default_optim_config, make_optimizer
from dsc_jax.train.state import TrainState, retract_bank, tangent_project_bank

M, D, STEPS = 12, 8, 60


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


def make_state(projection: str) -> TrainState:
    cfg = default_optim_config()
    cfg.learning_rate, cfg.min_learning_rate, cfg.warmup_steps = 3e-2, 3e-3, 5
    cfg.weight_decay = 0.1  # radial shrink: makes "none" drift quickly
    tx, _ = make_optimizer(cfg, num_train_steps=STEPS, router_lr_multiplier=5.0)
    params = toy_params()
    if projection == "none":  # start on the sphere too, so any drift comes from the updates
        params = retract_bank(params)
    return TrainState.create(apply_fn=None, params=params, tx=tx, bank_projection=projection)


def row_norms(state: TrainState) -> np.ndarray:
    ffn = state.params["ffn"]
    return np.concatenate(
        [np.linalg.norm(np.asarray(ffn[n], np.float64), axis=-1) for n in ("basis_u", "basis_v")]
    )


@jax.jit
def run_steps(state: TrainState, key: jax.Array) -> tuple[TrainState, jax.Array]:
    """STEPS updates with random gradients; returns the final state and the max row-norm
    deviation seen after each step."""

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
        return state, jnp.maximum(worst, jnp.max(jnp.abs(norms - 1.0)))

    return jax.lax.fori_loop(0, STEPS, body, (state, jnp.zeros(())))


@pytest.mark.parametrize("projection", ["retract", "tangent"])
def test_rows_stay_unit_norm(projection):
    state = make_state(projection)
    np.testing.assert_allclose(row_norms(state), 1.0, atol=1e-6)  # normalised at create
    final, worst = run_steps(state, jax.random.key(1))
    assert int(final.step) == STEPS
    assert float(worst) <= 1e-6, float(worst)  # after every one of the STEPS updates
    np.testing.assert_allclose(row_norms(final), 1.0, atol=1e-6)
    # Non-bank parameters are untouched by the projection.
    assert not np.allclose(np.linalg.norm(np.asarray(final.params["w"]), axis=-1), 1.0)


def test_none_drifts():
    final, worst = run_steps(make_state("none"), jax.random.key(1))
    assert float(worst) > 1e-3
    assert np.max(np.abs(row_norms(final) - 1.0)) > 1e-3


def test_tangent_projection_removes_the_radial_part():
    params = toy_params()
    updates = jax.tree.map(lambda p: jnp.ones_like(p), params)
    projected = tangent_project_bank(params, updates)
    for name in ("basis_u", "basis_v"):
        unit = np.asarray(retract_bank(params)["ffn"][name])
        radial = np.sum(np.asarray(projected["ffn"][name]) * unit, axis=-1)
        np.testing.assert_allclose(radial, 0.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(projected["w"]), np.asarray(updates["w"]))


def test_unknown_projection_is_rejected():
    with pytest.raises(ValueError, match="bank_projection='project'"):
        make_state("project")
