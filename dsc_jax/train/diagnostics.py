"""Routing and bank diagnostics at evaluation (DSC, and the routed baselines where they apply).

Per routed layer (any module that sows ``top_k_indices`` into ``"intermediates"``; its path,
e.g. ``block_0/ffn``, names it), over all evaluation tokens:

* ``used_frac``: fraction of the ``M`` atoms (or ``E`` experts) selected at least once;
* ``usage_entropy``: entropy (nats) of the selection histogram ``p_j = n_j / Σ n``;
  ``usage_entropy_norm`` = that / ``log M`` (1 = uniform);
* DSC only (layers that sow ``signal``): ``mean_signal`` = mean ``S``, and
  ``signal_collapse_frac`` = fraction of tokens with ``S < 0.1``;
* DSC only (layers with ``basis_u``/``basis_v``): ``erank_u``, ``erank_v`` = effective rank
  ``(Σσ²)² / Σσ⁴`` (participation ratio of the singular values, see :func:`effective_rank`)
  of the row-normalised bank ``[M, d]``.

Metric keys are ``diag/<layer path>/<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dsc_jax.layers.diagnostics import routing_statistics

__all__ = [
    "bank_effective_ranks",
    "bank_parameters",
    "effective_rank",
    "finalize_eval",
    "routing_statistics",
]


def effective_rank(matrix: np.ndarray, eps: float = 1e-6) -> float:
    """Participation-ratio effective rank ``(Σ σ_i²)² / Σ σ_i⁴`` of the row-normalised ``[m, n]``
    (in ``[1, rank]``), on the host in float64.

    Computed from the Gram matrix of the smaller side, ``tr(G)² / ‖G‖_F²``. For a row-normalised
    bank ``U [M, d]``, ``‖UᵀU‖_F² = M + Σ_{i≠j}(u_i·u_j)²``, so the value is
    ``M² / (M + frame energy)``: ``d`` for a tight frame, ``M`` for orthonormal rows, 1 when
    every atom is the same direction. Host float64 rather than an XLA:CPU float32 matmul, whose
    last bits can depend on buffer alignment: a resumed run must log the same value.
    """
    x = np.asarray(matrix, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    return float(np.trace(gram) ** 2 / max(float(np.sum(gram**2)), 1e-30))


def bank_parameters(params: Any) -> dict[str, jax.Array]:
    """``{"diag/<layer>/erank_u": basis_u, "diag/<layer>/erank_v": basis_v}`` for every DSC bank
    (jit it with replicated ``out_shardings`` to bring sharded banks to every host)."""
    out: dict[str, jax.Array] = {}

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, Mapping):
            return
        for name, key in (("basis_u", "erank_u"), ("basis_v", "erank_v")):
            if name in node:
                out[f"diag/{path}/{key}"] = node[name]
        for key, child in node.items():
            walk(child, f"{path}/{key}" if path else str(key))

    walk(params, "")
    return out


def bank_effective_ranks(banks: Mapping[str, Any]) -> dict[str, float]:
    """:func:`effective_rank` of each bank from :func:`bank_parameters`; a bank stacked by
    ``nn.scan`` (``[layers, M, d]``) gives one value per layer (``.../layer_{i}/erank_u``)."""
    out = {}
    for key, bank in banks.items():
        bank = np.asarray(jax.device_get(bank))
        if bank.ndim == 2:
            out[key] = effective_rank(bank)
            continue
        head, name = key.rsplit("/", 1)
        for layer, layer_bank in enumerate(bank):
            out[f"{head}/layer_{layer}/{name}"] = effective_rank(layer_bank)
    return out


def finalize_eval(sums: Mapping[str, Any]) -> dict[str, float]:
    """Host-side metrics from the summed :func:`dsc_jax.train.steps.eval_step` outputs.

    Returns:
      ``eval_loss`` (mean token NLL), ``eval_ppl`` (``exp`` of it) and the per-layer
      ``diag/<layer>/...`` routing metrics (see the module docstring).
    """
    sums = jax.device_get(sums)
    loss = float(sums["loss_sum"]) / max(float(sums["tokens"]), 1.0)
    out = {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 80.0)))}
    for layer, entry in sums.get("routing", {}).items():
        usage = np.asarray(entry["usage"], np.float64)
        total = max(usage.sum(), 1.0)
        p = usage / total
        nz = p[p > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        prefix = f"diag/{layer}"
        out[f"{prefix}/used_frac"] = float(np.mean(usage > 0))
        out[f"{prefix}/usage_entropy"] = entropy
        out[f"{prefix}/usage_entropy_norm"] = entropy / max(float(np.log(len(usage))), 1e-12)
        if "signal_sum" in entry:
            tokens = max(float(entry["tokens"]), 1.0)
            out[f"{prefix}/mean_signal"] = float(entry["signal_sum"]) / tokens
            out[f"{prefix}/signal_collapse_frac"] = float(entry["collapsed"]) / tokens
    return out
