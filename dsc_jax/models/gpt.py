"""GPT language model with a swappable FFN (the paper's Table 2 model): dense, MoE, MoLoRA or DSC.

Layout (pre-LayerNorm, GPT-2 style)::

    x = wte(tokens) + wpe(positions)                       # residual stream, float32
    for each block:  x = x + attn(ln_1(x))                  # residual dropout inside attn
                     x = x + ffn(ln_2(x))                   # residual dropout inside the FFN
    logits = wte.attend(ln_f(x))                           # tied head, float32 [B, T, V]

Matmuls run in ``cfg.dtype``; LayerNorms, the attention softmax and the returned logits are
float32, and the residual stream is kept in float32 (like PyTorch autocast in the paper).

(A little over 400 lines: the config with its validation, the block, the scan/remat policies
and the KV-cache decode path are one model and are read together.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax import paper
from dsc_jax._checks import (
    check_choice,
    check_positive_int,
    check_probability,
)
from dsc_jax.layers import common, remat_names
from dsc_jax.layers.common import normal
from dsc_jax.layers.configs import FFN_KINDS, DSCConfig, FFNConfig, ffn_config
from dsc_jax.models.attention import ATTENTION_IMPLEMENTATIONS, CausalSelfAttention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")
#: Prefix of a named-remat policy: ``"save:NAME[,NAME...]"`` with names from
#: :data:`dsc_jax.layers.remat_names.ALL_NAMES`.
REMAT_SAVE_PREFIX = "save:"


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Every hyper-parameter of :class:`GPT`; validated on construction.

    Defaults are the paper's DSC model (d=384, L=6, 6 heads, T=256, V=50304; ``ffn`` =
    ``DSCConfig()``: M=1523, K=4, H=327). The FFN is one per-kind config
    (:class:`dsc_jax.DSCConfig`, :class:`dsc_jax.MoEConfig`, :class:`dsc_jax.MoLoRAConfig`,
    :class:`dsc_jax.DenseConfig`), e.g. ``GPTConfig(ffn=MoEConfig(num_experts=8))``.

    Attributes:
      vocab_size, max_seq_len, num_layers, num_heads, d_model: the transformer.
      dropout_rate: attention-probability and residual dropout (the paper: 0.1).
      attention: ``"einsum"`` (written out; supports the dropout on probabilities),
        ``"xla"`` or ``"cudnn"`` (:func:`jax.nn.dot_product_attention`; ``"cudnn"`` is the
        fused kernel on NVIDIA GPUs with bfloat16/float16). See
        :mod:`dsc_jax.models.attention`.
      attention_dropout: apply ``dropout_rate`` to the attention probabilities (the paper's
        recipe); must be False (or ``dropout_rate`` 0) with ``attention`` ``"xla"`` or
        ``"cudnn"``.
      embed_dropout: also drop out the embeddings (neither the paper nor its reference
        code does; off by default).
      ffn: the FFN of every block.
      tie_embeddings: the head reuses the token embedding (the paper's recipe).
      dtype: compute dtype name (``float32``, ``bfloat16``, ``float16``).
      param_dtype: parameter dtype name (same choices).
      scan_layers: run the blocks with ``nn.scan`` (one compiled block; parameters stacked
        on a leading ``layers`` axis under ``blocks/``).
      remat: rematerialise each block in the backward pass: ``"none"``, ``"full"``
        (recompute everything), ``"dots"`` (keep matmul outputs, recompute the rest) or
        ``"save:NAME[,NAME...]"`` (keep only the named tensors of the routed layers, e.g.
        ``"save:dsc_router_logits,dsc_latents"``; names from
        :data:`dsc_jax.layers.remat_names.ALL_NAMES`, see :func:`remat_policy`).
    """

    vocab_size: int = paper.VOCAB_SIZE
    max_seq_len: int = paper.SEQ_LEN
    num_layers: int = paper.NUM_LAYERS
    num_heads: int = paper.NUM_HEADS
    d_model: int = paper.D_MODEL
    dropout_rate: float = paper.DROPOUT_RATE
    embed_dropout: bool = False
    attention: str = "einsum"
    attention_dropout: bool = True
    ffn: FFNConfig = dataclasses.field(default_factory=DSCConfig)
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"

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
        if getattr(self.ffn, "kind", None) not in FFN_KINDS:
            raise ValueError(
                f"{owner}.ffn={self.ffn!r} is invalid; expected a DenseConfig, MoEConfig, "
                "MoLoRAConfig or DSCConfig."
            )
        for name in ("embed_dropout", "attention_dropout", "tie_embeddings", "scan_layers"):
            check_choice(owner, name, getattr(self, name), (True, False))
        check_choice(owner, "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        if self.attention != "einsum" and self.attention_dropout and self.dropout_rate > 0:
            raise ValueError(
                f"{owner}.attention={self.attention!r} is invalid with attention_dropout=True "
                f"and dropout_rate={self.dropout_rate!r}: jax.nn.dot_product_attention has no "
                "dropout on the probabilities; set attention_dropout=False (residual dropout "
                "stays) or use attention='einsum'."
            )
        check_choice(owner, "dtype", self.dtype, tuple(DTYPES))
        check_choice(owner, "param_dtype", self.param_dtype, tuple(DTYPES))
        remat_policy(self.remat, owner)  # validates

    @property
    def ffn_kind(self) -> str:
        """``"dense"``, ``"moe"``, ``"molora"`` or ``"dsc"``."""
        return self.ffn.kind

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
        return paper.INIT_STD / math.sqrt(2 * self.num_layers)

    def replace(self, **changes: Any) -> GPTConfig:
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; ``ffn`` becomes ``{"kind": ..., **fields}``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["ffn"] = {"kind": self.ffn.kind, **self.ffn.to_dict()}
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GPTConfig:
        """Inverse of :meth:`to_dict` (``ffn`` may also be a config object); unknown keys
        raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"GPTConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}."
            )
        values = dict(values)
        ffn = values.get("ffn")
        if isinstance(ffn, Mapping):
            fields = dict(ffn)
            values["ffn"] = ffn_config(fields.pop("kind", None), fields)
        return cls(**values)


def make_ffn(cfg: GPTConfig, name: str = "ffn") -> nn.Module:
    """The FFN layer of ``cfg.ffn``; it applies the residual dropout to its output."""
    return cfg.ffn.make(
        dropout_rate=cfg.dropout_rate,
        out_init_std=cfg.residual_init_std,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        name=name,
    )


def layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    """The model's LayerNorms ``ln_1``, ``ln_2``, ``ln_f``: :func:`dsc_jax.layers.common.layer_norm`
    (float32, exact variance, eps 1e-5) with ``cfg``'s parameter dtype."""
    return common.layer_norm(cfg.params_dtype, name)


def attention(cfg: GPTConfig, name: str = "attn") -> CausalSelfAttention:
    """The causal self-attention of every block, configured from ``cfg``."""
    return CausalSelfAttention(
        num_heads=cfg.num_heads,
        max_seq_len=cfg.max_seq_len,
        dropout_rate=cfg.dropout_rate,
        attention_dropout=cfg.attention_dropout,
        implementation=cfg.attention,
        out_init_std=cfg.residual_init_std,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        name=name,
    )


def token_embedding(cfg: GPTConfig, name: str = "wte") -> nn.Embed:
    """``wte``: ``embedding [V, d]`` (``vocab, embed``, normal(0.02)); also the tied head
    (``attend``)."""
    return nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        embedding_init=normal(paper.INIT_STD, ("vocab", "embed")),
        name=name,
    )


def embed(
    cfg: GPTConfig, tokens: jax.Array, positions: jax.Array, deterministic: bool
) -> tuple[jax.Array, nn.Embed]:
    """The residual stream's start ``wte(tokens) + wpe(positions)`` in float32
    (``tokens [B, T]`` int, ``positions [T]``) -> ``([B, T, d], wte)``; embedding dropout with
    ``cfg.embed_dropout``. Creates ``wte`` and ``wpe/embedding [T_max, d]`` (``position,
    embed``); call inside a parent's ``@nn.compact`` method."""
    wte = token_embedding(cfg)
    wpe = nn.Embed(
        cfg.max_seq_len,
        cfg.d_model,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        embedding_init=normal(paper.INIT_STD, ("position", "embed")),
        name="wpe",
    )
    x = wte(tokens).astype(jnp.float32) + wpe(positions).astype(jnp.float32)
    if cfg.embed_dropout:
        x = nn.Dropout(cfg.dropout_rate, name="embed_dropout")(x, deterministic=deterministic)
    return x, wte


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + ffn(ln_2(x))``."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, decode: bool = False) -> jax.Array:
        """``x: [B, T, d]`` float32 residual stream -> same shape and dtype."""
        cfg = self.cfg
        h = layer_norm(cfg, "ln_1")(x).astype(cfg.compute_dtype)
        x = x + attention(cfg)(h, deterministic=deterministic, decode=decode).astype(jnp.float32)
        h = layer_norm(cfg, "ln_2")(x).astype(cfg.compute_dtype)
        h = make_ffn(cfg)(h, deterministic)
        return x + h.astype(jnp.float32)


class _ScannedBlock(Block):
    """:class:`Block` with the ``(carry, xs) -> (carry, ys)`` signature ``nn.scan`` needs."""

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, decode: bool = False
    ) -> tuple[jax.Array, None]:
        return super().__call__(x, deterministic, decode), None


def remat_policy(name: str, owner: str = "GPTConfig") -> Any:
    """The ``jax.checkpoint`` policy of ``GPTConfig.remat`` (``None`` saves nothing):
    ``"save:NAME[,NAME...]"`` is ``jax.checkpoint_policies.save_only_these_names`` over
    :data:`dsc_jax.layers.remat_names.ALL_NAMES`.

    Raises:
      ValueError: ``name`` is neither one of :data:`REMAT_POLICIES` nor a ``"save:"``
        policy of known, non-empty names (naming the allowed values).
    """
    if isinstance(name, str) and name.startswith(REMAT_SAVE_PREFIX):
        names = tuple(n.strip() for n in name.removeprefix(REMAT_SAVE_PREFIX).split(","))
        unknown = [n for n in names if n not in remat_names.ALL_NAMES]
        if unknown or not names:
            raise ValueError(
                f"{owner}.remat={name!r} is invalid: {unknown} are not tensor names; expected "
                f"'{REMAT_SAVE_PREFIX}' and a comma-separated subset of {remat_names.ALL_NAMES}."
            )
        return jax.checkpoint_policies.save_only_these_names(*names)
    if name not in REMAT_POLICIES:
        raise ValueError(
            f"{owner}.remat={name!r} is invalid; expected one of {REMAT_POLICIES}. Or a named "
            f"policy '{REMAT_SAVE_PREFIX}NAME[,NAME...]' with names from {remat_names.ALL_NAMES}."
        )
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def apply_blocks(
    cfg: GPTConfig, x: jax.Array, deterministic: bool, decode: bool = False
) -> jax.Array:
    """Run the ``cfg.num_layers`` blocks on ``x: [B, T, d]``, unrolled (``block_{i}``) or with
    ``nn.scan`` (``blocks``, parameters and caches stacked on a leading ``layers`` axis), each
    optionally under ``nn.remat``. Call inside a parent's ``@nn.compact`` method."""
    block_cls: Any = _ScannedBlock if cfg.scan_layers else Block
    if cfg.remat != "none":
        block_cls = nn.remat(
            block_cls,
            static_argnums=(2, 3),
            policy=remat_policy(cfg.remat),
            prevent_cse=not cfg.scan_layers,
        )
    if not cfg.scan_layers:
        for i in range(cfg.num_layers):
            x = block_cls(cfg, name=f"block_{i}")(x, deterministic, decode)
        return x
    scanned = nn.scan(
        block_cls,
        variable_axes={"params": 0, "losses": 0, "intermediates": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(cfg, name="blocks")(x, deterministic, decode)
    return x


class GPT(nn.Module):
    """Decoder-only transformer (the paper's Table 2 model).

    Parameter tree: ``wte/embedding [V, d]`` (``vocab, embed``), ``wpe/embedding [T_max, d]``
    (``position, embed``), ``block_{i}/{ln_1, attn, ln_2, ffn}`` (with ``scan_layers``:
    ``blocks/{...}`` stacked on a leading ``layers`` axis), ``ln_f/{scale, bias}`` and,
    only when ``tie_embeddings=False``, ``lm_head/kernel [d, V]`` (``embed, vocab``).

    Example::

        cfg = GPTConfig(vocab_size=256, max_seq_len=64, num_layers=2, num_heads=4, d_model=64)
        model = GPT(cfg)
        params = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"]
        logits = model.apply({"params": params}, tokens)          # [B, T] -> [B, T, 256]

    Incremental decoding (key/value cache, see :func:`init_cache`)::

        cache = init_cache(cfg, batch_size=B)
        logits, v = model.apply({"params": params, "cache": cache}, prompt, decode=True,
                                mutable=["cache"])                 # prefill [B, P]
        logits, v = model.apply({"params": params, "cache": v["cache"]}, next_token,
                                decode=True, mutable=["cache"])    # one step [B, 1]
    """

    cfg: GPTConfig

    @nn.compact
    def __call__(
        self, tokens: jax.Array, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: ``[B, T]`` integer token ids, ``T <= cfg.max_seq_len``.
          deterministic: ``False`` enables dropout (and MoE jitter); needs a ``"dropout"`` rng.
          decode: continue the sequence held in the ``"cache"`` collection (apply with
            ``mutable=["cache"]``): ``tokens`` sit at positions ``cache position + [0, T)``,
            attend every cached token and are appended to the cache. The caller keeps the
            total length ``<= cfg.max_seq_len`` (it is not checked inside ``jit``).

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
        positions = jnp.arange(seq_len)
        if decode:
            offset = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            positions = positions + offset.value
            offset.value = offset.value + seq_len
        x, wte = embed(cfg, tokens, positions, deterministic)
        x = apply_blocks(cfg, x, deterministic, decode)
        h = layer_norm(cfg, "ln_f")(x).astype(cfg.compute_dtype)
        if cfg.tie_embeddings:
            logits = wte.attend(h)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                kernel_init=normal(paper.INIT_STD, ("embed", "vocab")),
                name="lm_head",
            )(h)
        return logits.astype(jnp.float32)


def init_cache(cfg: GPTConfig, batch_size: int) -> Any:
    """An empty key/value cache of :class:`GPT` for ``batch_size`` sequences (the
    ``"cache"`` collection: per layer ``cached_key``/``cached_value`` ``[B, max_seq_len,
    heads, kv]`` zeros in ``cfg.dtype`` and ``cache_index`` 0, plus the model's ``position``
    0; with ``scan_layers`` stacked on a leading ``layers`` axis). Computes no parameters."""
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), tokens, decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
