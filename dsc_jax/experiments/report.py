"""Latency, aggregation over seeds, the Table-1-style markdown, the JSON and the plots."""

from __future__ import annotations

import functools
import logging
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from dsc_jax import paper
from dsc_jax._storage import save_figure_atomically, write_atomically, write_json_atomically
from dsc_jax.experiments.presets import METHOD_NAMES
from dsc_jax.experiments.runner import (
    REFERENCE_VARIANTS,
    Run,
    read_done,
    read_metrics,
    vocab_size_of,
)
from dsc_jax.timing import summarize, time_round_robin

logger = logging.getLogger("dsc_jax.experiments")


def measure_latency(
    runs: Sequence[Run], rounds: int = 30, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Eval-forward latency per batch (``eval_batch_size × seq_len`` tokens, deterministic)
    of one trained run per variant, in this process: compiled once, ``block_until_ready``,
    variants interleaved round-robin, median (and IQR) over ``rounds``.

    A variant none of whose finished runs still has a checkpoint (e.g. a fresh clone: the
    checkpoints are not committed) is timed on freshly initialised parameters of its config,
    with one warning and ``"params": "init"`` in its entry (the forward's cost depends on the
    shapes; for a routed layer the routing at init is near uniform)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from dsc_jax.loading import RunNotFoundError, load_model
    from dsc_jax.models.gpt import GPT
    from dsc_jax.train import config as config_lib

    fns = {}
    for run in runs:
        name = run.variant.name
        if name in fns or read_done(run.workdir) is None:
            continue
        try:  # any finished seed of the variant will do; its checkpoints may be gone
            loaded = load_model(run.workdir)
        except RunNotFoundError as err:
            logger.warning("latency of %s: skipping %s (%s)", name, run.workdir, err)
            continue
        fns[name] = _compiled_forward(run, loaded.config, loaded.params)
    init_params = []
    for run in runs:  # variants with no checkpoint left: initialised parameters
        name = run.variant.name
        if name in fns or read_done(run.workdir) is None:
            continue
        model_cfg = config_lib.model_config(run.config, vocab_size=vocab_size_of(run.config))
        params = GPT(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        fns[name] = _compiled_forward(run, model_cfg, nn.unbox(params["params"]))
        init_params.append(name)
    if init_params:
        logger.warning(
            "latency of %s: no finished run with a checkpoint; timed on initialised parameters",
            init_params,
        )
    runners = {name: functools.partial(fn, *args) for name, (fn, *args) in fns.items()}
    times = time_round_robin(runners, iters=rounds, warmup=warmup, log=None) if runners else {}
    out = {}
    for name, ts in times.items():
        lat = summarize(ts)
        out[name] = {
            "ms": lat.ms,
            "ms_q1": lat.q1,
            "ms_q3": lat.q3,
            "rounds": lat.rounds,
            "params": "init" if name in init_params else "trained",
        }
    return out


def _compiled_forward(run: Run, model_cfg: Any, params: Any) -> tuple[Any, Any, Any]:
    """``(compiled eval forward, params, tokens)`` of one run's eval batch."""
    import jax
    import jax.numpy as jnp

    from dsc_jax.models.gpt import GPT

    cfg = run.config
    batch = cfg.eval_batch_size or cfg.batch_size // cfg.micro_batches
    tokens = jax.random.randint(
        jax.random.key(0), (batch, cfg.seq_len), 0, model_cfg.vocab_size, jnp.int32
    )
    model = GPT(model_cfg)
    fwd = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
    return fwd.lower(params, tokens).compile(), params, tokens


def _eval_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]


def _layer_mean(record: dict[str, Any], stat: str) -> float | None:
    vals = [v for k, v in record.items() if k.startswith("diag/") and k.endswith("/" + stat)]
    return float(np.mean(vals)) if vals else None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: Sequence[Run], latency: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-variant rows: parameters, final eval loss per seed, mean ± std, latency,
    speed-up vs MoE, difference to DSC and whether it exceeds the seed-to-seed spread."""
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        name = run.variant.name
        row = rows.setdefault(
            name,
            {
                "variant": name,
                "kind": run.variant.kind,
                "method": METHOD_NAMES.get(name, name),
                "total_params": run.sizes["total_params"],
                "active_params": run.sizes["active_params"],
                "ffn": dict(run.sizes["ffn"]),
                "seeds": {},
                "curves": {},
                "diag": {},
                "configs": {},
                "unfinished": [],
            },
        )
        records = read_metrics(run.workdir)
        row["configs"][run.seed] = run.config.to_dict()
        row["curves"][run.seed] = _eval_curve(records)
        done = read_done(run.workdir)
        if done is None:
            row["unfinished"].append(run.seed)
            continue
        row["seeds"][run.seed] = done["final"]["eval_loss"]
        if run.variant.kind == "dsc":
            row["diag"][run.seed] = [
                {
                    "step": r["step"],
                    **{s: _layer_mean(r, s) for s in DSC_STATS},
                }
                for r in records
                if r.get("eval_loss") is not None
            ]
    refs = [rows[n] for n in REFERENCE_VARIANTS if n in rows]
    dsc_rows = [r for r in rows.values() if r["kind"] == "dsc"]
    ref = (refs or dsc_rows or [None])[0]
    moe_ms = latency.get("moe", {}).get("ms")
    for row in rows.values():
        losses = list(row["seeds"].values())
        row["val_loss_mean"], row["val_loss_std"] = _mean_std(losses) if losses else (None, None)
        row["n_seeds"] = len(losses)
        lat = latency.get(row["variant"], {})
        row["latency"] = lat
        row["speedup_vs_moe"] = moe_ms / lat["ms"] if lat and moe_ms else None
    for row in rows.values():
        if ref is None or row is ref or not ref["n_seeds"] or not row["n_seeds"]:
            row["delta_vs_dsc"] = row["beyond_spread"] = None
            continue
        delta = row["val_loss_mean"] - ref["val_loss_mean"]
        row["delta_vs_dsc"] = delta
        # |Δ| larger than the two seed std's added: the ±1 std intervals do not overlap.
        row["beyond_spread"] = abs(delta) > row["val_loss_std"] + ref["val_loss_std"]
    return {"rows": list(rows.values()), "reference": ref["variant"] if ref else None}


#: Per-layer DSC diagnostics kept per evaluation (means over layers; see
#: :mod:`dsc_jax.train.diagnostics`).
DSC_STATS = ("usage_entropy_norm", "used_frac", "signal_collapse_frac", "erank_u", "erank_v")


def dsc_routing_table(summary: dict[str, Any]) -> str:
    """Markdown: each DSC row's routing at its last evaluation, mean over seeds (empty when
    no DSC run has diagnostics)."""
    lines = []
    for r in summary["rows"]:
        finals = [ds[-1] for ds in r.get("diag", {}).values() if ds]
        if r["kind"] != "dsc" or not finals:
            continue
        cells = []
        for stat in ("used_frac", "usage_entropy_norm", "signal_collapse_frac", "erank_u"):
            values = [f[stat] for f in finals if f.get(stat) is not None]
            cells.append(f"{float(np.mean(values)):.3f}" if values else "—")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join(
        [
            "### DSC routing at the last evaluation (mean over seeds and layers)",
            "",
            "| method | atoms used | usage entropy / ln M | tokens gated off (S < 0.1) "
            "| effective rank of U |",
            "|---|---|---|---|---|",
            *lines,
            "",
            "atoms used: fraction of the bank selected at least once on the validation "
            "windows; S: the router signal (sum of the K softplus logits), below 0.1 the "
            "dynamic path is gated to ~0.",
            "",
        ]
    )


def _m(x: float) -> str:
    return f"{x / 1e6:.3f} M"


def markdown(summary: dict[str, Any], title: str, command: str, description: str) -> str:
    ref = summary["reference"] or "DSC"
    ref = METHOD_NAMES.get(ref, ref)
    lines = [
        f"## {title}",
        "",
        description,
        "",
        f"Command: `{command}`",
        "",
        "| method | total | active | val loss (mean ± std) | seeds | latency ms/batch "
        f"| speed-up vs MoE | Δ loss vs {ref} | Δ beyond seed spread? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        loss = f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}" if r["n_seeds"] else "—"
        lat = f"{r['latency']['ms']:.2f}" if r["latency"] else "—"
        sp = f"{r['speedup_vs_moe']:.2f}×" if r["speedup_vs_moe"] else "—"
        delta = "(ref)" if r["variant"] == summary["reference"] else "—"
        if r["delta_vs_dsc"] is not None:
            delta = f"{r['delta_vs_dsc']:+.4f}"
        beyond = {True: "yes", False: "no", None: "—"}[r["beyond_spread"]]
        seeds = f"{r['n_seeds']}" + (
            f" (+{len(r['unfinished'])} unfinished)" if r["unfinished"] else ""
        )
        lines.append(
            f"| {r['method']} | {_m(r['total_params'])} | {_m(r['active_params'])} "
            f"| {loss} | {seeds} | {lat} | {sp} | {delta} | {beyond} |"
        )
    lines += [
        "",
        "val loss: final evaluation (cross-entropy, nats/token) on the same fixed "
        "validation windows for every run; std is the sample std over seeds. Latency: "
        "median over interleaved rounds of one compiled eval forward pass (batch × T "
        "tokens) in one process. Speed-up vs MoE = MoE ms / method ms. 'Beyond seed "
        f"spread': |Δ| > std(method) + std({ref}).",
        "",
    ]
    untrained = [r["method"] for r in summary["rows"] if r["latency"].get("params") == "init"]
    if untrained:  # no checkpoint left (not committed): timed on initialised parameters
        lines[-1:-1] = [
            f"Latency of {', '.join(untrained)}: timed on initialised parameters (no "
            "checkpoint of a finished run was left).",
        ]
    return "\n".join(lines)


def paper_table() -> str:
    lines = [
        "| method (paper Table 1) | total | active | val loss | latency ms/batch |",
        "|---|---|---|---|---|",
    ]
    for key, r in paper.TABLE_1.items():
        lines.append(
            f"| {METHOD_NAMES[key]} | {r['total'] / 1e6:.2f} M | "
            f"{r['active'] / 1e6:.2f} M | {r['val_loss'][0]:.3f} ± "
            f"{r['val_loss'][1]:.3f} | {r['ms']:.2f} |"
        )
    return "\n".join(lines)


def _band(ax, curves: dict[Any, list], label: str) -> None:
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves.values() if c]))
    if not steps:
        return
    vals = np.array([[dict(c)[s] for s in steps] for c in curves.values() if c])
    mean, std = vals.mean(0), (vals.std(0, ddof=1) if len(vals) > 1 else 0 * vals[0])
    (line,) = ax.plot(steps, mean, label=f"{label} (n={len(vals)})")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())


def plots(summary: dict[str, Any], folder: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in summary["rows"]:
        _band(ax, {s: c for s, c in r["curves"].items() if c}, r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{title}: eval loss, mean ± std over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(folder, "convergence.png")
    save_figure_atomically(fig, path, dpi=120)
    plt.close(fig)
    written.append(path)
    dsc_rows = [r for r in summary["rows"] if r["kind"] == "dsc" and r["diag"]]
    if dsc_rows:
        stats = ("usage_entropy_norm", "used_frac", "erank_u")
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, stat in zip(axes, stats, strict=True):
            for r in dsc_rows:
                curves = {
                    s: [(d["step"], d[stat]) for d in ds if d[stat] is not None]
                    for s, ds in r["diag"].items()
                }
                _band(ax, curves, r["method"])
            ax.set_title(f"DSC bank: {stat} (mean over layers)")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        path = os.path.join(folder, "dsc_bank.png")
        save_figure_atomically(fig, path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    summary: dict[str, Any],
    folder: str,
    title: str,
    command: str,
    description: str,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    md = markdown(summary, title, command, description)
    md_path = os.path.join(folder, "comparison.md")
    routing = dsc_routing_table(summary)
    write_atomically(
        md_path,
        md
        + (f"\n{routing}" if routing else "")
        + "\n### Paper (Table 1, T4 GPU, 35 M / 28 M, WikiText-103)\n\n"
        + paper_table()
        + "\n",
    )
    js_path = os.path.join(folder, "comparison.json")
    payload = {
        "title": title,
        "command": command,
        "description": description,
        **(extra or {}),
        **summary,
        "paper_table_1": paper.TABLE_1,
    }
    write_json_atomically(js_path, payload, indent=1, default=str)
    return [md_path, js_path, *plots(summary, folder, title)]
