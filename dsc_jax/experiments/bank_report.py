"""The summary table and the plot of :mod:`dsc_jax.experiments.bank_dynamics`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dsc_jax._storage import save_figure_atomically

TABLE_WINDOW = 100  # steps averaged for the table's first/last angular rate


# --------------------------------------------------------------------------- summary, plot


def _window_mean(dyn: Mapping[str, Any], series: str, lo: int, hi: int) -> float:
    values = [
        v
        for s, v in zip(dyn["step"], dyn[series]["all"], strict=True)
        if lo < s <= hi  # intervals ending in (lo, hi]
    ]
    return float(np.mean(values)) if values else float("nan")


def summarise(runs: Mapping[str, Any], total: int) -> list[dict[str, Any]]:
    """One row per run: mean angular rate over the first and last :data:`TABLE_WINDOW` steps,
    final row norm, last evaluation's used / gated-off fractions and validation loss."""
    window = min(TABLE_WINDOW, total)
    rows = []
    for name, r in runs.items():
        dyn, last = r["dynamics"], r["eval"][-1]
        rows.append(
            {
                "variant": name,
                "first_window": [0, window],
                "last_window": [total - window, total],
                "angle_first": _window_mean(dyn, "angle_per_step", 0, window),
                "angle_last": _window_mean(dyn, "angle_per_step", total - window, total),
                "step_angle_first": _window_mean(dyn, "step_angle", 0, window),
                "step_angle_last": _window_mean(dyn, "step_angle", total - window, total),
                "update_abs_first": _window_mean(dyn, "update_abs", 0, window),
                "update_abs_last": _window_mean(dyn, "update_abs", total - window, total),
                "row_norm_init": r["row_norm_init"]["all"],
                "row_norm_final": dyn["row_norm"]["all"][-1],
                "used_frac": last["used_frac"],
                "gated_off_frac": last["signal_collapse_frac"],
                "usage_entropy_norm": last["usage_entropy_norm"],
                "eval_loss": last["eval_loss"],
            }
        )
    return rows


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a fixed-width text table."""
    if not rows:
        return ""
    (a0, a1), (b0, b1) = rows[0]["first_window"], rows[0]["last_window"]
    head = (
        f"{'variant':<20} {f'rad/step {a0}-{a1}':>16} {f'rad/step {b0}-{b1}':>16} "
        f"{'1-step rad':>11} {f'|Δ|/coord {a0}-{a1}':>17} {f'|Δ|/coord {b0}-{b1}':>17} "
        f"{'norm init':>9} {'norm final':>10} {'used':>6} {'gated off':>9} {'val loss':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<20} {r['angle_first']:>16.4g} {r['angle_last']:>16.4g} "
            f"{r['step_angle_last']:>11.4g} {r['update_abs_first']:>17.3g} "
            f"{r['update_abs_last']:>17.3g} {r['row_norm_init']:>9.4g} "
            f"{r['row_norm_final']:>10.4g} {r['used_frac']:>6.3f} {r['gated_off_frac']:>9.3f} "
            f"{r['eval_loss']:>8.4f}"
        )
    lines.append(
        "rad/step: mean over atoms of angle(row at t-Δ, row at t)/Δ, averaged over the window; "
        "1-step rad: mean single-step angle over the last window; |Δ|/coord: mean |Adam "
        "update| per raw coordinate before retraction; used, gated off (S < 0.1), val loss: "
        "last evaluation."
    )
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: str) -> str:
    """The six-panel figure (one line per run; dotted: single-step angle, learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ax_angle, ax_norm, ax_step, ax_used, ax_gate, ax_loss = axes.ravel()
    for i, (name, r) in enumerate(result["runs"].items()):
        color = f"C{i}"
        dyn = r["dynamics"]
        label = r["label"]
        ax_angle.plot(dyn["step"], dyn["angle_per_step"]["all"], color=color, label=label)
        ax_angle.plot(dyn["step"], dyn["step_angle"]["all"], color=color, ls=":", lw=1.2)
        norm_steps = [0, *dyn["step"]]
        for bank, ls in (("u", "-"), ("v", "--")):
            norms = [r["row_norm_init"][bank], *dyn["row_norm"][bank]]
            ax_norm.plot(norm_steps, norms, color=color, ls=ls, label=f"{name} {bank}")
        ax_step.plot(dyn["step"], dyn["update_abs"]["all"], color=color, label=name)
        ev = r["eval"]
        steps = [e["step"] for e in ev]
        ax_used.plot(steps, [e["used_frac"] for e in ev], color=color, marker="o", ms=3, label=name)
        ax_gate.plot(steps, [e["signal_collapse_frac"] for e in ev], color=color, marker="o", ms=3)
        ax_loss.plot(steps, [e["eval_loss"] for e in ev], color=color, marker="o", ms=3)
    one = next(iter(result["runs"].values()))
    first = one["dynamics"]
    ax_step.plot(first["step"], first["lr"], color="k", ls=":", label="learning rate")
    ax_angle.set_yscale("log")
    ax_angle.set_title(
        f"atom turning rate (rad/step; solid: over Δ={result['delta']}, dotted: 1 step)"
    )
    ax_angle.legend(fontsize=8)
    ax_norm.set_yscale("log")
    ax_norm.set_title("mean raw row norm ‖û_j‖ (solid u, dashed v)")
    ax_norm.legend(fontsize=7, ncol=2)
    ax_step.set_yscale("log")
    ax_step.set_title("mean |Adam update| per raw coordinate (pre-retraction)")
    ax_step.legend(fontsize=8)
    ax_used.set_title("fraction of atoms used (validation)")
    ax_used.set_ylim(0, 1.02)
    ax_used.legend(fontsize=8)
    ax_gate.set_title("fraction of tokens gated off (S < 0.1)")
    ax_gate.set_ylim(-0.02, 1.02)
    ax_loss.set_title("validation loss (nats/token)")
    for ax in axes.ravel():
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(
        f"DSC bank dynamics, preset {result['preset']}, seed {result['seed']} (d={one['d_model']}, "
        f"M={one['num_bases']} atoms; means over atoms, layers and the u, v banks)"
    )
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=110)
    plt.close(fig)
    return path
