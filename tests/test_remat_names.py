"""Named remat: the routed layers' tensors carry the names of
:mod:`dsc_jax.layers.remat_names`, and ``GPTConfig(remat="save:NAME,...")`` keeps exactly
those for the backward pass.

A renamed (or dropped) ``checkpoint_name`` fails :func:`test_every_name_is_in_the_traced_program`
and :func:`test_a_save_policy_keeps_the_named_tensor` instead of silently leaving a policy.
"""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from dsc_jax.layers import remat_names
from dsc_jax.layers.configs import DSCConfig, MoEConfig, MoLoRAConfig
from dsc_jax.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("fast_compiles")

#: The gather path: ``dsc_latents`` are its ``[N, K]`` projections (the dense path has none).
FFNS = {
    "dsc": DSCConfig(num_bases=64, top_k=4, hidden_dim=8, compute="gather"),
    "dsc_product_key": DSCConfig(
        num_bases=64, top_k=4, hidden_dim=8, router="product_key", compute="gather"
    ),
    "moe": MoEConfig(num_experts=4, top_k=2, hidden_dim=8),
    "molora": MoLoRAConfig(num_experts=4, rank=2, top_k=2, hidden_dim=8),
}
#: The model each name is checked on.
MODEL_OF = {
    name: kind for kind in ("moe", "molora", "dsc") for name in remat_names.NAMES_BY_KIND[kind]
}
TOKENS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 32


def model_and_loss(ffn, remat="none"):
    cfg = GPTConfig(
        vocab_size=32, max_seq_len=8, num_layers=1, num_heads=2, d_model=16, ffn=ffn,
        dropout_rate=0.0, remat=remat,
    )  # fmt: skip
    model = GPT(cfg)
    params = model.init(jax.random.key(0), TOKENS)["params"]

    def loss(params):
        logits = model.apply({"params": params}, TOKENS)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return params, loss


def saved_residuals(loss, params) -> str:
    """What ``jax.ad_checkpoint.print_saved_residuals`` prints: one residual per line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, params)
    return out.getvalue()


def test_names_are_unique_and_every_kind_lists_its_own():
    assert len(set(remat_names.ALL_NAMES)) == len(remat_names.ALL_NAMES)
    listed = [n for names in remat_names.NAMES_BY_KIND.values() for n in names]
    assert sorted(listed) == sorted(remat_names.ALL_NAMES)


@pytest.mark.parametrize(
    "model, dispatch",
    [("dsc", None), ("dsc_product_key", None), ("molora", None)]
    + [("moe", d) for d in ("dense", "dropless", "sorted", "capacity")],
)
def test_every_name_is_in_the_traced_program(model, dispatch):
    """The linearised program of a GPT with that FFN carries every name of its kind (each MoE
    dispatch names its expert activations)."""
    ffn = FFNS[model] if dispatch is None else FFNS[model].replace(dispatch=dispatch)
    params, loss = model_and_loss(ffn)
    program = str(jax.make_jaxpr(lambda p: jax.linearize(loss, p)[1](p))(params))
    for name in remat_names.NAMES_BY_KIND[ffn.kind]:
        assert f"name={name}" in program, name


@pytest.mark.parametrize("name", remat_names.ALL_NAMES)
def test_a_save_policy_keeps_the_named_tensor(name):
    """``remat="save:NAME"`` saves the tensor named NAME for the backward pass;
    ``remat="full"`` saves no named tensor (everything in the block is recomputed)."""
    ffn = FFNS[MODEL_OF[name]]
    params, loss = model_and_loss(ffn, remat=f"save:{name}")
    assert f"named '{name}'" in saved_residuals(loss, params)
    params, loss = model_and_loss(ffn, remat="full")
    assert "named '" not in saved_residuals(loss, params)


@pytest.mark.parametrize("model", list(FFNS))
def test_gradients_with_a_named_policy_equal_the_plain_model(model):
    ffn = FFNS[model]
    names = ",".join(remat_names.NAMES_BY_KIND[ffn.kind])
    params, plain = model_and_loss(ffn)
    _, named = model_and_loss(ffn, remat=f"save:{names}")
    want = jax.jit(jax.value_and_grad(plain))(params)
    got = jax.jit(jax.value_and_grad(named))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat", ["save:dsc_logits", "save:", "save:dsc_latents,", "partial"])
def test_bad_remat_policies_raise_naming_the_allowed_names(remat):
    with pytest.raises(ValueError, match=r"GPTConfig.remat=.*dsc_router_logits"):
        GPTConfig(remat=remat)
    assert GPTConfig(remat="save:dsc_latents, dsc_output").remat  # spaces after commas are ok
