"""The layer performance targets, checked on a ``layer_latency`` report, with measured reasons.

Each :class:`Target` bounds ``layer time / GEMM-equivalent time`` (same-round ratio) for the
implementation that ``dispatch="auto"`` / ``compute="auto"`` picks on the platform. When a
target is missed and the implementation was timed part by part (``breakdown``), the reason is
computed from those parts, in units of the layer's GEMM-equivalent:

* ``matmul parts``: the parts that are matmuls; together they hold (about) the layer's FLOPs,
  so at the big GEMM's rate they would sum to ~1.0 (``> 1``: the smaller matmuls run slower);
* ``other parts``: sorting / top-k / gathers / scatters, the work a GEMM does not have (DSC's
  ``contract`` counts here: its two ``N·K·d`` einsums are < 1 % of the layer's FLOPs, its
  time is the row gather and, backward, the scatter-add into the bank);
* ``unattributed``: the layer minus its parts (element-wise work between parts: LayerNorm,
  gating, GELU; layout changes and fusion boundaries).

``allowance`` = target − 1: what the non-matmul work may take if the matmuls ran at GEMM speed.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Target:
    """``impl`` (from ``metadata[auto_key]``) ``pass_`` time ≤ ``limit`` × its GEMM-equivalent
    of ``basis`` FLOPs (``"executed"``: what it runs; ``"active"``: the routed work only)."""

    name: str
    prefix: str
    auto_key: str
    pass_: str
    limit: float
    basis: str
    matmul_parts: tuple[str, ...]
    would_take: str


TARGETS = (
    Target(
        "DSC layer forward",
        "dsc",
        "dsc_auto_resolves_to",
        "fwd",
        1.25,
        "executed",
        ("router", "static_ffn"),
        "a fused router kernel that keeps a running top-K per token while it computes the "
        "logit tiles (no [N, M] logits written and re-read for top-K), e.g. Pallas on GPU/TPU",
    ),
    Target(
        "DSC layer forward+backward",
        "dsc",
        "dsc_auto_resolves_to",
        "fwd_bwd",
        1.5,
        "executed",
        ("router", "static_ffn"),
        "a fused gather-contract VJP (the K gathered rows' gradients scatter-added into the "
        "bank inside one kernel, no [N, K, d] gathered copies) and a router kernel that keeps "
        "a running top-K while it computes the logit tiles",
    ),
    Target(
        "MoE layer forward (exact)",
        "moe",
        "moe_auto_resolves_to",
        "fwd",
        1.5,
        "active",
        ("expert_matmuls",),
        "a grouped-GEMM kernel over the expert-sorted slots (per-group weight pointers: no "
        "padded buffer, no per-tile weight copies), e.g. ragged_dot lowered to one kernel",
    ),
    Target(
        "MoE layer forward+backward (exact)",
        "moe",
        "moe_auto_resolves_to",
        "fwd_bwd",
        2.0,
        "active",
        ("expert_matmuls",),
        "a grouped-GEMM kernel for the forward and both gradients (the weight gradient "
        "accumulated per expert group instead of per-tile copies [tiles, d, H] then summed)",
    ),
)


def _reason(target: Target, impl: str, report: dict[str, Any], measured: float) -> str | None:
    parts = report.get("breakdown", {}).get(impl)
    if not parts:
        return None
    with_losses = report["metadata"].get("with_losses", False)
    costs: dict[str, float] = {}
    for part, entry in parts.items():
        if part == "regularisers" and not with_losses:
            continue  # training-only work, not in this path
        if f"{target.pass_}_ratio_gemm" in entry:
            costs[part] = entry[f"{target.pass_}_ratio_gemm"]
        else:  # forward-only part (no gradient) inside a forward+backward pass
            costs[part] = entry["fwd_ms"] / report["results"][impl][f"gemm_{target.pass_}_ms"]
    matmul = {p: c for p, c in costs.items() if p in target.matmul_parts}
    other = {p: c for p, c in costs.items() if p not in target.matmul_parts}
    executed = measured
    if target.basis == "active":  # back to the executed-FLOPs GEMM the parts were timed with
        row = report["results"][impl]
        executed = measured * row["flops_active"] / row["flops"]

    def listing(group: dict[str, float]) -> str:
        return ", ".join(f"{p} {c:.2f}" for p, c in sorted(group.items(), key=lambda i: -i[1]))

    rest = executed - sum(costs.values())
    return (
        f"in GEMM-equivalents (same rounds): matmul parts {sum(matmul.values()):.2f} "
        f"({listing(matmul)}); other parts {sum(other.values()):.2f} ({listing(other)}); "
        f"unattributed {rest:.2f}; allowance above the FLOPs at GEMM speed "
        f"{target.limit - 1:.2f}"
    )


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per :data:`TARGETS` entry whose implementation was timed in ``report``."""
    rows = []
    for target in TARGETS:
        impl = f"{target.prefix}_{report['metadata'][target.auto_key]}"
        row = report["results"].get(impl)
        if row is None:
            continue
        measured = row[f"{target.pass_}_ratio_gemm"]
        if target.basis == "active":
            measured *= row["flops"] / row["flops_active"]
        met = measured <= target.limit
        rows.append(
            {
                "target": target.name,
                "impl": impl,
                "pass": target.pass_,
                "basis": target.basis,
                "measured": measured,
                "limit": target.limit,
                "met": met,
                "reason": None if met else _reason(target, impl, report, measured),
                "would_take": None if met else target.would_take,
            }
        )
    return rows


def format_targets(rows: list[dict[str, Any]]) -> str:
    """The targets section of the printed report."""
    lines = [f"{'target':<36} {'impl':<11} {'measured':>8} {'limit':>6}  met"]
    for r in rows:
        lines.append(
            f"{r['target']:<36} {r['impl']:<11} {r['measured']:>8.2f} {r['limit']:>6.2f}  "
            f"{'yes' if r['met'] else 'NO'}"
        )
        if r["reason"]:
            lines.append(f"  measured reason: {r['reason']}")
        if r["would_take"]:
            lines.append(f"  would take: {r['would_take']}")
    lines.append(
        "(measured = layer / GEMM-equivalent of its executed FLOPs, or of its active FLOPs for "
        "basis 'active': the GEMM time scaled by active/executed FLOPs)"
    )
    return "\n".join(lines)
