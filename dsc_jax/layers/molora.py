"""Mixture-of-LoRA-experts FFN baseline (the paper's MoLoRA comparison; not in its reference code).

``y = f(x) + Σ_k g_k (x A_{i_k}) B_{i_k}`` with the static FFN ``f(x) = GELU(x W1) W2``
(exact erf GELU, no bias) and ``E`` rank-``r`` experts ``A_e: d×r``, ``B_e: r×d``.

Router (:class:`dsc_jax.layers.topk_router.TopKRouter`, float32, on the raw layer input
``x``, no LayerNorm): ``logits = x W_r + b_r``;
``(l, i) = top_k(logits)``; ``g = softmax(l)`` over the ``k`` selected logits only.
``B`` is zero-initialised (standard LoRA), so the layer starts as the static FFN.
Compute: ``x A_e`` for every expert (``[N, E, r]``, small), masked by a gate row that is zero
off the top-k, then one contraction with ``B``: ``O(E r d)`` FLOPs per token in two
well-shaped matmuls and no ``[N, k, d, r]`` gathered operand in memory.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsc_jax import paper
from dsc_jax._checks import check_float_input, check_positive_int
from dsc_jax.layers import remat_names
from dsc_jax.layers.common import (
    Dtype,
    check_common_fields,
    check_top_k,
    gelu_mlp,
    logical,
    model_dim_of,
    normal,
)
from dsc_jax.layers.routing import collects_losses, dense_gates, sow_routing
from dsc_jax.layers.topk_router import TopKRouter


class MoLoRALayer(nn.Module):
    """Static FFN plus top-k routed LoRA experts.

    Shapes: ``x [..., d] -> [..., d]`` in ``dtype`` (any leading axes, e.g. ``[B, T, d]``);
    ``d`` is fixed by the first call. Example::

        layer = MoLoRALayer(num_experts=8, rank=8, top_k=2, hidden_dim=128)
        variables = layer.init(jax.random.key(0), x)          # x: [B, T, d]
        y = layer.apply(variables, x)                          # [B, T, d]

    Attributes:
      num_experts: ``E``, number of LoRA experts.
      rank: ``r``, rank of each expert.
      top_k: experts per token, ``1 <= k <= E``.
      hidden_dim: hidden width ``H`` of the static FFN.
      dropout_rate: dropout on the output when ``deterministic=False``.
      init_std: std of ``mlp_in``, the router kernel and ``lora_a`` (the paper: 0.02).
      out_init_std: std of ``mlp_out`` (a GPT passes ``0.02 / sqrt(2 L)``).
      dtype: compute dtype of the FFN and the experts; output dtype (router: float32).
      param_dtype: storage dtype of every parameter (initialisers compute in float32).

    Parameters (logical axes): ``mlp_in/kernel [d, H]`` (``embed, mlp``),
    ``mlp_out/kernel [H, d]`` (``mlp, embed``), ``router/kernel [d, E]``
    (``embed, experts``), ``router/bias [E]`` (``experts``), ``lora_a [E, d, r]``
    (``experts, embed, rank``, normal(0.02)), ``lora_b [E, r, d]`` (``experts, rank, embed``,
    zeros).

    Sown: ``losses/aux`` (:func:`dsc_jax.layers.common.load_balancing_loss` with ``p = softmax``
    over all ``E`` logits) and ``losses/z`` (:func:`dsc_jax.layers.common.z_loss`) when
    ``"losses"`` is mutable; ``intermediates/top_k_indices [..., k]`` int32 and
    ``intermediates/gates [..., k]`` float32.
    """

    num_experts: int
    rank: int
    top_k: int
    hidden_dim: int
    dropout_rate: float = 0.0
    init_std: float = paper.INIT_STD
    out_init_std: float = paper.INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_experts", self.num_experts)
        check_positive_int(owner, "rank", self.rank)
        check_top_k(owner, self.top_k, "num_experts", self.num_experts)
        check_common_fields(self)
        super().__post_init__()

    @nn.nowrap
    def make_router(self) -> TopKRouter:
        """The layer's ``router`` module (with bias, softmax over the k selected logits); its
        input is the raw ``x``."""
        return TopKRouter(
            self.num_experts,
            self.top_k,
            use_bias=True,
            renormalize=True,
            init_std=self.init_std,
            param_dtype=self.param_dtype,
            logits_name=remat_names.MOLORA_ROUTER_LOGITS,
            name="router",
        )

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Apply the static FFN and the routed LoRA update.

        Args:
          x: ``[..., d]`` floating input.
          deterministic: disables dropout when ``True``.

        Returns:
          ``[..., d]`` in ``dtype``.
        """
        check_float_input(type(self).__name__, x, model_dim_of(self, ("lora_a",), axis=1))
        model_dim = x.shape[-1]
        num_experts = self.num_experts

        lora_a = self.param(
            "lora_a",
            normal(self.init_std, ("experts", "embed", "rank")),
            (num_experts, model_dim, self.rank),
            self.param_dtype,
        )
        lora_b = self.param(
            "lora_b",
            logical(nn.initializers.zeros, ("experts", "rank", "embed")),
            (num_experts, self.rank, model_dim),
            self.param_dtype,
        )

        tokens = x.reshape(-1, model_dim)
        routing = self.make_router()(tokens.astype(jnp.float32), with_losses=collects_losses(self))
        sow_routing(self, routing, x.shape[:-1])  # gates [N, k] sum to 1

        tokens = tokens.astype(self.dtype)
        y = gelu_mlp(
            tokens,
            self.hidden_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=self.init_std,
            out_init_std=self.out_init_std,
        )

        # Every expert's rank-r projection ([N, E, r]: small), weighted by a gate row that is
        # zero off the top-k, then one contraction with B. Gathering A_k/B_k per token instead
        # would materialise [N, k, d, r] tensors.
        gate_rows = dense_gates(routing.indices, routing.gates, num_experts)  # [N, E]
        low_rank = jnp.einsum("nd,edr->ner", tokens, lora_a.astype(self.dtype))
        low_rank = low_rank * gate_rows.astype(self.dtype)[..., None]
        low_rank = checkpoint_name(low_rank, remat_names.MOLORA_LATENTS)
        y = y + jnp.einsum("ner,erd->nd", low_rank, lora_b.astype(self.dtype))

        y = y.reshape((*x.shape[:-1], model_dim))
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        return y.astype(self.dtype)
