"""Exact and budget parameter counts of a :class:`~dsc_jax.models.gpt.GPT`.

Budget accounting (the closed forms the iso-active solver, the paper's Appendix A.2, matches
to the targets; ``d`` model width, ``L`` layers, ``V`` vocabulary, ``T`` context)::

    fixed = V·d + T·d + L·4d² + L·4d + 2d  (+ V·d untied head)
    dense:  total = active = 2dH
    moe:    total = E·2dH + dE,        active = k·2dH + dE             # gate only
    dsc:    total = 2dH + R + 2dM,     active = 2dH + R + 2dK          # router weight only
    molora: total = 2dH + dE + 2drE,   active = 2dH + dE + 2drk        # router weight only

with the DSC router weight ``R = dM`` (flat) or ``R = d₁n₁ + d₂n₂`` (``router="product_key"``:
two sub-key tables over the halves ``d₁ = ⌊d/2⌋``, ``d₂ = d − d₁`` of the router input,
``n₁·n₂ = M``). The budget forms leave out the small vectors every token still uses (router
LayerNorm, router bias, DSC ``γ``); :func:`closed_form_params` adds them and
:func:`count_params` counts the real tree.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dsc_jax.layers.dsc_product_key import product_key_shape
from dsc_jax.models.gpt import GPT, GPTConfig


def fixed_param_count(
    d_model: int, num_layers: int, vocab_size: int, seq_len: int, tie_embeddings: bool = True
) -> int:
    """Non-FFN parameters: ``V·d + T·d + L·4d² + L·4d + 2d`` (+ ``V·d`` untied head)."""
    d = d_model
    fixed = vocab_size * d + seq_len * d + num_layers * (4 * d * d + 4 * d) + 2 * d
    return fixed if tie_embeddings else fixed + vocab_size * d


def budget_ffn_params(cfg: GPTConfig) -> tuple[int, int]:
    """Per-layer ``(total, active)`` FFN parameters in the budget accounting."""
    d, ffn = cfg.d_model, cfg.ffn
    h = ffn.hidden_dim
    if ffn.kind == "dense":
        return 2 * d * h, 2 * d * h
    if ffn.kind == "moe":
        e, k = ffn.num_experts, ffn.top_k
        return e * 2 * d * h + d * e, k * 2 * d * h + d * e
    if ffn.kind == "dsc":
        m, k = ffn.num_bases, ffn.top_k
        router = _dsc_router_sizes(d, ffn)[0]
        return 2 * d * h + router + 2 * d * m, 2 * d * h + router + 2 * d * k
    e, k, r = ffn.num_experts, ffn.top_k, ffn.rank
    return 2 * d * h + d * e + 2 * d * r * e, 2 * d * h + d * e + 2 * d * r * k


def _dsc_router_sizes(d: int, ffn: Any) -> tuple[int, int]:
    """``(weights, biases)`` of a DSC router: ``(d·M, M)`` flat, ``(d₁n₁ + d₂n₂, n₁ + n₂)``
    product keys (:mod:`dsc_jax.layers.dsc_product_key`)."""
    if ffn.router != "product_key":
        return d * ffn.num_bases, ffn.num_bases
    rows, cols = product_key_shape(type(ffn).__name__, ffn.num_bases, ffn.product_key_rows)
    half = d // 2
    return half * rows + (d - half) * cols, rows + cols


def budget_params(cfg: GPTConfig) -> tuple[int, int]:
    """Whole-model ``(total, active)`` in the budget accounting: the fixed
    parameters plus ``L ×`` :func:`budget_ffn_params`."""
    fixed = fixed_param_count(
        cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings
    )
    total, active = budget_ffn_params(cfg)
    return fixed + cfg.num_layers * total, fixed + cfg.num_layers * active


def closed_form_params(cfg: GPTConfig) -> tuple[int, int]:
    """Exact ``(total, active)`` of ``GPT(cfg)`` by formula (must equal :func:`count_params`).

    Adds to :func:`budget_ffn_params` the vectors the budget leaves out: MoE router LayerNorm
    ``2d``; DSC router bias (``M`` flat, ``n₁ + n₂`` product keys) plus (refined) router
    LayerNorm ``2d`` and ``γ`` ``d`` or (basic) scalar ``γ``; MoLoRA router bias ``E``. All
    of them count as active.
    """
    d = cfg.d_model
    total, active = budget_ffn_params(cfg)
    ffn, extra = cfg.ffn, 0
    if ffn.kind == "moe":
        extra = 2 * d
    elif ffn.kind == "dsc":
        extra = _dsc_router_sizes(d, ffn)[1] + (3 * d if ffn.variant == "refined" else 1)
    elif ffn.kind == "molora":
        extra = ffn.num_experts
    fixed = fixed_param_count(
        d, cfg.num_layers, cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings
    )
    return fixed + cfg.num_layers * (total + extra), fixed + cfg.num_layers * (active + extra)


def param_shapes(cfg: GPTConfig) -> dict[str, Any]:
    """Unboxed ``params`` tree of ``GPT(cfg)`` as ``jax.ShapeDtypeStruct`` (no FLOPs, no memory)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), tokens))
    return nn.unbox(variables["params"])


def _inactive_fraction(cfg: GPTConfig, name: str) -> Fraction:
    """Fraction of an FFN parameter that a single token does not use."""
    ffn = cfg.ffn
    if ffn.kind == "moe" and name in ("expert_in", "expert_out"):
        return Fraction(ffn.num_experts - ffn.top_k, ffn.num_experts)
    if ffn.kind == "molora" and name in ("lora_a", "lora_b"):
        return Fraction(ffn.num_experts - ffn.top_k, ffn.num_experts)
    if ffn.kind == "dsc" and name in ("basis_u", "basis_v"):
        return Fraction(ffn.num_bases - ffn.top_k, ffn.num_bases)
    return Fraction(0)


def count_params(cfg: GPTConfig) -> tuple[int, int]:
    """Exact ``(total, active)`` counted from ``jax.eval_shape(GPT(cfg).init, ...)``.

    Rule: ``active = total − Σ_layers inactive``, where inactive is the weights of the
    ``E − k`` unselected experts (MoE ``expert_in``/``expert_out``; MoLoRA ``lora_a``/
    ``lora_b``) or the ``M − K`` unselected atoms' rows of DSC ``basis_u``/``basis_v``
    (``2d(M − K)``). Everything else (embeddings, attention, LayerNorms, static FFNs, routers
    with their biases and LayerNorms, ``γ``) is used by every token and counts as active.
    """
    flat = traverse_util.flatten_dict(param_shapes(cfg))
    total, inactive = 0, Fraction(0)
    for path, leaf in flat.items():
        size = math.prod(leaf.shape)
        total += size
        if "ffn" in path[:-1]:
            inactive += size * _inactive_fraction(cfg, path[-1])
    if inactive.denominator != 1:
        raise AssertionError(f"non-integer inactive parameter count {inactive} for {cfg}")
    return total, total - int(inactive)
