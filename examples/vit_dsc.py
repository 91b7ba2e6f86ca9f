"""DSC as the MLP of a small vision transformer, trained on synthetic images.

    python examples/vit_dsc.py --steps=300

Each 16x16 grey image holds one bright 4x4 square on noise; the label is the quadrant the
square sits in (4 classes). The model cuts the image into 4x4 patches, embeds them, runs two
pre-LayerNorm blocks whose MLP is a :class:`dsc_jax.DSCLayer` (input and output ``[B, N, d]``:
the layer acts on the last axis of any shape), mean-pools and classifies. Training adds the
DSC regularisers (``"losses"`` collection -> :func:`dsc_jax.regularization_loss`) and keeps
the bank rows on their sphere with :func:`dsc_jax.bank_retraction` chained after Adam.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

import dsc_jax

IMAGE, PATCH, CLASSES = 16, 4, 4


def synthetic_images(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``([B, 16, 16, 1] float32 images, [B] int32 quadrant labels)``."""
    labels = rng.integers(0, CLASSES, batch)
    images = rng.normal(0.0, 0.3, (batch, IMAGE, IMAGE, 1)).astype(np.float32)
    half = IMAGE // 2
    for i, label in enumerate(labels):
        top, left = (label // 2) * half, (label % 2) * half
        y, x = top + rng.integers(0, half - 3), left + rng.integers(0, half - 3)
        images[i, y : y + 4, x : x + 4] += 2.0
    return images, labels.astype(np.int32)


class ViTBlock(nn.Module):
    """``x + MHA(LN(x))`` then ``x + DSC(LN(x))`` on ``x: [B, N, d]``."""

    num_heads: int
    num_bases: int
    top_k: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(h, h)
        mlp = dsc_jax.DSCLayer(num_bases=self.num_bases, top_k=self.top_k, hidden_dim=x.shape[-1])
        return x + mlp(nn.LayerNorm()(x))


class ViT(nn.Module):
    """``images [B, H, W, C] -> logits [B, classes]``."""

    d_model: int = 32
    num_layers: int = 2
    num_heads: int = 2
    num_bases: int = 32
    top_k: int = 4

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.Conv(self.d_model, (PATCH, PATCH), strides=(PATCH, PATCH))(images)  # patches
        x = x.reshape(x.shape[0], -1, self.d_model)  # [B, N, d]
        pos = self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.d_model))
        x = x + pos
        for _ in range(self.num_layers):
            x = ViTBlock(self.num_heads, self.num_bases, self.top_k)(x)
        return nn.Dense(CLASSES)(nn.LayerNorm()(x).mean(axis=1))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train; print and return the final ``{"loss", "accuracy"}`` (held-out batch)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data_rng = np.random.default_rng(args.seed)
    model = ViT()
    images, _ = synthetic_images(data_rng, args.batch_size)
    params = nn.unbox(model.init(jax.random.key(args.seed), images)["params"])
    params = dsc_jax.retract_bank(params)  # bank rows at norm bank_radius from the start
    tx = optax.chain(optax.adam(args.learning_rate), dsc_jax.bank_retraction())
    opt_state = tx.init(params)

    def loss_fn(params, images, labels):
        logits, state = model.apply({"params": params}, images, mutable=["losses"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        reg, _ = dsc_jax.regularization_loss(state["losses"], dsc_jax.LossWeights())
        return ce + reg, ce

    @jax.jit
    def train_step(params, opt_state, images, labels):
        (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce

    for step in range(1, args.steps + 1):
        params, opt_state, ce = train_step(
            params, opt_state, *synthetic_images(data_rng, args.batch_size)
        )
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: cross-entropy {float(ce):.4f}")

    images, labels = synthetic_images(np.random.default_rng(args.seed + 1), 256)
    logits = jax.jit(model.apply)({"params": params}, images)
    result = {
        "loss": float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()),
        "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
    }
    print(f"held-out: loss {result['loss']:.4f}, accuracy {result['accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
