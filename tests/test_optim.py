"""Optimiser groups (the paper's Table 2 recipe): router lr = multiplier × lr at every step,
weight-decay masks, schedule shape. Toy parameter trees, no model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from dsc_jax import GPT, DenseConfig, DSCConfig, GPTConfig, MoEConfig, MoLoRAConfig, param_labels
from dsc_jax.train.optim import default_optim_config, lr_schedule, make_optimizer

STEPS = 12


def toy_params() -> dict:
    """A few parameters named as in the real layers (DSC, MoE router, LayerNorms, attention)."""
    ones = jnp.ones
    return {
        "wte": {"embedding": ones((16, 4))},
        "block_0": {
            "ln_1": {"scale": ones((4,)), "bias": ones((4,))},
            "attn": {"query": {"kernel": ones((4, 2, 2))}},
            "ffn": {
                "mlp_in": {"kernel": ones((4, 8))},
                "router_norm": {"scale": ones((4,)), "bias": ones((4,))},
                "router": {"kernel": ones((4, 6)), "bias": ones((6,))},
                "basis_u": ones((6, 4)),
                "basis_v": ones((6, 4)),
                "gamma": ones((4,)),
            },
        },
        "block_1": {"ffn": {"router": {"kernel": ones((4, 3))}, "expert_in": ones((3, 4, 8))}},
    }


def make_tx(weight_decay: float = 0.0, multiplier: float = 5.0):
    cfg = default_optim_config()
    cfg.learning_rate, cfg.min_learning_rate = 1e-2, 1e-3
    cfg.warmup_steps, cfg.decay_steps = 4, STEPS
    cfg.weight_decay = weight_decay
    return make_optimizer(cfg, num_train_steps=STEPS, router_lr_multiplier=multiplier)


def real_labels(ffn, **kwargs) -> dict[str, str]:
    """Group labels of a real GPT's parameter tree (shapes only), flattened to "a/b/c"."""
    cfg = GPTConfig(vocab_size=32, max_seq_len=8, num_layers=1, num_heads=2, d_model=16, ffn=ffn)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    labels = param_labels(nn.unbox(shapes["params"]), **kwargs)
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(labels).items()}


@pytest.mark.parametrize(
    "ffn, expected",
    [
        (
            DSCConfig(num_bases=8, top_k=2, hidden_dim=16),
            {
                "router/kernel": "router",
                "router/bias": "router",
                "router_norm/scale": "router",
                "router_norm/bias": "router",
                "basis_u": "bank",
                "basis_v": "bank",
                "gamma": "no_decay",
                "mlp_in/kernel": "decay",
                "mlp_out/kernel": "decay",
            },
        ),
        (
            MoEConfig(num_experts=3, top_k=2, hidden_dim=16),
            {
                "router/kernel": "router",
                "router_norm/scale": "router",
                "expert_in": "decay",
                "expert_out": "decay",
            },
        ),
        (
            MoLoRAConfig(num_experts=3, rank=2, top_k=2, hidden_dim=16),
            {"router/kernel": "router", "router/bias": "router", "lora_a": "decay"},
        ),
        (DenseConfig(hidden_dim=16), {"mlp_in/kernel": "decay", "mlp_out/kernel": "decay"}),
    ],
    ids=["dsc", "moe", "molora", "dense"],
)
def test_param_labels_on_real_models(ffn, expected):
    labels = real_labels(ffn)
    for name, label in expected.items():
        assert labels[f"block_0/ffn/{name}"] == label, name
    assert labels["wte/embedding"] == "decay"
    assert labels["block_0/attn/query/kernel"] == "decay"
    assert labels["block_0/ln_1/scale"] == labels["ln_f/bias"] == "no_decay"
    # Every router parameter of the model is in the router group, and nothing else is.
    routers = {k for k, v in labels.items() if v == "router"}
    assert routers == {k for k in labels if "/router" in k}


def test_decay_gamma_option_moves_gamma_to_the_decayed_group():
    ffn = DSCConfig(num_bases=8, top_k=2, hidden_dim=16)
    assert real_labels(ffn)["block_0/ffn/gamma"] == "no_decay"
    assert real_labels(ffn, decay_gamma=True)["block_0/ffn/gamma"] == "decay"


def test_router_lr_is_multiplier_times_lr_at_every_step():
    """Equal gradients on every leaf give equal Adam directions, so each update is exactly
    -lr_group(step) · direction: router updates are 5× the others at every step (the
    reference code's loop loses the multiplier after step 0; this must not)."""
    tx, schedule = make_tx(weight_decay=0.0, multiplier=5.0)
    params = toy_params()
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    update = jax.jit(tx.update)
    for step in range(STEPS + 3):
        updates, state = update(grads, state, params)
        router = float(updates["block_0"]["ffn"]["router"]["kernel"][0, 0])
        router_norm = float(updates["block_0"]["ffn"]["router_norm"]["scale"][0])
        gate = float(updates["block_1"]["ffn"]["router"]["kernel"][0, 0])
        other = float(updates["block_0"]["ffn"]["mlp_in"]["kernel"][0, 0])
        gamma = float(updates["block_0"]["ffn"]["gamma"][0])
        lr = float(schedule(step))
        if step == 0:
            assert lr == 0.0 and router == 0.0 and other == 0.0
            continue
        assert other < 0 and np.isclose(other / -lr, 1.0, rtol=1e-4), (step, other, lr)
        for value in (router, router_norm, gate):
            assert np.isclose(value / other, 5.0, rtol=1e-5), (step, value, other)
        assert np.isclose(gamma, other, rtol=1e-6)


def test_weight_decay_only_on_matrices_outside_the_router():
    tx, schedule = make_tx(weight_decay=0.5)
    params = toy_params()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    for _ in range(3):  # step 2 has lr > 0
        updates, state = update(zeros, state, params)
    lr = float(schedule(2))
    labels = param_labels(params)
    for label, update in zip(jax.tree.leaves(labels), jax.tree.leaves(updates), strict=True):
        expected = -lr * 0.5 if label in ("decay", "bank") else 0.0
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, atol=1e-12)


def test_schedule_warmup_cosine():
    schedule = lr_schedule(6e-4, 6e-5, 150, 2000)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(75)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(150)), 6e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(2000)), 6e-5, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(5000)), 6e-5, rtol=1e-5)
    decay = np.array([float(schedule(s)) for s in range(150, 2001, 50)])
    assert np.all(np.diff(decay) < 0)


def test_matches_plain_clipped_adamw_when_groups_coincide():
    """With multiplier 1 and no decay, the grouped optimiser is one clip-by-global-norm (over
    all parameters, not per group) followed by Adam: compare with optax's chain on random,
    large gradients (clipping active)."""
    tx, schedule = make_tx(weight_decay=0.0, multiplier=1.0)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
        optax.scale_by_learning_rate(schedule),
    )
    params = toy_params()
    state, ref_state = tx.init(params), reference.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(reference.update)
    rng = np.random.default_rng(0)
    for _ in range(6):
        grads = jax.tree.map(lambda p: 10.0 * rng.standard_normal(p.shape, np.float32), params)
        updates, state = update(grads, state, params)
        expected, ref_state = ref_update(grads, ref_state, params)
        for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("multiplier", [1.0, 2.5])
def test_router_multiplier_is_configurable(multiplier):
    tx, _ = make_tx(multiplier=multiplier)
    params = toy_params()
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(grads, state, params)
    ratio = updates["block_0"]["ffn"]["router"]["bias"][0] / updates["wte"]["embedding"][0, 0]
    assert np.isclose(float(ratio), multiplier, rtol=1e-5)
