"""Train/eval steps: gradient accumulation equals one big batch; diagnostics arithmetic."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsc_jax.layers.configs import DSCConfig
from dsc_jax.layers.losses import LossWeights
from dsc_jax.models.gpt import GPT, GPTConfig
from dsc_jax.train import diagnostics, steps

# float32, matmul precision "highest" (conftest): summing 4 micro-batch gradients of
# mean-reduced losses vs one mean over the whole batch differs only by rounding.
RTOL, ATOL = 1e-5, 1e-7


def test_accumulation_equals_one_large_batch():
    """k=4 micro-batches of 2 rows (scan) == one batch of 8 rows, for the CE objective (no
    dropout; regularisers off because they are non-linear in per-batch means)."""
    cfg = GPTConfig(
        vocab_size=64, max_seq_len=16, num_layers=1, num_heads=2, d_model=32, dropout_rate=0.0,
        ffn=DSCConfig(num_bases=16, top_k=2, hidden_dim=32),
    )  # fmt: skip
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64, dtype=jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens[:, :-1])["params"])
    grads_fn = functools.partial(
        steps.compute_gradients, apply_fn=model.apply, loss_weights=LossWeights(0, 0, 0, 0)
    )
    one, m_one = jax.jit(functools.partial(grads_fn, micro_batches=1))(
        params, batch=tokens, step_rng=jax.random.key(2)
    )
    acc, m_acc = jax.jit(functools.partial(grads_fn, micro_batches=4))(
        params, batch=tokens, step_rng=jax.random.key(2)
    )
    np.testing.assert_allclose(float(m_acc["train_ce"]), float(m_one["train_ce"]), rtol=RTOL)
    flat_one, flat_acc = jax.tree.leaves(one), jax.tree.leaves(acc)
    assert len(flat_one) == len(flat_acc) > 0
    for a, b in zip(flat_acc, flat_one, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
    assert float(jnp.max(jnp.abs(one["wte"]["embedding"]))) > 0


def test_micro_batches_are_strided_rows():
    batch = jnp.arange(6 * 3).reshape(6, 3)
    micro = steps.split_micro_batches(batch, 3)
    assert micro.shape == (3, 2, 3)
    np.testing.assert_array_equal(np.asarray(micro[1]), np.asarray(batch[1::3]))


def test_routing_diagnostics_arithmetic():
    """4 atoms, K=2; 3 tokens selecting {0,1}, {0,1}, {0,2}: atom 3 unused."""
    indices = jnp.array([[[0, 1], [0, 1], [0, 2]]], jnp.int32)  # [B=1, T=3, K=2]
    signal = jnp.array([[0.05, 1.0, 2.0]])
    intermediates = {"block_0": {"ffn": {"top_k_indices": (indices,), "signal": (signal,)}}}
    params = {"block_0": {"ffn": {"basis_u": jnp.eye(4), "basis_v": jnp.ones((4, 4))}}}
    stats = diagnostics.routing_statistics(intermediates, params)
    np.testing.assert_array_equal(np.asarray(stats["block_0/ffn"]["usage"]), [3, 2, 1, 0])
    doubled = jax.tree.map(lambda x: 2 * x, stats)  # two identical eval batches
    out = diagnostics.finalize_eval({"loss_sum": 6.0, "tokens": 3.0, "routing": doubled})
    np.testing.assert_allclose(out["eval_loss"], 2.0)
    np.testing.assert_allclose(out["eval_ppl"], np.exp(2.0))
    p = np.array([3, 2, 1]) / 6
    prefix = "diag/block_0/ffn"
    np.testing.assert_allclose(out[f"{prefix}/used_frac"], 0.75)
    np.testing.assert_allclose(out[f"{prefix}/usage_entropy"], -np.sum(p * np.log(p)))
    np.testing.assert_allclose(out[f"{prefix}/mean_signal"], 3.05 / 3, rtol=1e-6)
    np.testing.assert_allclose(out[f"{prefix}/signal_collapse_frac"], 1 / 3)
    ranks = diagnostics.bank_effective_ranks(diagnostics.bank_parameters(params))
    np.testing.assert_allclose(float(ranks[f"{prefix}/erank_u"]), 4.0, rtol=1e-5)  # orthonormal
    np.testing.assert_allclose(float(ranks[f"{prefix}/erank_v"]), 1.0, rtol=1e-5)  # rank one


def test_effective_rank_at_intermediate_values():
    """Between the extremes 1 and rank: hand values ``M² / (M + Σ_{i≠j}(u_i·u_j)²)`` (rows
    normalised first, so scaling a row changes nothing) and ``(Σσ²)²/Σσ⁴`` by SVD."""
    two_directions = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 0.5]])  # e1, e1, e2: 9 / 5
    np.testing.assert_allclose(diagnostics.effective_rank(two_directions), 9 / 5, rtol=1e-12)
    tilted = np.array([[1.0, 0.0, 0.0], [5.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # overlaps 1, ½, ½
    np.testing.assert_allclose(diagnostics.effective_rank(tilted), 9 / 7, rtol=1e-12)
    bank = np.random.default_rng(0).normal(size=(12, 5))
    sigma = np.linalg.svd(bank / np.linalg.norm(bank, axis=-1, keepdims=True), compute_uv=False)
    want = np.sum(sigma**2) ** 2 / np.sum(sigma**4)
    assert 1.5 < want < 4.9  # strictly inside (1, rank)
    np.testing.assert_allclose(diagnostics.effective_rank(bank), want, rtol=1e-10)
