"""GPT language model with a swappable FFN (spec §7): dense, MoE, MoLoRA or DSC.

Layout (pre-LayerNorm, GPT-2 style)::

    x = wte(tokens) + wpe(positions)                       # residual stream, float32
    for each block:  x = x + attn(ln_1(x))                  # residual dropout inside attn
                     x = x + ffn(ln_2(x))                   # residual dropout inside the FFN
    logits = wte.attend(ln_f(x))                           # tied head, float32 [B, T, V]

Matmuls run in ``cfg.dtype``; LayerNorms, the attention softmax and the returned logits are
float32, and the residual stream is kept in float32 (like PyTorch autocast in the paper).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax._checks import (
    check_choice,
    check_positive_float,
    check_positive_int,
    check_probability,
)
from dsc_jax.dense import DenseFFN
from dsc_jax.dsc import COMPUTE_MODES, VARIANTS, DSCLayer
from dsc_jax.moe import DISPATCH_MODES, MoELayer
from dsc_jax.molora import MoLoRALayer

FFN_KINDS = ("dense", "moe", "molora", "dsc")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INIT_STD = 0.02
LAYER_NORM_EPS = 1e-5


def _normal(std: float, names: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Every hyper-parameter of :class:`GPT`; validated on construction.

    Defaults are the paper's DSC model (d=384, L=6, 6 heads, T=256, V=50304, M=1523, K=4,
    H=327). The per-kind fields default to the paper's iso-parameter baselines (dense H=2611;
    MoE E=5, k=2, H=545) and to :func:`dsc_jax.solver.solve_iso_active`'s MoLoRA solution at
    the same budgets (E=16, k=2, r=108, H=868). Only the fields of ``ffn`` are used.
    """

    vocab_size: int = 50304
    max_seq_len: int = 256
    num_layers: int = 6
    num_heads: int = 6
    d_model: int = 384
    dropout_rate: float = 0.1
    ffn: str = "dsc"
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    # dense
    dense_hidden: int = 2611
    # moe
    moe_num_experts: int = 5
    moe_top_k: int = 2
    moe_hidden: int = 545
    moe_dispatch: str = "dropless"
    moe_capacity_factor: float = 1.25
    moe_jitter_std: float = 0.01
    # molora
    molora_num_experts: int = 16
    molora_rank: int = 108
    molora_top_k: int = 2
    molora_static_dim: int = 868
    # dsc
    dsc_num_bases: int = 1523
    dsc_top_k: int = 4
    dsc_static_dim: int = 327
    dsc_variant: str = "refined"
    dsc_compute: str = "auto"
    dsc_tau: float = 20.0
    dsc_eps: float = 1e-6
    dsc_gamma_init: float = 0.1
    dsc_budget_target: float = 1.0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("vocab_size", "max_seq_len", "num_layers", "num_heads", "d_model"):
            check_positive_int(owner, name, getattr(self, name))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"{owner}.d_model={self.d_model!r} is invalid; expected a multiple of "
                f"num_heads={self.num_heads!r}."
            )
        check_probability(owner, "dropout_rate", self.dropout_rate)
        check_choice(owner, "ffn", self.ffn, FFN_KINDS)
        check_choice(owner, "tie_embeddings", self.tie_embeddings, (True, False))
        check_choice(owner, "dtype", self.dtype, tuple(DTYPES))
        check_choice(owner, "param_dtype", self.param_dtype, tuple(DTYPES))
        for name in (
            "dense_hidden",
            "moe_num_experts",
            "moe_hidden",
            "molora_num_experts",
            "molora_rank",
            "molora_static_dim",
            "dsc_num_bases",
            "dsc_static_dim",
        ):
            check_positive_int(owner, name, getattr(self, name))
        for top_k, pool in (
            ("moe_top_k", "moe_num_experts"),
            ("molora_top_k", "molora_num_experts"),
            ("dsc_top_k", "dsc_num_bases"),
        ):
            check_positive_int(owner, top_k, getattr(self, top_k))
            if getattr(self, top_k) > getattr(self, pool):
                raise ValueError(
                    f"{owner}.{top_k}={getattr(self, top_k)!r} is invalid; expected an integer "
                    f"in [1, {pool}={getattr(self, pool)!r}]."
                )
        check_choice(owner, "moe_dispatch", self.moe_dispatch, DISPATCH_MODES)
        check_positive_float(owner, "moe_capacity_factor", self.moe_capacity_factor)
        check_positive_float(owner, "moe_jitter_std", self.moe_jitter_std, allow_zero=True)
        check_choice(owner, "dsc_variant", self.dsc_variant, VARIANTS)
        check_choice(owner, "dsc_compute", self.dsc_compute, COMPUTE_MODES)
        for name in ("dsc_tau", "dsc_eps"):
            check_positive_float(owner, name, getattr(self, name))
        check_positive_float(owner, "dsc_gamma_init", self.dsc_gamma_init, allow_zero=True)
        check_positive_float(owner, "dsc_budget_target", self.dsc_budget_target, allow_zero=True)

    @property
    def compute_dtype(self) -> Any:
        """``dtype`` as a jnp dtype."""
        return DTYPES[self.dtype]

    @property
    def params_dtype(self) -> Any:
        """``param_dtype`` as a jnp dtype."""
        return DTYPES[self.param_dtype]

    @property
    def head_dim(self) -> int:
        """``d_model // num_heads``."""
        return self.d_model // self.num_heads

    @property
    def residual_init_std(self) -> float:
        """Std of residual output projections, ``0.02 / sqrt(2 L)``."""
        return INIT_STD / math.sqrt(2 * self.num_layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GPTConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"GPTConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}."
            )
        return cls(**dict(values))


def make_ffn(cfg: GPTConfig, name: str = "ffn") -> nn.Module:
    """The FFN layer of kind ``cfg.ffn``; it applies the residual dropout to its output."""
    common = dict(
        dropout_rate=cfg.dropout_rate,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        name=name,
    )
    if cfg.ffn == "dense":
        return DenseFFN(cfg.dense_hidden, out_init_std=cfg.residual_init_std, **common)
    if cfg.ffn == "moe":
        return MoELayer(
            num_experts=cfg.moe_num_experts,
            top_k=cfg.moe_top_k,
            expert_dim=cfg.moe_hidden,
            dispatch=cfg.moe_dispatch,
            capacity_factor=cfg.moe_capacity_factor,
            jitter_std=cfg.moe_jitter_std,
            out_init_std=cfg.residual_init_std,
            **common,
        )
    if cfg.ffn == "molora":
        return MoLoRALayer(
            num_experts=cfg.molora_num_experts,
            rank=cfg.molora_rank,
            top_k=cfg.molora_top_k,
            static_dim=cfg.molora_static_dim,
            out_init_std=cfg.residual_init_std,
            **common,
        )
    return DSCLayer(
        num_bases=cfg.dsc_num_bases,
        top_k=cfg.dsc_top_k,
        static_dim=cfg.dsc_static_dim,
        variant=cfg.dsc_variant,
        tau=cfg.dsc_tau,
        eps=cfg.dsc_eps,
        gamma_init=cfg.dsc_gamma_init,
        budget_target=cfg.dsc_budget_target,
        compute=cfg.dsc_compute,
        **common,
    )


def causal_mask(query_len: int, key_len: int, offset: int = 0) -> jax.Array:
    """``[query_len, key_len]`` bool, True where query ``i`` (at position ``offset + i``) may
    attend key ``j``. ``offset`` is the number of cached positions before the queries."""
    query_pos = offset + jnp.arange(query_len)[:, None]
    return jnp.arange(key_len)[None, :] <= query_pos


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        dtype=jnp.float32,
        param_dtype=cfg.params_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention without biases.

    Parameters: ``query/key/value/kernel [d, heads, kv]`` (``("embed", "heads", "kv")``,
    normal(0.02)) and ``out/kernel [heads, kv, d]`` (``("heads", "kv", "embed")``,
    normal(``cfg.residual_init_std``)). Dropout on the attention probabilities and on the
    output (residual dropout). A KV cache can be added by concatenating cached keys/values in
    :meth:`__call__` and passing ``causal_mask(T, T_cache + T, offset=T_cache)`` to
    :meth:`attend`.
    """

    cfg: GPTConfig

    def _projection(self, name: str) -> nn.DenseGeneral:
        cfg = self.cfg
        return nn.DenseGeneral(
            features=(cfg.num_heads, cfg.head_dim),
            axis=-1,
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            kernel_init=_normal(INIT_STD, ("embed", "heads", "kv")),
            name=name,
        )

    def attend(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array,
        deterministic: bool,
    ) -> jax.Array:
        """Masked softmax attention.

        Args:
          query: ``[B, Tq, heads, kv]``; key, value: ``[B, Tk, heads, kv]`` (``cfg.dtype``).
          mask: bool, broadcastable to ``[B, heads, Tq, Tk]``; False entries are excluded.
          deterministic: disables the dropout on the probabilities when True.

        Returns:
          ``[B, Tq, heads, kv]`` in ``cfg.dtype``.
        """
        dtype = self.cfg.compute_dtype
        query = query * jnp.asarray(self.cfg.head_dim**-0.5, dtype)
        scores = jnp.einsum("bqhk,bthk->bhqt", query, key, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        probs = nn.Dropout(self.cfg.dropout_rate, name="attn_dropout")(
            probs, deterministic=deterministic
        )
        return jnp.einsum("bhqt,bthk->bqhk", probs.astype(dtype), value)

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """``x: [B, T, d]`` in ``cfg.dtype`` -> ``[B, T, d]`` in ``cfg.dtype``."""
        cfg = self.cfg
        query = self._projection("query")(x)
        key = self._projection("key")(x)
        value = self._projection("value")(x)
        seq_len = x.shape[-2]
        out = self.attend(query, key, value, causal_mask(seq_len, seq_len), deterministic)
        out = nn.DenseGeneral(
            features=cfg.d_model,
            axis=(-2, -1),
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            kernel_init=_normal(cfg.residual_init_std, ("heads", "kv", "embed")),
            name="out",
        )(out)
        out = nn.Dropout(cfg.dropout_rate, name="resid_dropout")(out, deterministic=deterministic)
        return out.astype(cfg.compute_dtype)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + ffn(ln_2(x))``."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """``x: [B, T, d]`` float32 residual stream -> same shape and dtype."""
        cfg = self.cfg
        h = _layer_norm(cfg, "ln_1")(x).astype(cfg.compute_dtype)
        x = x + CausalSelfAttention(cfg, name="attn")(h, deterministic=deterministic).astype(
            jnp.float32
        )
        h = _layer_norm(cfg, "ln_2")(x).astype(cfg.compute_dtype)
        h = make_ffn(cfg)(h, deterministic=deterministic)
        return x + h.astype(jnp.float32)


class GPT(nn.Module):
    """Decoder-only transformer (spec §7).

    Parameter tree: ``wte/embedding [V, d]`` (``vocab, embed``), ``wpe/embedding [T_max, d]``
    (``position, embed``), ``block_{i}/{ln_1, attn, ln_2, ffn}``, ``ln_f/{scale, bias}`` and,
    only when ``tie_embeddings=False``, ``lm_head/kernel [d, V]`` (``embed, vocab``).
    """

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: ``[B, T]`` integer token ids, ``T <= cfg.max_seq_len``.
          deterministic: ``False`` enables dropout (and MoE jitter); needs a ``"dropout"`` rng.

        Returns:
          ``[B, T, V]`` float32 logits.
        """
        cfg = self.cfg
        dtype = getattr(tokens, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(
                f"GPT: tokens dtype {dtype} is not allowed; expected an integer array."
            )
        if tokens.ndim != 2:
            raise ValueError(
                f"GPT: tokens shape {tuple(tokens.shape)} is invalid; expected [B, T]."
            )
        seq_len = tokens.shape[1]
        if seq_len > cfg.max_seq_len:
            raise ValueError(
                f"GPT: sequence length {seq_len} exceeds GPTConfig.max_seq_len={cfg.max_seq_len}."
            )
        wte = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            embedding_init=_normal(INIT_STD, ("vocab", "embed")),
            name="wte",
        )
        wpe = nn.Embed(
            cfg.max_seq_len,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            embedding_init=_normal(INIT_STD, ("position", "embed")),
            name="wpe",
        )
        x = wte(tokens).astype(jnp.float32) + wpe(jnp.arange(seq_len)).astype(jnp.float32)
        x = nn.Dropout(cfg.dropout_rate, name="embed_dropout")(x, deterministic=deterministic)
        for i in range(cfg.num_layers):
            x = Block(cfg, name=f"block_{i}")(x, deterministic=deterministic)
        h = _layer_norm(cfg, "ln_f")(x).astype(cfg.compute_dtype)
        if cfg.tie_embeddings:
            logits = wte.attend(h)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                kernel_init=_normal(INIT_STD, ("embed", "vocab")),
                name="lm_head",
            )(h)
        return logits.astype(jnp.float32)
