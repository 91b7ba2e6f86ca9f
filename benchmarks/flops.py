"""Analytic forward matmul FLOPs of every FFN kind, and the layers to time (no timing here).

:class:`LayerSizes` holds the FFN sizes (defaults: the per-kind configs' paper sizes),
:func:`build_implementations` the timed layers with their FLOP formulas and
:func:`gemm_columns` the width of the same-FLOPs GEMM-equivalent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from dsc_jax.layers.configs import DenseConfig, DSCConfig, MoEConfig, MoLoRAConfig
from dsc_jax.layers.dense import DenseFFN
from dsc_jax.layers.dsc import DSCLayer
from dsc_jax.layers.moe import MoELayer, expert_capacity, sorted_buffer_rows
from dsc_jax.layers.molora import MoLoRALayer

IMPLEMENTATIONS = (
    "dsc_gather",
    "dsc_dense",
    "moe_dense",
    "moe_dropless",
    "moe_sorted",
    "moe_capacity",
    "molora",
    "dense",
)


@dataclasses.dataclass(frozen=True)
class LayerSizes:
    """FFN sizes of every layer kind (defaults: :class:`GPTConfig`'s paper/iso-active ones)."""

    dense_hidden_dim: int
    moe_num_experts: int
    moe_top_k: int
    moe_hidden_dim: int
    moe_capacity_factor: float
    molora_num_experts: int
    molora_rank: int
    molora_top_k: int
    molora_hidden_dim: int
    dsc_num_bases: int
    dsc_top_k: int
    dsc_hidden_dim: int
    dsc_variant: str

    @classmethod
    def paper(cls) -> LayerSizes:
        """Dense H=2611; MoE E=5, k=2, H_e=545; DSC M=1523, K=4, H=327 (refined); MoLoRA from
        :func:`dsc_jax.solver.solve_iso_active` at the same 35 M / 28 M budgets."""
        dense, moe, molora, dsc = DenseConfig(), MoEConfig(), MoLoRAConfig(), DSCConfig()
        return cls(
            dense_hidden_dim=dense.hidden_dim,
            moe_num_experts=moe.num_experts,
            moe_top_k=moe.top_k,
            moe_hidden_dim=moe.hidden_dim,
            moe_capacity_factor=moe.capacity_factor,
            molora_num_experts=molora.num_experts,
            molora_rank=molora.rank,
            molora_top_k=molora.top_k,
            molora_hidden_dim=molora.hidden_dim,
            dsc_num_bases=dsc.num_bases,
            dsc_top_k=dsc.top_k,
            dsc_hidden_dim=dsc.hidden_dim,
            dsc_variant=dsc.variant,
        )

    def replace(self, assignments: Sequence[str]) -> LayerSizes:
        """Copy with ``"field=value"`` overrides (value parsed as the field's type)."""
        updates: dict[str, Any] = {}
        current = dataclasses.asdict(self)
        for item in assignments:
            key, sep, text = item.partition("=")
            if not sep or key not in current:
                raise ValueError(
                    f"--set {item!r} is invalid; expected FIELD=VALUE with FIELD one of "
                    f"{sorted(current)}."
                )
            updates[key] = type(current[key])(text)
        return dataclasses.replace(self, **updates)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One timed layer.

    Attributes:
      name: key in the results (one of :data:`IMPLEMENTATIONS`).
      module: the Flax layer.
      flops: forward matmul FLOPs the implementation executes (basis of its GEMM-equivalent).
      flops_active: forward matmul FLOPs of the routed work only (top-k experts / atoms), i.e.
        what an ideal sparse kernel would execute.
      formula: ``flops`` as a formula.
    """

    name: str
    module: nn.Module
    flops: int
    flops_active: int
    formula: str


def build_implementations(
    sizes: LayerSizes, num_tokens: int, d_model: int, dtype: Any, param_dtype: Any
) -> dict[str, Implementation]:
    """Every implementation with its analytic forward matmul FLOPs.

    FLOPs count ``2·m·n·k`` per ``[m,k]×[k,n]`` contraction (einsums included, element-wise
    work, LayerNorm, GELU, softmax and top-k excluded); ``N`` tokens, width ``d``:

    * dense: ``4·N·d·H`` (``x W1``, ``h W2``).
    * DSC: static FFN ``4·N·d·H`` + router ``2·N·d·M`` + contraction, ``gather``: ``4·N·K·d``
      (``x·u_j`` and ``Σ c_j v_j`` over the K gathered atoms), ``dense``: ``4·N·M·d`` (``x Uᵀ``
      and ``c V`` over all M atoms with a K-sparse ``c``).
    * MoE: gate ``2·N·d·E`` + experts, ``dense``: ``4·E·N·d·H_e`` + combine ``2·N·k·E`` (one-hot
      einsum) + ``2·N·E·d``; ``sorted``: ``4·R·d·H_e`` over the ``R = ⌈(N·k + E·(T−1))/T⌉·T``
      padded buffer rows (tile ``T``) + combine ``2·N·k·d``; ``dropless``: ``4·N·k·d·H_e``
      (ragged dots over the ``N·k`` slots) + combine ``2·N·k·d``; ``capacity``:
      ``4·E·C·d·H_e`` with ``C = ceil(cf·N·k/E)`` + combine ``2·N·k·d``.
    * MoLoRA: static FFN ``4·N·d·H`` + router ``2·N·d·E`` + experts ``4·N·E·d·r`` (``x A_e``
      for every expert, then the gate-masked ``[N, E·r] × [E·r, d]`` contraction; the routed
      share is ``4·N·k·d·r``).
    """
    n, d = num_tokens, d_model
    common = {"dtype": dtype, "param_dtype": param_dtype}
    impls: dict[str, Implementation] = {}

    h = sizes.dense_hidden_dim
    flops = 4 * n * d * h
    impls["dense"] = Implementation(
        "dense", DenseFFN(hidden_dim=h, **common), flops, flops, "4·N·d·H"
    )

    m, k, h = sizes.dsc_num_bases, sizes.dsc_top_k, sizes.dsc_hidden_dim
    base = 4 * n * d * h + 2 * n * d * m
    for mode, contraction, text in (
        ("gather", 4 * n * k * d, "4·N·d·H + 2·N·d·M + 4·N·K·d"),
        ("dense", 4 * n * m * d, "4·N·d·H + 2·N·d·M + 4·N·M·d"),
    ):
        layer = DSCLayer(
            num_bases=m,
            top_k=k,
            hidden_dim=h,
            variant=sizes.dsc_variant,
            compute=mode,
            **common,
        )
        impls[f"dsc_{mode}"] = Implementation(
            f"dsc_{mode}", layer, base + contraction, base + 4 * n * k * d, text
        )

    e, k, h = sizes.moe_num_experts, sizes.moe_top_k, sizes.moe_hidden_dim
    capacity = expert_capacity(sizes.moe_capacity_factor, n, k, e)
    gate = 2 * n * d * e
    tile = MoEConfig().tile_size
    sorted_rows = sorted_buffer_rows(n, k, e, tile)  # static buffer of "sorted"
    active = gate + 4 * n * k * d * h + 2 * n * k * d
    for mode, flops, text in (
        (
            "dense",
            gate + 4 * e * n * d * h + 2 * n * k * e + 2 * n * e * d,
            "2·N·d·E + 4·E·N·d·H_e + 2·N·k·E + 2·N·E·d",
        ),
        ("dropless", active, "2·N·d·E + 4·N·k·d·H_e + 2·N·k·d"),
        (
            "sorted",
            gate + 4 * sorted_rows * d * h + 2 * n * k * d,
            f"2·N·d·E + 4·R·d·H_e + 2·N·k·d (R={sorted_rows} padded rows)",
        ),
        (
            "capacity",
            gate + 4 * e * capacity * d * h + 2 * n * k * d,
            f"2·N·d·E + 4·E·C·d·H_e + 2·N·k·d (C={capacity})",
        ),
    ):
        layer = MoELayer(
            num_experts=e,
            top_k=k,
            hidden_dim=h,
            dispatch=mode,
            capacity_factor=sizes.moe_capacity_factor,
            **common,
        )
        impls[f"moe_{mode}"] = Implementation(f"moe_{mode}", layer, flops, active, text)

    e, k, r, h = (
        sizes.molora_num_experts,
        sizes.molora_top_k,
        sizes.molora_rank,
        sizes.molora_hidden_dim,
    )
    base = 4 * n * d * h + 2 * n * d * e
    layer = MoLoRALayer(num_experts=e, rank=r, top_k=k, hidden_dim=h, **common)
    impls["molora"] = Implementation(
        "molora",
        layer,
        base + 4 * n * e * d * r,
        base + 4 * n * k * d * r,
        "4·N·d·H + 2·N·d·E + 4·N·E·d·r",
    )
    return impls


def gemm_columns(flops: int, num_tokens: int, d_model: int) -> int:
    """Output width of the GEMM-equivalent ``[N, d] × [d, F / (2 N d)]`` (rounded, >= 1)."""
    return max(1, round(flops / (2 * num_tokens * d_model)))


def ffn_active_matmul_params(ffn: Any, d_model: int) -> int:
    """Matmul parameters one token multiplies through in one FFN layer (``ffn``: a per-kind
    config of :mod:`dsc_jax.layers.configs`). Router/gate weights count (every token multiplies
    through all of them); only the routed (top-k) experts / atoms count.

    * dense: ``2·d·H``; MoE: ``d·E + k·2·d·H_e``; MoLoRA: ``2·d·H + d·E + k·2·d·r``;
      DSC: ``2·d·H + d·M + K·2·d`` (the K rank-1 atoms ``u_j``, ``v_j``).
    """
    d = d_model
    if ffn.kind == "dense":
        return 2 * d * ffn.hidden_dim
    if ffn.kind == "moe":
        return d * ffn.num_experts + ffn.top_k * 2 * d * ffn.hidden_dim
    if ffn.kind == "molora":
        return 2 * d * ffn.hidden_dim + d * ffn.num_experts + ffn.top_k * 2 * d * ffn.rank
    if ffn.kind == "dsc":
        return 2 * d * ffn.hidden_dim + d * ffn.num_bases + ffn.top_k * 2 * d
    raise ValueError(f"unknown FFN kind {ffn.kind!r}")


def model_active_matmul_params(cfg: Any) -> int:
    """Active matmul parameters of a :class:`dsc_jax.GPTConfig` per token: per layer the
    attention projections ``4·d²`` and the FFN's :func:`ffn_active_matmul_params`, plus the
    LM head ``d·V`` (embedding lookups are not matmuls)."""
    d = cfg.d_model
    per_layer = 4 * d * d + ffn_active_matmul_params(cfg.ffn, d)
    return cfg.num_layers * per_layer + d * cfg.vocab_size


def model_train_flops(cfg: Any, batch: int, seq_len: int) -> dict[str, int]:
    """Model FLOPs of one training step (forward + backward = 3 × forward) on ``batch × seq_len``
    tokens ``N``, counting ``2·m·n·k`` per matmul:

    * parameters: ``6 · P_active · N`` (:func:`model_active_matmul_params`);
    * attention scores and values: ``12 · L · T · d · N`` (``Q Kᵀ`` and ``P V``, each
      ``2·T·d`` FLOPs per token per layer forward, the full ``T×T`` not the causal half).

    Returns ``{"params": ..., "attention": ..., "total": ...}``.
    """
    tokens = batch * seq_len
    params = 6 * model_active_matmul_params(cfg) * tokens
    attention = 12 * cfg.num_layers * seq_len * cfg.d_model * tokens
    return {"params": params, "attention": attention, "total": params + attention}
