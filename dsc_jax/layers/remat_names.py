"""Names of the routed layers' tensors for ``jax.checkpoint`` policies (named remat).

Each layer tags the tensors below with :func:`jax.ad_checkpoint.checkpoint_name`; a policy
built from the names (``jax.checkpoint_policies.save_only_these_names(...)``, or
``GPTConfig(remat="save:dsc_router_logits,dsc_latents")``) keeps exactly those tensors of a
rematerialised block for the backward pass and recomputes the rest. The names change no
value. ``tests/test_remat_names.py`` checks that every name in :data:`ALL_NAMES` is in the
traced program of a model with that layer, so a renamed tensor fails a test instead of
silently dropping out of a policy.
"""

from __future__ import annotations

#: DSC router logits: the flat router's ``[N, M]`` raw logits, or the product-key router's
#: two sub-key score tables ``[N, n₁]``, ``[N, n₂]`` (float32).
DSC_ROUTER_LOGITS = "dsc_router_logits"
#: DSC latents: the ``[N, K]`` float32 projections ``x·u_{i_nk}`` of the gather path (with
#: the gates ẑ they make ``c = (x U_Iᵀ) ⊙ ẑ``); the reverse pass reads them.
DSC_LATENTS = "dsc_latents"
#: DSC dynamic output ``((x U_Iᵀ) ⊙ ẑ) V_I`` ``[N, d]`` before ``⊙ γ`` (both compute paths).
DSC_OUTPUT = "dsc_output"
#: MoE router logits ``[N, E]`` (float32, before jitter).
MOE_ROUTER_LOGITS = "moe_router_logits"
#: MoE expert hidden activations ``GELU(x W_in)`` (every dispatch's layout).
MOE_EXPERT_HIDDEN = "moe_expert_hidden"
#: MoLoRA router logits ``[N, E]`` (float32, before jitter).
MOLORA_ROUTER_LOGITS = "molora_router_logits"
#: MoLoRA latents: the gated rank-r projections ``[N, E, r]``.
MOLORA_LATENTS = "molora_latents"

#: Every name, in the order above.
ALL_NAMES: tuple[str, ...] = (
    DSC_ROUTER_LOGITS,
    DSC_LATENTS,
    DSC_OUTPUT,
    MOE_ROUTER_LOGITS,
    MOE_EXPERT_HIDDEN,
    MOLORA_ROUTER_LOGITS,
    MOLORA_LATENTS,
)

#: The names each FFN kind's layer carries (``GPTConfig.ffn.kind`` -> names).
NAMES_BY_KIND: dict[str, tuple[str, ...]] = {
    "dense": (),
    "dsc": (DSC_ROUTER_LOGITS, DSC_LATENTS, DSC_OUTPUT),
    "moe": (MOE_ROUTER_LOGITS, MOE_EXPERT_HIDDEN),
    "molora": (MOLORA_ROUTER_LOGITS, MOLORA_LATENTS),
}
