"""Causal multi-head self-attention of :class:`dsc_jax.GPT`, with a key/value cache.

Two implementations of the same function (``GPTConfig.attention``):

* ``"einsum"`` (default): scores, float32 softmax and dropout on the probabilities written
  out (the paper's recipe drops attention probabilities, which fused kernels do not support).
* ``"xla"`` / ``"cudnn"``: :func:`jax.nn.dot_product_attention` with that ``implementation``
  (``"cudnn"``: the fused flash-attention kernel on NVIDIA GPUs, bfloat16/float16 only). They
  need ``GPTConfig.attention_dropout=False`` (or ``dropout_rate=0``); the residual dropout is
  unchanged. Without a cache the causal structure is passed as ``is_causal=True`` (no mask
  array); decoding through the cache passes the ``[T, max_seq_len]`` mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax import paper
from dsc_jax.layers.common import normal

if TYPE_CHECKING:
    from dsc_jax.models.gpt import GPTConfig

#: ``GPTConfig.attention`` choices.
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def causal_mask(query_len: int, key_len: int, offset: int = 0) -> jax.Array:
    """``[query_len, key_len]`` bool, True where query ``i`` (at position ``offset + i``) may
    attend key ``j``. ``offset`` is the number of cached positions before the queries."""
    query_pos = offset + jnp.arange(query_len)[:, None]
    return jnp.arange(key_len)[None, :] <= query_pos


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention without biases.

    Parameters: ``query/key/value/kernel [d, heads, kv]`` (``("embed", "heads", "kv")``,
    normal(0.02)) and ``out/kernel [heads, kv, d]`` (``("heads", "kv", "embed")``,
    normal(``cfg.residual_init_std``)). Dropout on the attention probabilities (``einsum``
    with ``cfg.attention_dropout``) and on the output (residual dropout).

    With ``decode=True`` the keys and values are written into a fixed-size cache (collection
    ``"cache"``: ``cached_key``, ``cached_value`` ``[B, max_seq_len, heads, kv]`` in
    ``cfg.dtype`` and ``cache_index`` int32, the number of positions already written) and
    the queries attend every cached position up to their own; apply with
    ``mutable=["cache"]``.
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
            kernel_init=normal(paper.INIT_STD, ("embed", "heads", "kv")),
            name=name,
        )

    def attend(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array | None,
        deterministic: bool,
    ) -> jax.Array:
        """Masked softmax attention.

        Args:
          query: ``[B, Tq, heads, kv]``; key, value: ``[B, Tk, heads, kv]`` (``cfg.dtype``).
          mask: bool, broadcastable to ``[B, heads, Tq, Tk]``; False entries are excluded.
            ``None``: causal with ``Tq == Tk``.
          deterministic: disables the dropout on the probabilities when True.

        Returns:
          ``[B, Tq, heads, kv]`` in ``cfg.dtype``.
        """
        cfg = self.cfg
        if cfg.attention != "einsum":
            return jax.nn.dot_product_attention(
                query,
                key,
                value,
                mask=None if mask is None else mask[None, None],
                scale=cfg.head_dim**-0.5,
                is_causal=mask is None,
                implementation=cfg.attention,
            ).astype(cfg.compute_dtype)
        if mask is None:
            mask = causal_mask(query.shape[1], key.shape[1])
        dtype = cfg.compute_dtype
        query = query * jnp.asarray(cfg.head_dim**-0.5, dtype)
        scores = jnp.einsum("bqhk,bthk->bhqt", query, key, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        rate = cfg.dropout_rate if cfg.attention_dropout else 0.0
        probs = nn.Dropout(rate, name="attn_dropout")(probs, deterministic=deterministic)
        return jnp.einsum("bhqt,bthk->bqhk", probs.astype(dtype), value)

    def _cached(self, key: jax.Array, value: jax.Array) -> tuple[jax.Array, ...]:
        """Write ``key/value [B, T, heads, kv]`` at the cache index; return the whole cache
        ``[B, max_seq_len, heads, kv]`` and the ``[T, max_seq_len]`` mask of the queries."""
        cfg = self.cfg
        shape = (key.shape[0], cfg.max_seq_len, cfg.num_heads, cfg.head_dim)
        keys = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        values = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        start = index.value
        keys.value = jax.lax.dynamic_update_slice(keys.value, key, (0, start, 0, 0))
        values.value = jax.lax.dynamic_update_slice(values.value, value, (0, start, 0, 0))
        index.value = start + key.shape[1]
        return keys.value, values.value, causal_mask(key.shape[1], cfg.max_seq_len, start)

    @nn.compact
    def __call__(
        self, x: jax.Array, *, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        """``x: [B, T, d]`` in ``cfg.dtype`` -> ``[B, T, d]`` in ``cfg.dtype``; ``decode``:
        attend through the key/value cache (see the class docstring)."""
        cfg = self.cfg
        query = self._projection("query")(x)
        key = self._projection("key")(x)
        value = self._projection("value")(x)
        mask = None
        if decode:
            key, value, mask = self._cached(key, value)
        out = self.attend(query, key, value, mask, deterministic)
        out = nn.DenseGeneral(
            features=cfg.d_model,
            axis=(-2, -1),
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            kernel_init=normal(cfg.residual_init_std, ("heads", "kv", "embed")),
            name="out",
        )(out)
        out = nn.Dropout(cfg.dropout_rate, name="resid_dropout")(out, deterministic=deterministic)
        return out.astype(cfg.compute_dtype)
