"""Causal multi-head self-attention of :class:`dsc_jax.GPT`, with a key/value cache.

Two implementations of the same function (``GPTConfig.attention``):

* ``"einsum"`` (default): scores, float32 softmax and dropout on the probabilities written
  out (the paper's recipe drops attention probabilities, which fused kernels do not support).
* ``"xla"`` / ``"cudnn"``: :func:`jax.nn.dot_product_attention` with that ``implementation``
  (``"cudnn"``: the fused flash-attention kernel on NVIDIA GPUs, bfloat16/float16 only). They
  need ``GPTConfig.attention_dropout=False`` (or ``dropout_rate=0``); the residual dropout is
  unchanged. Without a cache the causal structure is passed as ``is_causal=True`` (no mask
  array); decoding through the cache passes the ``[T, max_seq_len]`` mask.

The module reads only its own fields (no model config), so :mod:`dsc_jax.models.gpt` imports
it and not the other way round.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax import paper
from dsc_jax.layers.common import normal

#: ``GPTConfig.attention`` choices.
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def causal_mask(query_len: int, key_len: int, offset: int = 0) -> jax.Array:
    """``[query_len, key_len]`` bool, True where query ``i`` (at position ``offset + i``) may
    attend key ``j``. ``offset`` is the number of cached positions before the queries."""
    query_pos = offset + jnp.arange(query_len)[:, None]
    return jnp.arange(key_len)[None, :] <= query_pos


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention without biases: ``x [B, T, d] -> [B, T, d]``.

    Attributes:
      num_heads: heads (``d`` must be a multiple; ``head_dim = d // num_heads``).
      max_seq_len: length of the key/value cache (``decode=True``).
      dropout_rate: dropout on the output (residual dropout) and, with
        ``attention_dropout``, on the attention probabilities.
      attention_dropout: drop out the probabilities (``"einsum"`` only).
      implementation: ``"einsum"``, ``"xla"`` or ``"cudnn"`` (see the module docstring).
      out_init_std: std of the output projection (a GPT passes ``0.02 / sqrt(2 L)``).
      dtype: compute dtype (scores and softmax in float32); output dtype.
      param_dtype: parameter dtype.

    Parameters: ``query/key/value/kernel [d, heads, kv]`` (``("embed", "heads", "kv")``,
    normal(0.02)) and ``out/kernel [heads, kv, d]`` (``("heads", "kv", "embed")``,
    normal(``out_init_std``)).

    With ``decode=True`` the keys and values are written into a fixed-size cache (collection
    ``"cache"``: ``cached_key``, ``cached_value`` ``[B, max_seq_len, heads, kv]`` in
    ``dtype`` and ``cache_index`` int32, the number of positions already written) and the
    queries attend every cached position up to their own; apply with ``mutable=["cache"]``.
    """

    num_heads: int
    max_seq_len: int
    dropout_rate: float = 0.0
    attention_dropout: bool = True
    implementation: str = "einsum"
    out_init_std: float = paper.INIT_STD
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _projection(self, head_dim: int, name: str) -> nn.DenseGeneral:
        return nn.DenseGeneral(
            features=(self.num_heads, head_dim),
            axis=-1,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
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
          query: ``[B, Tq, heads, kv]``; key, value: ``[B, Tk, heads, kv]`` (``dtype``).
          mask: bool, broadcastable to ``[B, heads, Tq, Tk]``; False entries are excluded.
            ``None``: causal with ``Tq == Tk``.
          deterministic: disables the dropout on the probabilities when True.

        Returns:
          ``[B, Tq, heads, kv]`` in ``dtype``.
        """
        head_dim = query.shape[-1]
        if self.implementation != "einsum":
            return jax.nn.dot_product_attention(
                query,
                key,
                value,
                mask=None if mask is None else mask[None, None],
                scale=head_dim**-0.5,
                is_causal=mask is None,
                implementation=self.implementation,
            ).astype(self.dtype)
        if mask is None:
            mask = causal_mask(query.shape[1], key.shape[1])
        query = query * jnp.asarray(head_dim**-0.5, self.dtype)
        scores = jnp.einsum("bqhk,bthk->bhqt", query, key, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        rate = self.dropout_rate if self.attention_dropout else 0.0
        probs = nn.Dropout(rate, name="attn_dropout")(probs, deterministic=deterministic)
        return jnp.einsum("bhqt,bthk->bqhk", probs.astype(self.dtype), value)

    def _cached(self, key: jax.Array, value: jax.Array) -> tuple[jax.Array, ...]:
        """Write ``key/value [B, T, heads, kv]`` at the cache index; return the whole cache
        ``[B, max_seq_len, heads, kv]`` and the ``[T, max_seq_len]`` mask of the queries."""
        shape = (key.shape[0], self.max_seq_len, *key.shape[2:])
        keys = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        values = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        start = index.value
        keys.value = jax.lax.dynamic_update_slice(keys.value, key, (0, start, 0, 0))
        values.value = jax.lax.dynamic_update_slice(values.value, value, (0, start, 0, 0))
        index.value = start + key.shape[1]
        return keys.value, values.value, causal_mask(key.shape[1], self.max_seq_len, start)

    @nn.compact
    def __call__(
        self, x: jax.Array, *, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        """``x: [B, T, d]`` in ``dtype`` -> ``[B, T, d]`` in ``dtype``; ``decode``: attend
        through the key/value cache (see the class docstring)."""
        d_model = x.shape[-1]
        head_dim = d_model // self.num_heads
        query = self._projection(head_dim, "query")(x)
        key = self._projection(head_dim, "key")(x)
        value = self._projection(head_dim, "value")(x)
        mask = None
        if decode:
            key, value, mask = self._cached(key, value)
        out = self.attend(query, key, value, mask, deterministic)
        out = nn.DenseGeneral(
            features=d_model,
            axis=(-2, -1),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal(self.out_init_std, ("heads", "kv", "embed")),
            name="out",
        )(out)
        out = nn.Dropout(self.dropout_rate, name="resid_dropout")(out, deterministic=deterministic)
        return out.astype(self.dtype)
