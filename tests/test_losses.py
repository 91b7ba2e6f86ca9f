"""LossWeights, regularization_loss over sown trees, cross_entropy_loss."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsc_jax.layers.configs import DSCConfig, MoEConfig
from dsc_jax.layers.losses import (
    TERM_NAMES,
    LossWeights,
    cross_entropy_loss,
    regularization_loss,
    sum_loss_terms,
)
from dsc_jax.models.gpt import GPT, GPTConfig

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_loss_weights_defaults_and_validation():
    assert LossWeights().as_dict() == {"aux": 0.01, "budget": 0.01, "frame": 0.001, "z": 1e-4}
    assert LossWeights(aux=0.0).aux == 0.0
    for name, bad in (("aux", -0.1), ("budget", "0.1"), ("frame", True), ("z", None)):
        with pytest.raises(ValueError, match=f"LossWeights.{name}="):
            LossWeights(**{name: bad})


def test_regularization_loss_on_hand_built_tree():
    """Two layers of sown tuples; float32 tolerance 1e-7 relative."""
    losses = {
        "block_0": {"ffn": {"aux": (jnp.float32(1.0),), "z": (jnp.float32(2.0),)}},
        "block_1": {
            "ffn": {
                "aux": (jnp.float32(3.0),),
                "budget": (jnp.float32(0.5),),
                "frame": (jnp.float32(4.0),),
                "z": (jnp.float32(6.0),),
            }
        },
    }
    weights = LossWeights(aux=0.1, budget=0.2, frame=0.3, z=0.4)
    total, terms = regularization_loss(losses, weights)
    expected = {"aux": 0.1 * 4.0, "budget": 0.2 * 0.5, "frame": 0.3 * 4.0, "z": 0.4 * 8.0}
    assert set(terms) == set(TERM_NAMES)
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-7)
    np.testing.assert_allclose(total, sum(expected.values()), rtol=1e-6)
    chex.assert_type(total, jnp.float32)
    chex.assert_shape(total, ())

    # Same under jit, with a tuple of two sows and scan-stacked arrays.
    stacked = {"blocks": {"ffn": {"aux": (jnp.array([1.0, 3.0]),), "z": (2.0, 6.0)}}}
    jit_total, jit_terms = jax.jit(lambda tree: regularization_loss(tree, weights))(stacked)
    np.testing.assert_allclose(jit_terms["aux"], 0.4, rtol=1e-6)
    np.testing.assert_allclose(jit_terms["z"], 3.2, rtol=1e-6)
    np.testing.assert_allclose(jit_terms["frame"], 0.0)
    np.testing.assert_allclose(jit_total, 3.6, rtol=1e-6)


def test_regularization_loss_empty_and_unknown():
    for empty in (None, {}, {"block_0": {"ffn": {}}}):
        with pytest.raises(ValueError, match="holds no regulariser term"):
            regularization_loss(empty)
        total, terms = regularization_loss(empty, allow_empty=True)
        assert float(total) == 0.0
        assert {name: float(v) for name, v in terms.items()} == dict.fromkeys(TERM_NAMES, 0.0)
    with pytest.raises(ValueError, match=r"'entropy'.*block_0/ffn/entropy"):
        regularization_loss({"block_0": {"ffn": {"entropy": (jnp.float32(1.0),)}}})
    with pytest.raises(ValueError, match="dtype"):
        regularization_loss({"block_0": {"ffn": {"aux": (jnp.int32(1),)}}})


@pytest.mark.parametrize("kind", ["dsc", "moe"])
def test_weighted_total_of_a_gpt_equals_hand_sum(kind):
    cfg = GPTConfig(
        vocab_size=64,
        max_seq_len=8,
        num_layers=2,
        num_heads=2,
        d_model=32,
        ffn={
            "moe": MoEConfig(num_experts=4, hidden_dim=16),
            "dsc": DSCConfig(num_bases=16, hidden_dim=32),
        }[kind],
    )
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64, jnp.int32)
    weights = LossWeights()

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(key: jax.Array):
        params = model.init(key, tokens)["params"]  # init's own sown values are not reused
        _, state = model.apply(
            {"params": params},
            tokens,
            deterministic=False,
            rngs={"dropout": key},
            mutable=["losses"],
        )
        return state["losses"], regularization_loss(state["losses"], weights)

    losses, (total, terms) = run(jax.random.key(1))
    losses = nn.unbox(losses)
    expected_names = {"dsc": TERM_NAMES, "moe": ("aux", "z")}[kind]
    hand = dict.fromkeys(TERM_NAMES, 0.0)
    for layer in ("block_0", "block_1"):
        sown = losses[layer]["ffn"]
        assert set(sown) == set(expected_names)
        for name, values in sown.items():
            assert len(values) == 1  # one sow per layer and apply
            hand[name] += getattr(weights, name) * float(values[0])
    for name in TERM_NAMES:
        np.testing.assert_allclose(terms[name], hand[name], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(total, sum(hand.values()), rtol=1e-6)
    assert float(total) > 0.0


def test_cross_entropy_matches_log_softmax():
    """Against a float64 NumPy reference; float32 tolerance 1e-5 relative."""
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((2, 5, 7))).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5)).astype(np.int32)
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    loss = jax.jit(cross_entropy_loss)
    np.testing.assert_allclose(loss(logits, targets), nll.mean(), rtol=1e-5)
    mask = np.arange(5)[None, :] < np.array([[2], [5]])
    expected = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(loss(logits, targets, mask), expected, rtol=1e-5)
    assert float(loss(logits, targets, np.zeros((2, 5), bool))) == 0.0
    chex.assert_type(cross_entropy_loss(jnp.asarray(logits, jnp.bfloat16), targets), jnp.float32)
    with pytest.raises(ValueError, match="does not match"):
        cross_entropy_loss(logits, targets[:, :4])
    with pytest.raises(ValueError, match="integers"):
        cross_entropy_loss(logits, targets.astype(np.float32))


def test_sum_loss_terms_is_unweighted():
    losses = {"a": {"aux": (jnp.float32(2.0), jnp.float32(3.0))}}
    np.testing.assert_allclose(sum_loss_terms(losses)["aux"], 5.0)
