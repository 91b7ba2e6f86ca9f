"""Autoregressive sampling from a :class:`dsc_jax.GPT` with a key/value cache.

The prompt is run once (prefill, ``[B, P]`` tokens into an empty cache from
:func:`dsc_jax.models.gpt.init_cache`), then one token per step: sample from the last
logits, feed the token alone (``[B, 1]``, ``decode=True``). The whole decode loop is one
compiled ``jax.lax.fori_loop`` writing into a fixed ``[B, max_seq_len]`` buffer, so it
compiles once per (model, batch size, sampling settings) whatever the number of tokens; the
prefill compiles once per prompt length. Works for every FFN kind and with ``scan_layers``.

    config, params, tokenizer = load_model("runs/default")
    texts, result = sample_text(config, params, tokenizer, "def ", max_new_tokens=100)

Randomness: token ``i`` of the continuation is drawn with ``fold_in(key(seed), i)``, so a
seed gives the same text every time (on the same backend). ``temperature=0`` is greedy.

Greedy decoding with the cache gives the tokens of recomputing the whole sequence each step
(tested per FFN kind), except for an MoE with ``dispatch="capacity"``: its expert capacity
depends on the number of tokens per call, so one-token steps may drop differently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsc_jax.data.tokenizers import Tokenizer
from dsc_jax.models.gpt import GPT, GPTConfig, init_cache

__all__ = ["Generation", "SamplingConfig", "generate", "sample_logits", "sample_text"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen; validated on construction.

    Attributes:
      max_new_tokens: tokens to generate after the prompt (>= 1); ``None``: as many as the
        model's context leaves after the prompt.
      temperature: logits are divided by it before sampling; ``0`` = greedy (argmax).
      top_k: sample among the ``top_k`` most likely tokens only (``0``: no limit).
      top_p: nucleus sampling: the smallest set of most likely tokens whose probability
        reaches ``top_p`` (``1.0``: no limit); ``0 < top_p <= 1``.

    ``top_k``/``top_p`` with ``temperature=0`` raise: greedy decoding would ignore them.
    """

    max_new_tokens: int | None = None
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"max_new_tokens={n!r} is invalid; expected an integer >= 1.")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(
                f"temperature={t!r} is invalid; expected a finite number >= 0 (0 = greedy)."
            )
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k={k!r} is invalid; expected an integer >= 0 (0 = off).")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r} is invalid; expected 0 < top_p <= 1 (1 = off).")
        if t == 0 and (k != 0 or p != 1):  # greedy: the filters would be ignored
            given = f"top_k={k!r}" if k != 0 else f"top_p={p!r}"
            raise ValueError(
                f"{given} has no effect with temperature=0 (greedy: the most likely token); "
                "set temperature > 0 to sample, or drop it."
            )


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated token ids and timings.

    Attributes:
      tokens: ``[B, P + N]`` int32 numpy array: the prompt then ``N`` new tokens per row.
      prompt_len: ``P``.
      compile_s: seconds spent compiling (prefill and decode loop; ~0 when cached).
      prefill_s: seconds of the prompt pass.
      decode_s: seconds of the decode loop (``N`` steps for ``B`` rows).
    """

    tokens: np.ndarray
    prompt_len: int
    compile_s: float
    prefill_s: float
    decode_s: float

    @property
    def new_tokens(self) -> np.ndarray:
        """``[B, N]`` the generated continuation."""
        return self.tokens[:, self.prompt_len :]

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of decode loop."""
        return self.new_tokens.size / max(self.decode_s, 1e-9)


def sample_logits(
    logits: jax.Array, rng: jax.Array, sampling: SamplingConfig, vocab_limit: int | None = None
) -> jax.Array:
    """One token per row from ``logits [B, V]`` (float32) -> ``[B]`` int32.

    Ids ``>= vocab_limit`` (a tokeniser's padding ids) are never drawn. Then greedy when
    ``temperature == 0``, else temperature, top-k and top-p filtering and a categorical draw.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if vocab_limit is not None and vocab_limit < vocab:
        logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prefill(params: Any, cache: Any, prompt: jax.Array, *, cfg: GPTConfig) -> tuple[Any, Any]:
    logits, variables = GPT(cfg).apply(
        {"params": params, "cache": cache}, prompt, decode=True, mutable=["cache"]
    )
    return logits[:, -1], variables["cache"]


def _decode(
    params: Any,
    cache: Any,
    logits: jax.Array,
    buffer: jax.Array,
    start: jax.Array,
    num_new: jax.Array,
    rng: jax.Array,
    *,
    cfg: GPTConfig,
    sampling: SamplingConfig,
    vocab_limit: int | None,
) -> jax.Array:
    """``num_new`` steps of sample-then-feed; ``buffer [B, max_seq_len]`` gets the tokens at
    positions ``start + i``. ``start``/``num_new`` are traced: one compilation for all."""
    model = GPT(cfg)

    def step(i: jax.Array, carry: tuple[Any, jax.Array, jax.Array]) -> tuple[Any, ...]:
        cache, logits, buffer = carry
        token = sample_logits(logits, jax.random.fold_in(rng, i), sampling, vocab_limit)
        buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, start + i))
        out, variables = model.apply(
            {"params": params, "cache": cache}, token[:, None], decode=True, mutable=["cache"]
        )
        return variables["cache"], out[:, -1], buffer

    _, _, buffer = jax.lax.fori_loop(0, num_new, step, (cache, logits, buffer))
    return buffer


@functools.lru_cache(maxsize=16)
def _cache_shapes(config: GPTConfig, batch: int) -> Any:
    return jax.eval_shape(lambda: init_cache(config, batch))


@functools.cache
def _jitted(backend: str) -> tuple[Any, Any]:
    """The jitted prefill and decode loop; the cache (and token buffer) are donated except
    on the CPU, which cannot reuse donated buffers."""
    donate = backend != "cpu"
    prefill = jax.jit(_prefill, static_argnames=("cfg",), donate_argnums=(1,) if donate else ())
    decode = jax.jit(
        _decode,
        static_argnames=("cfg", "sampling", "vocab_limit"),
        donate_argnums=(1, 3) if donate else (),
    )
    return prefill, decode


_COMPILED: dict[Any, Any] = {}
_MAX_COMPILED = 32


def _aot(fn: Any, args: tuple[Any, ...], static: dict[str, Any]) -> tuple[Any, float]:
    """Ahead-of-time compiled ``fn`` for these argument shapes, dtypes and shardings and
    static arguments (cached), and the seconds spent compiling it now (0 when cached)."""
    leaves, treedef = jax.tree.flatten(args)
    signature = tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)
    key = (fn, treedef, signature, tuple(static.items()))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.clear()
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - start


def generate(
    config: GPTConfig,
    params: Any,
    prompt: Any,
    sampling: SamplingConfig | None = None,
    *,
    seed: int = 0,
    vocab_limit: int | None = None,
) -> Generation:
    """Continue ``prompt`` with a key/value cache.

    Args:
      config: the model's :class:`dsc_jax.GPTConfig`.
      params: its parameters.
      prompt: ``[B, P]`` (or ``[P]``, one row) integer token ids, ``1 <= P``.
      sampling: a :class:`SamplingConfig` (default: its defaults).
      seed: randomness of the draws (the same seed gives the same tokens).
      vocab_limit: never draw ids at or above this (e.g. ``tokenizer.raw_vocab_size``).

    Returns:
      A :class:`Generation` (``tokens [B, P + N]``, timings, ``tokens_per_s``).

    Raises:
      ValueError: empty prompt, ``P >= config.max_seq_len`` or
        ``P + max_new_tokens > config.max_seq_len``.
    """
    sampling = sampling or SamplingConfig()
    prompt = np.asarray(prompt)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"prompt: expected [B, P] integer token ids, got {prompt.dtype} {prompt.shape}."
        )
    batch, prompt_len = prompt.shape
    if prompt_len == 0 or batch == 0:
        raise ValueError("prompt is empty; give at least one token.")
    context = config.max_seq_len
    if prompt_len >= context:
        raise ValueError(
            f"prompt has {prompt_len} tokens; the model's context is {context} tokens, so a "
            f"prompt may have at most {context - 1} (leaving room to generate)."
        )
    if sampling.max_new_tokens is None:
        sampling = dataclasses.replace(sampling, max_new_tokens=context - prompt_len)
    if prompt_len + sampling.max_new_tokens > context:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={sampling.max_new_tokens} exceeds "
            f"the model's context of {context} tokens; use max_new_tokens <= "
            f"{context - prompt_len}."
        )
    tokens = jnp.asarray(prompt, jnp.int32)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(config, batch))
    buffer = jnp.zeros((batch, context), jnp.int32).at[:, :prompt_len].set(tokens)
    prefill_jit, decode_jit = _jitted(jax.default_backend())
    prefill, compile_prefill = _aot(prefill_jit, (params, cache, tokens), {"cfg": config})
    start = time.perf_counter()
    logits, cache = prefill(params, cache, tokens)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - start
    args = (
        params,
        cache,
        logits,
        buffer,
        jnp.asarray(prompt_len, jnp.int32),
        jnp.asarray(sampling.max_new_tokens, jnp.int32),
        jax.random.key(seed),
    )
    static = {"cfg": config, "sampling": sampling, "vocab_limit": vocab_limit}
    decode, compile_decode = _aot(decode_jit, args, static)
    start = time.perf_counter()
    buffer = decode(*args).block_until_ready()
    decode_s = time.perf_counter() - start
    out = np.asarray(buffer)[:, : prompt_len + sampling.max_new_tokens]
    return Generation(out, prompt_len, compile_prefill + compile_decode, prefill_s, decode_s)


def sample_text(
    config: GPTConfig,
    params: Any,
    tokenizer: Tokenizer,
    prompt: str,
    sampling: SamplingConfig | None = None,
    *,
    num_samples: int = 1,
    seed: int = 0,
) -> tuple[list[str], Generation]:
    """``num_samples`` continuations of the text ``prompt`` (decoded, without the prompt).

    An empty prompt starts from the tokeniser's end-of-text token where it has one (GPT-2)
    and raises ``ValueError`` otherwise.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid; expected an integer >= 1.")
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    if ids.size == 0:
        eot = getattr(tokenizer, "eot_id", None)
        if eot is None:
            raise ValueError(
                f"prompt is empty and the {tokenizer.name!r} tokenizer has no start token; "
                "give at least one character."
            )
        ids = np.asarray([eot], np.int32)
    prompt_ids = np.tile(ids[None], (num_samples, 1))
    result = generate(
        config, params, prompt_ids, sampling, seed=seed, vocab_limit=tokenizer.raw_vocab_size
    )
    return [tokenizer.decode(row) for row in result.new_tokens], result
