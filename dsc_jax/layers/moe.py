"""Standard top-k mixture-of-experts FFN baseline of the paper, several dispatch modes.

Router (:class:`dsc_jax.layers.topk_router.TopKRouter`, float32): ``logits = LayerNorm(x) W_g``
(no bias), ``+ N(0, jitter_std²)`` noise in training, ``p = softmax(logits)``, top-k of ``p``
with the weights NOT renormalised. Each expert is ``GELU(x W_in[e]) W_out[e]`` (exact erf
GELU, no bias).

Dispatch modes (identical results when no token is dropped; ``"auto"``, the default, picks
``"dense"``, ``"sorted"`` or ``"dropless"`` by :func:`resolve_dispatch`):

* ``"dense"``: every expert on every token, then a masked combine (``O(E)`` FLOPs per token).
* ``"dropless"``: token-slots sorted by expert, two ``jax.lax.ragged_dot`` calls with per-expert
  group sizes over ``N·k`` rows (static shapes, nothing dropped).
* ``"sorted"``: token-slots placed in expert order into a buffer where each expert's group is
  padded to a multiple of ``tile_size`` rows (static ``N·k + E·(tile_size − 1)`` rows, rounded
  up to whole tiles), then one ``[tile, d] × [d, H]`` matmul per tile with that tile's expert's
  weights (a batched matmul over gathered weights; nothing dropped, plain dense kernels).
* ``"capacity"``: GShard-style buffers of ``C = ceil(capacity_factor · N · k / E)`` slots per
  expert; slots beyond ``C`` are dropped (contribute 0). Priority: every token's first choice
  before any second choice, tokens in order within a choice rank.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsc_jax import paper
from dsc_jax._checks import (
    check_choice,
    check_float_input,
    check_positive_float,
    check_positive_int,
)
from dsc_jax.layers import remat_names
from dsc_jax.layers.common import (
    Dtype,
    check_common_fields,
    check_top_k,
    layer_norm,
    model_dim_of,
    normal,
)
from dsc_jax.layers.routing import collects_losses, sow_routing
from dsc_jax.layers.topk_router import TopKRouter

DISPATCH_MODES = ("auto", "dense", "dropless", "sorted", "capacity")
DEFAULT_CAPACITY_FACTOR = 1.25  # read by dispatch="capacity" only
DEFAULT_TILE_SIZE = 256  # read by dispatch="sorted" (and "auto", which may pick it) only

# "auto" on accelerators picks "dense" (every expert on every token: E/k times the routed
# FLOPs, in plain batched matmuls) when E/k is at most this, else "dropless" (``ragged_dot``,
# a grouped GEMM there). On CPU it picks "sorted" whenever its padded buffer
# (``N·k + E·(tile − 1)`` rows) is smaller than dense's ``E·N`` rows, else "dense": XLA:CPU
# lowers ``ragged_dot`` to slow loops, while "sorted" runs plain batched matmuls (chosen
# with benchmarks/layer_latency.py; see benchmarks/README.md). All modes but "capacity" drop
# nothing and give the same outputs.
AUTO_DENSE_MAX_EXPERTS_PER_ACTIVE_ACCELERATOR = 1.5


def sorted_buffer_rows(num_tokens: int, top_k: int, num_experts: int, tile_size: int) -> int:
    """Static rows of the ``"sorted"`` buffer: ``N·k + E·(tile − 1)`` rounded up to tiles."""
    rows = num_tokens * top_k + num_experts * (tile_size - 1)
    return -(-rows // tile_size) * tile_size


def resolve_dispatch(
    dispatch: str,
    num_experts: int,
    top_k: int,
    platform: str | None = None,
    num_tokens: int | None = None,
    tile_size: int = 256,
) -> str:
    """The dispatch ``dispatch`` selects on ``platform`` (default: JAX's default backend) for
    ``num_tokens`` tokens (unknown: assume many)."""
    if dispatch != "auto":
        return dispatch
    platform = platform or jax.default_backend()
    if platform == "cpu":
        if num_tokens is None:
            return "sorted" if num_experts > top_k else "dense"
        rows = sorted_buffer_rows(num_tokens, top_k, num_experts, tile_size)
        return "sorted" if rows < num_experts * num_tokens else "dense"
    limit = AUTO_DENSE_MAX_EXPERTS_PER_ACTIVE_ACCELERATOR
    return "dense" if num_experts <= limit * top_k else "dropless"


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """``C = ceil(capacity_factor · N · k / E)``, capped at ``N`` (each token visits once)."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def _expert_mlp(tokens: jax.Array, w_in: jax.Array, w_out: jax.Array) -> jax.Array:
    """Batched experts ``GELU(t W_in[e]) W_out[e]``: ``tokens [E, C, d] -> [E, C, d]``."""
    hidden = jax.nn.gelu(jnp.einsum("ecd,edh->ech", tokens, w_in), approximate=False)
    hidden = checkpoint_name(hidden, remat_names.MOE_EXPERT_HIDDEN)
    return jnp.einsum("ech,ehd->ecd", hidden, w_out)


class MoELayer(nn.Module):
    """Top-k MoE FFN (the paper's "Standard MoE" baseline).

    Shapes: ``x [..., d] -> [..., d]`` in ``dtype`` (any leading axes, e.g. ``[B, T, d]``);
    ``d`` is fixed by the first call. Example::

        layer = MoELayer(num_experts=8, top_k=2, hidden_dim=128)
        variables = layer.init(jax.random.key(0), x)          # x: [B, T, d]
        y = layer.apply(variables, x)                          # [B, T, d]

    Attributes:
      num_experts: ``E``.
      top_k: experts per token, ``1 <= k <= E``.
      hidden_dim: hidden width ``H_e`` of each expert.
      dispatch: ``"auto"`` (default: ``"dense"`` or ``"dropless"``, see
        :func:`resolve_dispatch`), ``"dense"``, ``"dropless"`` or ``"capacity"``.
      capacity_factor: ``"capacity"`` mode only; ``C = ceil(capacity_factor · N · k / E)``
        (another value with another dispatch raises: it would be ignored).
      tile_size: ``"sorted"`` mode only (and ``"auto"``, which may pick it); rows per tile
        (each tile holds one expert's slots; another value with another dispatch raises).
      jitter_std: std of the Gaussian noise added to the router logits in training.
      dropout_rate: dropout on the output when ``deterministic=False``.
      init_std: std of ``expert_in`` and the router kernel (the paper: 0.02).
      out_init_std: std of ``expert_out`` (a GPT passes ``0.02 / sqrt(2 L)``).
      dtype: expert compute dtype and output dtype (the router always computes in float32).
      param_dtype: storage dtype of every parameter (initialisers compute in float32).

    Parameters (logical axes): ``router_norm/{scale,bias} [d]`` (``embed``), ``router/kernel
    [d, E]`` (``embed, experts``), ``expert_in [E, d, H]`` (``experts, embed, mlp``),
    ``expert_out [E, H, d]`` (``experts, mlp, embed``).

    Sown: ``losses/aux`` (:func:`dsc_jax.layers.common.load_balancing_loss`, on the jittered
    probabilities) and ``losses/z`` (:func:`dsc_jax.layers.common.z_loss` on the logits
    WITHOUT jitter) when ``"losses"`` is mutable; ``intermediates/top_k_indices [..., k]`` int32,
    ``intermediates/gates [..., k]`` float32 and, in ``"capacity"`` mode,
    ``intermediates/dropped_fraction`` (fraction of the ``N·k`` token-slots dropped).
    """

    num_experts: int
    top_k: int
    hidden_dim: int
    dispatch: str = "auto"
    capacity_factor: float = DEFAULT_CAPACITY_FACTOR
    tile_size: int = DEFAULT_TILE_SIZE
    jitter_std: float = paper.MOE_JITTER_STD
    dropout_rate: float = 0.0
    init_std: float = paper.INIT_STD
    out_init_std: float = paper.INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_experts", self.num_experts)
        check_top_k(owner, self.top_k, "num_experts", self.num_experts)
        check_common_fields(self)
        check_choice(owner, "dispatch", self.dispatch, DISPATCH_MODES)
        check_positive_float(owner, "capacity_factor", self.capacity_factor)
        check_positive_int(owner, "tile_size", self.tile_size)
        if self.dispatch != "capacity" and self.capacity_factor != DEFAULT_CAPACITY_FACTOR:
            raise ValueError(
                f"{owner}.capacity_factor={self.capacity_factor!r} is only read with "
                f"dispatch='capacity' (dispatch={self.dispatch!r}); set dispatch='capacity' or "
                f"leave capacity_factor at {DEFAULT_CAPACITY_FACTOR}."
            )
        if self.dispatch not in ("auto", "sorted") and self.tile_size != DEFAULT_TILE_SIZE:
            raise ValueError(
                f"{owner}.tile_size={self.tile_size!r} is only read with dispatch='sorted' or "
                f"'auto' (dispatch={self.dispatch!r}); change the dispatch or leave tile_size "
                f"at {DEFAULT_TILE_SIZE}."
            )
        check_positive_float(owner, "jitter_std", self.jitter_std, allow_zero=True)
        super().__post_init__()

    @nn.nowrap
    def make_router(self) -> TopKRouter:
        """The layer's ``router`` module (no bias, top-k of the softmax, jitter in training);
        its input is ``LayerNorm(x)`` (``router_norm``)."""
        return TopKRouter(
            self.num_experts,
            self.top_k,
            jitter_std=self.jitter_std,
            init_std=self.init_std,
            param_dtype=self.param_dtype,
            name="router",
        )

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Route each token to ``top_k`` experts and combine their outputs.

        Args:
          x: ``[..., d]`` floating input.
          deterministic: ``False`` enables router jitter and dropout (``"dropout"`` rng);
            positional or keyword.

        Returns:
          ``[..., d]`` in ``dtype``.
        """
        check_float_input(type(self).__name__, x, model_dim_of(self, ("expert_in",), axis=1))
        model_dim = x.shape[-1]
        num_experts, top_k = self.num_experts, self.top_k

        w_in = self.param(
            "expert_in",
            normal(self.init_std, ("experts", "embed", "mlp")),
            (num_experts, model_dim, self.hidden_dim),
            self.param_dtype,
        )
        w_out = self.param(
            "expert_out",
            normal(self.out_init_std, ("experts", "mlp", "embed")),
            (num_experts, self.hidden_dim, model_dim),
            self.param_dtype,
        )

        tokens = x.reshape(-1, model_dim)
        jitter_key = None
        if not deterministic and self.jitter_std > 0:
            jitter_key = self.make_rng("dropout")
        router = self.make_router()
        query = layer_norm(self.param_dtype, "router_norm")(tokens.astype(jnp.float32))
        routing = router(query, jitter_key=jitter_key, with_losses=collects_losses(self))
        indices, gates = routing.indices, routing.gates  # [N, k], not renormalised
        sow_routing(self, routing, x.shape[:-1])

        tokens = tokens.astype(self.dtype)
        w_in, w_out = w_in.astype(self.dtype), w_out.astype(self.dtype)
        dispatch = resolve_dispatch(
            self.dispatch, num_experts, top_k, num_tokens=tokens.shape[0], tile_size=self.tile_size
        )
        if dispatch == "dense":
            y = self._dense_dispatch(tokens, w_in, w_out, indices, gates)
        elif dispatch == "dropless":
            y = self._dropless_dispatch(tokens, w_in, w_out, indices, gates)
        elif dispatch == "sorted":
            y = sorted_tile_dispatch(tokens, w_in, w_out, indices, gates, self.tile_size)
        else:
            y = self._capacity_dispatch(tokens, w_in, w_out, indices, gates)

        y = y.reshape((*x.shape[:-1], model_dim))
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        return y.astype(self.dtype)

    def _dense_dispatch(
        self,
        tokens: jax.Array,
        w_in: jax.Array,
        w_out: jax.Array,
        indices: jax.Array,
        gates: jax.Array,
    ) -> jax.Array:
        """Every expert on every token; ``combine [N, E]`` zeroes the unselected ones."""
        combine = jnp.einsum(
            "nke,nk->ne", jax.nn.one_hot(indices, self.num_experts, dtype=jnp.float32), gates
        ).astype(self.dtype)
        expert_outputs = _expert_mlp(
            jnp.broadcast_to(tokens, (self.num_experts, *tokens.shape)), w_in, w_out
        )  # [E, N, d]
        return jnp.einsum("ne,end->nd", combine, expert_outputs)

    def _dropless_dispatch(
        self,
        tokens: jax.Array,
        w_in: jax.Array,
        w_out: jax.Array,
        indices: jax.Array,
        gates: jax.Array,
    ) -> jax.Array:
        """Sort the ``N·k`` token-slots by expert and run grouped matmuls (nothing dropped)."""
        num_tokens, top_k = indices.shape
        slot_expert = indices.reshape(-1)  # [N·k], slot s belongs to token s // k
        order = jnp.argsort(slot_expert, stable=True)
        group_sizes = jnp.bincount(slot_expert, length=self.num_experts).astype(jnp.int32)
        sorted_tokens = tokens[order // top_k]  # [N·k, d]
        hidden = jax.nn.gelu(
            jax.lax.ragged_dot(sorted_tokens, w_in, group_sizes), approximate=False
        )
        hidden = checkpoint_name(hidden, remat_names.MOE_EXPERT_HIDDEN)
        sorted_out = jax.lax.ragged_dot(hidden, w_out, group_sizes)  # [N·k, d]
        slot_out = sorted_out[jnp.argsort(order)].reshape(num_tokens, top_k, -1)
        return jnp.einsum("nkd,nk->nd", slot_out, gates.astype(self.dtype))

    def _capacity_dispatch(
        self,
        tokens: jax.Array,
        w_in: jax.Array,
        w_out: jax.Array,
        indices: jax.Array,
        gates: jax.Array,
    ) -> jax.Array:
        """Fixed ``[E, C, d]`` expert buffers; slots past capacity are dropped."""
        num_tokens, top_k = indices.shape
        num_experts = self.num_experts
        capacity = expert_capacity(self.capacity_factor, num_tokens, top_k, num_experts)
        # Priority order: choice rank major, token minor -> [k·N, E] one-hot assignments.
        assignment = jax.nn.one_hot(indices.T.reshape(-1), num_experts, dtype=jnp.int32)
        position = jnp.sum((jnp.cumsum(assignment, axis=0) - 1) * assignment, axis=-1)
        position = position.reshape(top_k, num_tokens).T  # [N, k], position inside its expert
        kept = position < capacity
        self.sow("intermediates", "dropped_fraction", 1.0 - jnp.mean(kept.astype(jnp.float32)))
        # Flat buffer row of each slot; dropped slots get distinct rows past the end.
        out_of_range = num_experts * capacity + jnp.arange(num_tokens * top_k).reshape(
            num_tokens, top_k
        )
        buffer_row = jnp.where(kept, indices * capacity + position, out_of_range).reshape(-1)
        slot_tokens = jnp.repeat(tokens, top_k, axis=0)  # [N·k, d]
        buffers = jnp.zeros((num_experts * capacity, tokens.shape[-1]), self.dtype)
        buffers = buffers.at[buffer_row].set(slot_tokens, mode="drop", unique_indices=True)
        expert_outputs = _expert_mlp(buffers.reshape(num_experts, capacity, -1), w_in, w_out)
        slot_out = jnp.take(
            expert_outputs.reshape(num_experts * capacity, -1),
            buffer_row,
            axis=0,
            mode="fill",
            fill_value=0,
        ).reshape(num_tokens, top_k, -1)
        return jnp.einsum("nkd,nk->nd", slot_out, gates.astype(self.dtype))


def sorted_tile_plan(
    indices: jax.Array, num_experts: int, tile_size: int
) -> tuple[jax.Array, jax.Array]:
    """Where each token-slot goes in the ``"sorted"`` buffer, and which expert owns each tile.

    Slot ``s`` (token ``s // k``, expert ``e_s``) goes to row ``start_e + rank_s``: expert
    ``e``'s group starts at ``start_e`` (the group sizes rounded up to a multiple of
    ``tile_size``, summed over the experts before ``e``) and ``rank_s`` counts the earlier slots
    of ``e``. Tile ``t`` belongs to the expert whose padded range holds row ``t·tile`` (trailing
    unused tiles take the last expert and compute on zeros).

    Args:
      indices: ``[N, k]`` int32 expert ids.

    Returns:
      ``(dest [N·k] int32`` distinct buffer rows, ``tile_expert [num_tiles] int32)`` with
      ``num_tiles = sorted_buffer_rows(N, k, E, tile_size) // tile_size``.
    """
    num_tokens, top_k = indices.shape
    slot_expert = indices.reshape(-1)  # [S], S = N·k
    one_hot = jax.nn.one_hot(slot_expert, num_experts, dtype=jnp.int32)  # [S, E]
    rank = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # rank within expert
    group_sizes = jnp.sum(one_hot, axis=0)
    padded = -(-group_sizes // tile_size) * tile_size
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    num_tiles = sorted_buffer_rows(num_tokens, top_k, num_experts, tile_size) // tile_size
    dest = padded_start[slot_expert] + rank
    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * tile_size
    tile_expert = jnp.minimum(
        jnp.searchsorted(padded_end, tile_start, side="right"), num_experts - 1
    )
    return dest, tile_expert.astype(jnp.int32)


def scatter_slots(tokens: jax.Array, dest: jax.Array, top_k: int, rows: int) -> jax.Array:
    """``[rows, d]`` buffer with token ``s // k`` at row ``dest[s]``, zeros elsewhere."""
    buffer = jnp.zeros((rows, tokens.shape[-1]), tokens.dtype)
    return buffer.at[dest].set(jnp.repeat(tokens, top_k, axis=0), unique_indices=True)


def tile_expert_mlp(tiles: jax.Array, tile_w_in: jax.Array, tile_w_out: jax.Array) -> jax.Array:
    """``GELU(tiles W_in) W_out`` per tile: ``tiles [T, c, d]``, ``tile_w_in [T, d, H]``,
    ``tile_w_out [T, H, d]`` (each tile's expert weights) -> ``[T, c, d]``."""
    hidden = jax.nn.gelu(jnp.einsum("tcd,tdh->tch", tiles, tile_w_in), approximate=False)
    hidden = checkpoint_name(hidden, remat_names.MOE_EXPERT_HIDDEN)
    return jnp.einsum("tch,thd->tcd", hidden, tile_w_out)


def combine_slots(out: jax.Array, dest: jax.Array, gates: jax.Array) -> jax.Array:
    """``Σ_k gate · out[dest]``: ``out [rows, d]``, ``dest [N·k]``, ``gates [N, k]``
    -> ``[N, d]``."""
    num_tokens, top_k = gates.shape
    slot_out = jnp.take(out, dest, axis=0).reshape(num_tokens, top_k, -1)
    return jnp.einsum("nkd,nk->nd", slot_out, gates.astype(out.dtype))


def sorted_tile_dispatch(
    tokens: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    indices: jax.Array,
    gates: jax.Array,
    tile_size: int,
) -> jax.Array:
    """Exact top-k MoE with per-tile dense matmuls (dispatch ``"sorted"``).

    The ``N·k`` token-slots go, in expert order, into a buffer of the static size
    ``ceil((N·k + E·(tile − 1)) / tile)`` tiles (:func:`sorted_tile_plan`; padding rows are zero
    and never read back); each tile runs its expert's MLP (:func:`tile_expert_mlp`, weights
    gathered per tile) and the slots are gathered back and gated (:func:`combine_slots`).

    Args:
      tokens: ``[N, d]``; w_in: ``[E, d, H]``; w_out: ``[E, H, d]``; indices, gates: ``[N, k]``.
      tile_size: rows per tile.

    Returns:
      ``[N, d]``: ``Σ_k gate · expert(token)``, identical to ``"dropless"`` up to rounding.
    """
    top_k = indices.shape[1]
    dest, tile_expert = sorted_tile_plan(indices, w_in.shape[0], tile_size)
    rows = tile_expert.shape[0] * tile_size
    tiles = scatter_slots(tokens, dest, top_k, rows).reshape(-1, tile_size, tokens.shape[-1])
    out = tile_expert_mlp(tiles, w_in[tile_expert], w_out[tile_expert])
    return combine_slots(out.reshape(rows, -1), dest, gates)
