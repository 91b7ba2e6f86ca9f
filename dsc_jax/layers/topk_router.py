"""The softmax top-k router of the MoE and MoLoRA baselines, in float32.

``logits = q W_r (+ b_r)``; in training ``N(0, jitter_std²)`` noise may be added
(``noisy``); ``p = softmax(noisy)`` over all ``E`` experts. Two gatings:

* Switch / GShard (MoE): ``(g, i) = top_k(p)``, the weights NOT renormalised;
* renormalised (MoLoRA): ``(l, i) = top_k(noisy)``, ``g = softmax(l)`` over the k selected
  logits only (the weights sum to 1).

Regularisers: ``aux`` = :func:`dsc_jax.layers.common.load_balancing_loss` on ``p`` and
``z`` = :func:`dsc_jax.layers.common.z_loss` on the logits without noise.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsc_jax import paper
from dsc_jax.layers import remat_names
from dsc_jax.layers.common import Dtype, load_balancing_loss, z_loss
from dsc_jax.layers.routing import RouterOutput, router_projection


class TopKRouter(nn.Module):
    """``q [N, d] -> RouterOutput`` over ``E`` experts (see the module docstring).

    Attributes:
      num_experts: ``E``.
      top_k: ``k``, experts per token.
      use_bias: a router bias ``b_r [E]`` (MoLoRA) or none (MoE).
      renormalize: gate by the softmax over the ``k`` selected logits (MoLoRA) instead of
        the top-k of the full softmax (MoE).
      jitter_std: std of the training noise on the logits (read only when a
        ``jitter_key`` is passed).
      init_std: std of the kernel.
      param_dtype: storage dtype of the kernel and bias.
      logits_name: the logits' :func:`~jax.ad_checkpoint.checkpoint_name`
        (:mod:`dsc_jax.layers.remat_names`; MoLoRA passes its own).

    Parameters: ``kernel [d, E]`` (``embed, experts``), ``bias [E]`` (``experts``) with
    ``use_bias``.
    """

    num_experts: int
    top_k: int
    use_bias: bool = False
    renormalize: bool = False
    jitter_std: float = 0.0
    init_std: float = paper.INIT_STD
    param_dtype: Dtype = jnp.float32
    logits_name: str = remat_names.MOE_ROUTER_LOGITS

    @nn.compact
    def __call__(
        self,
        query: jax.Array,
        *,
        jitter_key: jax.Array | None = None,
        with_losses: bool = False,
    ) -> RouterOutput:
        """Route ``query: [N, d]`` (float32).

        Args:
          jitter_key: PRNG key of the training noise (``None``: no noise).
          with_losses: compute :attr:`RouterOutput.losses` (``aux``, ``z``).
        """
        logits, _, _ = router_projection(
            self,
            query,
            self.num_experts,
            axis="experts",
            init_std=self.init_std,
            param_dtype=self.param_dtype,
            use_bias=self.use_bias,
        )  # [N, E]
        logits = checkpoint_name(logits, self.logits_name)
        noisy = logits
        if jitter_key is not None and self.jitter_std > 0:
            noise = jax.random.normal(jitter_key, logits.shape, jnp.float32)
            noisy = logits + self.jitter_std * noise
        probs = jax.nn.softmax(noisy, axis=-1)
        if self.renormalize:
            top_logits, indices = jax.lax.top_k(noisy, self.top_k)
            gates = jax.nn.softmax(top_logits, axis=-1)
        else:
            gates, indices = jax.lax.top_k(probs, self.top_k)
        indices = indices.astype(jnp.int32)
        losses = {}
        if with_losses:
            losses = {"aux": load_balancing_loss(probs, indices), "z": z_loss(logits)}
        return RouterOutput(indices, gates, jnp.sum(gates, axis=-1), losses)
