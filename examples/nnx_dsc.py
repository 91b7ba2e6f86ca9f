"""DSC as the FFN of your own Flax NNX model.

    python examples/nnx_dsc.py --steps=300

A user-written NNX causal transformer whose feed-forward sub-layer is
:class:`dsc_jax.nnx.DSCLayer` (the same computation and parameter names as the Linen layer),
trained under ``nnx.jit`` on sequences that repeat a random pattern. What an NNX training
loop needs for DSC:

* call the model with ``deterministic=False``: each DSC layer overwrites its
  :class:`dsc_jax.nnx.Regularizer` variable with this call's unweighted terms (they never pile
  up across steps);
* ``dsc_jax.regularization_loss(dsc_jax.nnx.collect_regularizers(model))`` weights and sums
  them over every layer;
* ``nnx.Optimizer(model, optax.chain(optax.adam(lr), dsc_jax.bank_retraction()),
  wrt=nnx.Param)`` keeps the bank rows on their sphere (radius ``bank_radius``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dsc_jax
from dsc_jax import nnx as dsc_nnx


class MyBlock(nnx.Module):
    """Pre-LN block ``[B, T, d] -> [B, T, d]``: causal attention, then DSC as the FFN."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs) -> None:
        self.ln_1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=d_model, decode=False, rngs=rngs
        )
        self.ln_2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.ffn = dsc_nnx.DSCLayer(d_model, num_bases=32, top_k=4, hidden_dim=64, rngs=rngs)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = self.ln_1(x)
        x = x + self.attn(h, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))
        return x + self.ffn(self.ln_2(x), deterministic)


class MyLM(nnx.Module):
    """``tokens [B, T] -> logits [B, T, vocab]``."""

    def __init__(self, vocab: int, max_len: int, d_model: int, layers: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.positions = nnx.Embed(max_len, d_model, rngs=rngs)
        self.blocks = nnx.List([MyBlock(d_model, 2, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        x = self.embed(tokens) + self.positions(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x, deterministic)
        return self.embed.attend(self.ln_f(x))


def repeated_patterns(rng: np.random.Generator, batch: int, length: int, vocab: int, period: int):
    """``[B, length + 1]`` int32 rows, each a random ``period``-token pattern repeated."""
    patterns = rng.integers(0, vocab, (batch, period))
    return np.tile(patterns, (1, -(-(length + 1) // period)))[:, : length + 1].astype(np.int32)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train; print and return ``{"first_loss", "final_loss", "bank_norm_error", "traces"}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    vocab = 32
    model = MyLM(vocab, args.seq_len, 32, 2, rngs=nnx.Rngs(params=args.seed, dropout=1))
    tx = optax.chain(optax.adam(args.learning_rate), dsc_jax.bank_retraction())
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    traces = []

    @nnx.jit
    def train_step(model: MyLM, optimizer: nnx.Optimizer, rows: jax.Array):
        traces.append(1)  # runs only while tracing

        def loss_fn(model: MyLM):
            logits = model(rows[:, :-1], deterministic=False)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()
            reg, terms = dsc_jax.regularization_loss(dsc_nnx.collect_regularizers(model))
            return ce + reg, (ce, terms)

        (_, (ce, terms)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return ce, terms

    data_rng = np.random.default_rng(args.seed)
    losses = []
    for step in range(1, args.steps + 1):
        rows = repeated_patterns(data_rng, args.batch_size, args.seq_len, vocab, args.period)
        ce, terms = train_step(model, optimizer, jnp.asarray(rows))
        losses.append(float(ce))
        if step % 50 == 0 or step == args.steps:
            regs = ", ".join(f"{k} {float(v):.2e}" for k, v in terms.items())
            print(f"step {step}: cross-entropy {losses[-1]:.4f} | weighted regularisers: {regs}")

    banks = [block.ffn.basis_u[...] for block in model.blocks]
    radius = dsc_jax.bank.DEFAULT_BANK_RADIUS  # the layer's and bank_retraction()'s
    norm_error = max(
        float(jnp.max(jnp.abs(jnp.linalg.norm(b, axis=-1) / radius - 1))) for b in banks
    )
    print(f"bank rows: max | ||u|| - 1 | = {norm_error:.1e}; train step traced {len(traces)}x")
    return {
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "bank_norm_error": norm_error,
        "traces": len(traces),
    }


if __name__ == "__main__":
    main()
