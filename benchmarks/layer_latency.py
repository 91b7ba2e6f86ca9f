"""Per-layer FFN latency: DSC vs MoE vs MoLoRA vs Dense, each against a same-FLOPs GEMM.

At the paper's configuration (input ``16×256×384``; the paper's iso-parameter sizes, taken
from the per-kind config defaults) this times, for every implementation, the median
forward and forward+backward latency of one jit-compiled layer, and the same for a
"GEMM-equivalent": one ``[N, d] × [d, F / (2 N d)]`` matmul whose FLOPs ``F`` equal the forward
matmul FLOPs the implementation executes (formulas in :func:`build_implementations`). The
ratio ``layer / GEMM-equivalent`` says how far the layer runs from matmul efficiency; the ratio
``layer / Dense`` is the paper's latency comparison.

Timing protocol: parameters, inputs and cotangents are placed on the device first; every
function is compiled ahead of time (compile time reported separately); then ``--warmup`` and
``--iters`` rounds run round-robin over the implementations, each implementation's forward and
forward+backward right next to its GEMM-equivalent's (the block order rotating by one and
reversing every round), so machine noise hits every implementation alike. Each call is blocked
with ``block_until_ready``. Times are medians over rounds; ratios are medians over rounds of
the ratio of two times measured in the same round (robust to load that drifts between rounds).

The forward+backward pass is the VJP of the layer w.r.t. its parameters and its input with a
fixed random cotangent (the gradient of ``Σ y ⊙ c``); a constant all-ones cotangent (the plain
gradient of ``Σ y``) would let XLA turn the first backward matmul into a reduction.

By default the ``"losses"`` collection is immutable (the inference path: no regulariser is
computed) and the layers run with ``deterministic=True``. ``--with_losses`` times the training
path instead: ``deterministic=False`` (MoE logit jitter) with the ``"losses"`` collection
mutable, and the weighted regulariser total (the paper's weights,
``dsc_jax.paper.LOSS_WEIGHTS``) added to the objective.

Code: FLOP formulas and the timed layers in ``flops.py``, compilation and interleaved
timing in ``harness.py``, the per-part breakdowns in ``dsc_breakdown.py`` and
``moe_breakdown.py``, the performance targets in ``targets.py``; this script builds the table.
With ``dsc_gather`` (``moe_sorted``) selected, the DSC parts (router, top-K, contraction,
static FFN, regularisers) and the MoE parts (router, dispatch, weight gather, expert matmuls,
combine) are timed in the same rounds (``breakdown`` in the JSON: each part's time, its share
of the layer's and its ratio to the layer's GEMM-equivalent), and the targets section prints
each target's measured value and, when missed, the measured reason and what it would take.

Usage::

    python -m benchmarks.layer_latency                      # paper config, float32, CPU
    python -m benchmarks.layer_latency --dtype bfloat16     # on a GPU
    python -m benchmarks.layer_latency --only dsc --set dsc_num_bases=256   # sweep M
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import dsc_breakdown, moe_breakdown, targets
from benchmarks.flops import IMPLEMENTATIONS, LayerSizes, build_implementations, gemm_columns
from benchmarks.harness import (
    FAST_COMPILE_OPTIONS,
    Key,
    compile_runner,
    gemm_functions,
    layer_functions,
    paired_ratio,
    time_round_robin,
)
from dsc_jax.layers.dsc import AUTO_DENSE_MAX_BASES_PER_ACTIVE, resolve_compute
from dsc_jax.layers.moe import expert_capacity, resolve_dispatch

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

REFERENCE = "dense"  # always timed: every ``*_ratio_dense`` divides by it
PASSES = ("fwd", "fwd_bwd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_OUT = _REPO_ROOT / "benchmarks" / "results" / "layer_latency.json"
#: Implementations timed part by part (same rounds as the layers): name -> parts builder.
BREAKDOWNS = {"dsc_gather": dsc_breakdown.parts, "moe_sorted": moe_breakdown.parts}
__all__ = ["IMPLEMENTATIONS", "LayerSizes", "main", "run_benchmark", "select"]


def select(only: str | None) -> list[str]:
    """Implementations named by ``--only`` (comma-separated names or prefixes such as ``moe``),
    plus :data:`REFERENCE`; all of them when ``only`` is empty."""
    if not only:
        return list(IMPLEMENTATIONS)
    chosen: set[str] = {REFERENCE}
    for token in (t.strip() for t in only.split(",")):
        matches = [name for name in IMPLEMENTATIONS if name == token or name.startswith(token)]
        if not token or not matches:
            raise ValueError(
                f"--only token {token!r} matches no implementation; expected names or prefixes "
                f"of {IMPLEMENTATIONS}."
            )
        chosen.update(matches)
    return [name for name in IMPLEMENTATIONS if name in chosen]


def run_benchmark(
    *,
    batch: int,
    seq: int,
    d_model: int,
    dtype: str,
    param_dtype: str,
    iters: int,
    warmup: int,
    only: str | None,
    sizes: LayerSizes,
    with_losses: bool,
    seed: int = 0,
    flat_input: bool = False,
    fast_compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time the selected implementations; returns the JSON-ready result (see module doc).

    ``flat_input`` feeds the layers ``x`` as ``[batch·seq, d]`` instead of ``[batch, seq, d]``.
    ``fast_compile`` turns XLA's backend optimisation off (smoke tests: quick to compile,
    timings meaningless).
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters={iters} must be >= 1 and warmup={warmup} >= 0.")
    compute_dtype, store_dtype = DTYPES[dtype], DTYPES[param_dtype]
    num_tokens = batch * seq
    names = select(only)
    impls = build_implementations(sizes, num_tokens, d_model, compute_dtype, store_dtype)
    device = jax.devices()[0]
    options = FAST_COMPILE_OPTIONS if fast_compile else None

    key_x, key_c, key_rng, key_init = jax.random.split(jax.random.key(seed), 4)
    shape = (num_tokens, d_model) if flat_input else (batch, seq, d_model)
    x = jax.device_put(jax.random.normal(key_x, shape, compute_dtype), device)
    cotangent = jax.device_put(jax.random.normal(key_c, shape, jnp.float32), device)
    x_flat = x.reshape(num_tokens, d_model)

    runners: dict[Key, Callable[[], Any]] = {}
    blocks: list[list[Key]] = []
    compile_s: dict[str, dict[str, float]] = {}
    gemm_cols: dict[str, int] = {}
    gemm_runners: dict[int, dict[str, Callable[[], Any]]] = {}  # compiled once per width
    layer_params: dict[str, Any] = {}  # each layer's parameters, reused by its parts
    gemm_fwd, gemm_fwd_bwd = gemm_functions()
    for name in names:
        impl = impls[name]
        log(f"compiling {name} ...")
        init, _ = compile_runner(
            jax.jit(impl.module.init), {"params": key_init}, x, options=options
        )
        params = jax.device_put(nn.unbox(init()["params"]), device)
        layer_params[name] = params
        fwd, fwd_bwd = layer_functions(impl.module, with_losses)
        runners[(name, "fwd")], t_fwd = compile_runner(fwd, params, x, key_rng, options=options)
        runners[(name, "fwd_bwd")], t_bwd = compile_runner(
            fwd_bwd, params, x, key_rng, cotangent, options=options
        )
        compile_s[name] = {"fwd": round(t_fwd, 3), "fwd_bwd": round(t_bwd, 3)}

        cols = gemm_columns(impl.flops, num_tokens, d_model)
        gemm_cols[name] = cols
        if cols not in gemm_runners:
            w = jax.random.normal(jax.random.fold_in(key_init, cols), (d_model, cols)) * 0.02
            w = jax.device_put(w.astype(compute_dtype), device)
            gemm_cot = jax.random.normal(jax.random.fold_in(key_c, cols), (num_tokens, cols))
            gemm_cot = jax.device_put(gemm_cot, device)
            gemm_runners[cols] = {
                "fwd": compile_runner(gemm_fwd, x_flat, w, options=options)[0],
                "fwd_bwd": compile_runner(gemm_fwd_bwd, x_flat, w, gemm_cot, options=options)[0],
            }
        gemm = f"gemm:{name}"
        for kind in PASSES:
            runners[(gemm, kind)] = gemm_runners[cols][kind]
        blocks.append([(name, "fwd"), (gemm, "fwd"), (name, "fwd_bwd"), (gemm, "fwd_bwd")])

    breakdown_parts: dict[str, list[str]] = {}
    for name, build_parts in BREAKDOWNS.items():
        if name not in names:
            continue
        log(f"compiling the parts of {name} ...")
        breakdown_parts[name] = []
        for part, (fwd, fwd_bwd, args, bwd_args) in build_parts(
            impls[name].module, layer_params[name], x, key_rng
        ).items():
            timer = f"part:{name}:{part}"
            runners[(timer, "fwd")] = compile_runner(fwd, *args, options=options)[0]
            block = [(timer, "fwd")]  # ratios pair it with its GEMM's call of the same round
            if fwd_bwd is not None:
                runners[(timer, "fwd_bwd")] = compile_runner(fwd_bwd, *bwd_args, options=options)[0]
                block.append((timer, "fwd_bwd"))
            blocks.append(block)
            breakdown_parts[name].append(part)

    log(f"timing {len(runners)} functions: {warmup} warm-up + {iters} timed rounds ...")
    samples = time_round_robin(runners, blocks, iters, warmup, log)

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        impl = impls[name]
        entry: dict[str, Any] = {}
        for kind in PASSES:
            mine, gemm = samples[(name, kind)], samples[(f"gemm:{name}", kind)]
            entry[f"{kind}_ms"] = statistics.median(mine)
            entry[f"{kind}_min_ms"] = min(mine)
            entry[f"{kind}_ratio_gemm"] = paired_ratio(mine, gemm)
            entry[f"{kind}_ratio_dense"] = paired_ratio(mine, samples[(REFERENCE, kind)])
            entry[f"gemm_{kind}_ms"] = statistics.median(gemm)
            entry[f"gemm_{kind}_min_ms"] = min(gemm)
        entry.update(
            flops=impl.flops,
            flops_active=impl.flops_active,
            flops_formula=impl.formula,
            gemm_shape=[num_tokens, d_model, gemm_cols[name]],
            compile_s=compile_s[name],
        )
        results[name] = entry

    breakdown: dict[str, dict[str, dict[str, float]]] = {}
    for name, part_names in breakdown_parts.items():
        breakdown[name] = {}
        for part in part_names:
            entry = {}
            for kind in PASSES:
                mine = samples.get((f"part:{name}:{part}", kind))
                if mine:
                    entry[f"{kind}_ms"] = statistics.median(mine)
                    entry[f"{kind}_share"] = paired_ratio(mine, samples[(name, kind)])
                    entry[f"{kind}_ratio_gemm"] = paired_ratio(
                        mine, samples[(f"gemm:{name}", kind)]
                    )
            breakdown[name][part] = entry

    meta = {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "dtype": dtype,
        "param_dtype": param_dtype,
        "input_shape": [batch, seq, d_model],
        "flat_input": flat_input,
        "num_tokens": num_tokens,
        "sizes": dataclasses.asdict(sizes),
        "moe_capacity": expert_capacity(
            sizes.moe_capacity_factor, num_tokens, sizes.moe_top_k, sizes.moe_num_experts
        ),
        "dsc_auto_resolves_to": resolve_compute("auto", sizes.dsc_num_bases, sizes.dsc_top_k),
        "dsc_auto_dense_max_bases_per_active": AUTO_DENSE_MAX_BASES_PER_ACTIVE,
        "moe_auto_resolves_to": resolve_dispatch(
            "auto", sizes.moe_num_experts, sizes.moe_top_k, device.platform, num_tokens
        ),
        "iters": iters,
        "warmup": warmup,
        "with_losses": with_losses,
        "fast_compile": fast_compile,
        "statistic": (
            "*_ms: median over iters of block_until_ready calls, interleaved round-robin; "
            "*_ratio_*: median over rounds of the per-round ratio"
        ),
        "fwd_bwd": "VJP w.r.t. params and x with a fixed random cotangent",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    report = {"metadata": meta, "results": results, "breakdown": breakdown}
    report["targets"] = targets.evaluate(report)
    return report


def format_table(report: dict[str, Any]) -> str:
    """Fixed-width table of the results."""
    header = (
        f"{'impl':<13} {'GFLOP':>7} {'gemm N×d×F':>16} {'fwd ms':>9} {'gemm ms':>9} "
        f"{'/gemm':>6} {'/dense':>6} {'f+b ms':>9} {'gemm ms':>9} {'/gemm':>6} {'/dense':>6}"
    )
    lines = [header, "-" * len(header)]
    for name, r in report["results"].items():
        shape = "×".join(str(v) for v in r["gemm_shape"])
        lines.append(
            f"{name:<13} {r['flops'] / 1e9:>7.2f} {shape:>16} "
            f"{r['fwd_ms']:>9.2f} {r['gemm_fwd_ms']:>9.2f} "
            f"{r['fwd_ratio_gemm']:>6.2f} {r['fwd_ratio_dense']:>6.2f} "
            f"{r['fwd_bwd_ms']:>9.2f} {r['gemm_fwd_bwd_ms']:>9.2f} "
            f"{r['fwd_bwd_ratio_gemm']:>6.2f} {r['fwd_bwd_ratio_dense']:>6.2f}"
        )
    meta = report["metadata"]
    lines.append(
        f"device {meta['device_kind']} ({meta['platform']}), jax {meta['jax_version']}, "
        f"{meta['dtype']} (params {meta['param_dtype']}), input {meta['input_shape']}"
        f"{' flattened' if meta['flat_input'] else ''}, "
        f"median of {meta['iters']} (+{meta['warmup']} warm-up), losses "
        f"{'on' if meta['with_losses'] else 'off'}, dsc auto -> {meta['dsc_auto_resolves_to']}"
    )
    for name, parts in report.get("breakdown", {}).items():
        lines.append("")
        lines.append(
            f"{name + ' part':<18} {'fwd ms':>8} {'/layer':>7} {'/gemm':>6} "
            f"{'f+b ms':>8} {'/layer':>7} {'/gemm':>6}"
        )
        for part, r in parts.items():
            cells = []
            for kind in PASSES:
                if f"{kind}_ms" in r:
                    cells.append(
                        f"{r[f'{kind}_ms']:>8.2f} {r[f'{kind}_share']:>7.2f} "
                        f"{r[f'{kind}_ratio_gemm']:>6.2f}"
                    )
                else:
                    cells.append(f"{'-':>8} {'-':>7} {'-':>6}")
            lines.append(f"{part:<18} {' '.join(cells)}")
    if report.get("targets"):
        lines += ["", targets.format_targets(report["targets"])]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d_model", type=int, default=384)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--param_dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated names or prefixes of {IMPLEMENTATIONS}; '{REFERENCE}' always runs",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a layer size, e.g. dsc_num_bases=256 (fields of LayerSizes)",
    )
    parser.add_argument(
        "--with_losses",
        action="store_true",
        help="training path: losses collection mutable, deterministic=False",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flat_input",
        action="store_true",
        help="feed x as [batch*seq, d] instead of [batch, seq, d]",
    )
    parser.add_argument(
        "--fast_compile",
        action="store_true",
        help="XLA backend optimisation off: for smoke tests only, timings are meaningless",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the report."""
    args = parse_args(argv)
    sizes = LayerSizes.paper().replace(args.set)
    report = run_benchmark(
        batch=args.batch,
        seq=args.seq,
        d_model=args.d_model,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        iters=args.iters,
        warmup=args.warmup,
        only=args.only,
        sizes=sizes,
        with_losses=args.with_losses,
        seed=args.seed,
        flat_input=args.flat_input,
        fast_compile=args.fast_compile,
    )
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
