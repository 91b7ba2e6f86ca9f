"""DSC replacing the FFN of your own Flax Linen transformer block.

    python examples/custom_block_dsc.py --steps=300

A user-written causal transformer (nothing from :mod:`dsc_jax.models`) whose feed-forward
sub-layer is a :class:`dsc_jax.DSCLayer`, trained as a language model on synthetic sequences
that repeat a random pattern (the first period is unpredictable, the rest can be copied).
What a training loop needs for DSC, all in ``train_step``:

* apply with ``mutable=["losses"]``: every DSC layer sows its unweighted regularisers there;
* ``dsc_jax.regularization_loss(losses, dsc_jax.LossWeights())`` weights and sums them;
* ``optax.chain(optax.adam(lr), dsc_jax.bank_retraction())`` puts the bank rows
  (``basis_u``/``basis_v``) back on their sphere (radius ``bank_radius``) after every update.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dsc_jax


class MyBlock(nn.Module):
    """Pre-LN block ``[B, T, d] -> [B, T, d]``: causal attention, then DSC as the FFN."""

    num_heads: int = 2
    num_bases: int = 32
    top_k: int = 4
    hidden_dim: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = nn.LayerNorm()(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(h, h, mask=mask)
        ffn = dsc_jax.DSCLayer(
            num_bases=self.num_bases, top_k=self.top_k, hidden_dim=self.hidden_dim
        )
        return x + ffn(nn.LayerNorm()(x), deterministic)


class MyLM(nn.Module):
    """``tokens [B, T] -> logits [B, T, vocab]``."""

    vocab_size: int = 32
    max_len: int = 32
    d_model: int = 32
    num_layers: int = 2

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        embed = nn.Embed(self.vocab_size, self.d_model)
        x = embed(tokens) + nn.Embed(self.max_len, self.d_model)(jnp.arange(tokens.shape[1]))
        for _ in range(self.num_layers):
            x = MyBlock()(x, deterministic)
        return embed.attend(nn.LayerNorm()(x))


def repeated_patterns(rng: np.random.Generator, batch: int, length: int, vocab: int, period: int):
    """``[B, length + 1]`` int32 rows, each a random ``period``-token pattern repeated."""
    patterns = rng.integers(0, vocab, (batch, period))
    return np.tile(patterns, (1, -(-(length + 1) // period)))[:, : length + 1].astype(np.int32)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train; print and return ``{"first_loss", "final_loss", "bank_norm_error"}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = MyLM(max_len=args.seq_len)
    data_rng = np.random.default_rng(args.seed)

    def batch():
        return repeated_patterns(
            data_rng, args.batch_size, args.seq_len, model.vocab_size, args.period
        )

    init_rng, dropout_rng = jax.random.split(jax.random.key(args.seed))
    params = model.init(init_rng, batch()[:, :-1])["params"]
    params = dsc_jax.retract_bank(nn.unbox(params))
    tx = optax.chain(optax.adam(args.learning_rate), dsc_jax.bank_retraction())
    opt_state = tx.init(params)
    weights = dsc_jax.LossWeights()  # λ_aux, λ_budget, λ_frame, λ_z of the paper

    def loss_fn(params, rows, rng):
        logits, state = model.apply(
            {"params": params}, rows[:, :-1], False, rngs={"dropout": rng}, mutable=["losses"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()
        reg, terms = dsc_jax.regularization_loss(state["losses"], weights)
        return ce + reg, (ce, terms)

    @jax.jit
    def train_step(params, opt_state, rows, rng):
        (_, (ce, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rows, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, terms

    losses = []
    for step in range(1, args.steps + 1):
        rng = jax.random.fold_in(dropout_rng, step)
        params, opt_state, ce, terms = train_step(params, opt_state, batch(), rng)
        losses.append(float(ce))
        if step % 50 == 0 or step == args.steps:
            regs = ", ".join(f"{k} {float(v):.2e}" for k, v in terms.items())
            print(f"step {step}: cross-entropy {losses[-1]:.4f} | weighted regularisers: {regs}")

    banks = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if "basis_" in jax.tree_util.keystr(path)
    ]
    radius = dsc_jax.bank.DEFAULT_BANK_RADIUS  # the layer's and bank_retraction()'s
    norm_error = max(
        float(jnp.max(jnp.abs(jnp.linalg.norm(b, axis=-1) / radius - 1))) for b in banks
    )
    print(f"bank rows: max | ||u|| - 1 | = {norm_error:.1e} over {len(banks)} bank matrices")
    return {"first_loss": losses[0], "final_loss": losses[-1], "bank_norm_error": norm_error}


if __name__ == "__main__":
    main()
