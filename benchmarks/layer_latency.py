"""Per-layer FFN latency: DSC vs MoE vs MoLoRA vs Dense, each against a same-FLOPs GEMM.

At the paper's configuration (input ``16×256×384``; spec §6/§9 sizes, taken from the
:mod:`dsc_jax.layers.configs` defaults) this times, for every implementation, the median
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
mutable, and the weighted regulariser total (spec §3 weights) added to the objective.

Usage::

    python benchmarks/layer_latency.py                      # paper config, float32, CPU
    python benchmarks/layer_latency.py --dtype bfloat16     # on a GPU
    python benchmarks/layer_latency.py --only dsc --set dsc_num_bases=256   # sweep M
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
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsc_jax.layers.configs import FFN_CONFIGS  # noqa: E402
from dsc_jax.layers.dense import DenseFFN  # noqa: E402
from dsc_jax.layers.dsc import AUTO_DENSE_MAX_BASES_PER_ACTIVE, DSCLayer, resolve_compute  # noqa: E402
from dsc_jax.layers.losses import LossWeights, regularization_loss  # noqa: E402
from dsc_jax.layers.moe import MoELayer, expert_capacity  # noqa: E402
from dsc_jax.layers.molora import MoLoRALayer  # noqa: E402

IMPLEMENTATIONS = (
    "dsc_gather",
    "dsc_dense",
    "moe_dense",
    "moe_dropless",
    "moe_capacity",
    "molora",
    "dense",
)
REFERENCE = "dense"  # always timed: every ``*_ratio_dense`` divides by it
PASSES = ("fwd", "fwd_bwd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FAST_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
DEFAULT_OUT = _REPO_ROOT / "benchmarks" / "results" / "layer_latency.json"


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
        :func:`dsc_jax.solve_iso_active` at the same 35 M / 28 M budgets."""
        defaults = {
            f"{kind}_{name}": value
            for kind, ffn in FFN_CONFIGS.items()
            for name, value in ffn().to_dict().items()
        }
        return cls(**{field.name: defaults[field.name] for field in dataclasses.fields(cls)})

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
      einsum) + ``2·N·E·d``; ``dropless``: ``4·N·k·d·H_e`` (ragged dots over the ``N·k`` slots)
      + combine ``2·N·k·d``; ``capacity``: ``4·E·C·d·H_e`` with ``C = ceil(cf·N·k/E)`` + combine
      ``2·N·k·d``.
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
    active = gate + 4 * n * k * d * h + 2 * n * k * d
    for mode, flops, text in (
        (
            "dense",
            gate + 4 * e * n * d * h + 2 * n * k * e + 2 * n * e * d,
            "2·N·d·E + 4·E·N·d·H_e + 2·N·k·E + 2·N·E·d",
        ),
        ("dropless", active, "2·N·d·E + 4·N·k·d·H_e + 2·N·k·d"),
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


def layer_functions(
    module: nn.Module, with_losses: bool
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted ``fwd(params, x, key)`` and ``fwd_bwd(params, x, key, cotangent)`` of a layer.

    ``fwd_bwd`` returns the parameter and input gradients of ``Σ y ⊙ cotangent`` (+ the weighted
    regulariser total with ``with_losses``).
    """

    def forward(params: Any, x: jax.Array, key: jax.Array) -> Any:
        if not with_losses:  # inference path: "losses" immutable, nothing computed
            return module.apply({"params": params}, x)
        y, state = module.apply(
            {"params": params},
            x,
            deterministic=False,
            rngs={"dropout": key},
            mutable=["losses"],
        )
        total, _ = regularization_loss(state.get("losses"), LossWeights(), allow_empty=True)
        return y, total

    def forward_backward(params: Any, x: jax.Array, key: jax.Array, cotangent: jax.Array) -> Any:
        out, vjp = jax.vjp(lambda p, inputs: forward(p, inputs, key), params, x)
        if with_losses:
            y, total = out
            return vjp((cotangent.astype(y.dtype), jnp.ones_like(total)))
        return vjp(cotangent.astype(out.dtype))

    return jax.jit(forward), jax.jit(forward_backward)


def gemm_functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted ``fwd(x, w) = x @ w`` and ``fwd_bwd(x, w, cotangent)`` (gradients of ``x`` and
    ``w`` of ``Σ (x @ w) ⊙ cotangent``)."""

    def forward(x: jax.Array, w: jax.Array) -> jax.Array:
        return x @ w

    def forward_backward(x: jax.Array, w: jax.Array, cotangent: jax.Array) -> Any:
        out, vjp = jax.vjp(forward, x, w)
        return vjp(cotangent.astype(out.dtype))

    return jax.jit(forward), jax.jit(forward_backward)


def _compile(
    fn: Callable[..., Any], *args: Any, options: dict[str, Any] | None = None
) -> tuple[Callable[[], Any], float]:
    """Ahead-of-time compile ``fn(*args)`` (XLA ``options``); returns a no-argument runner and
    the compile seconds."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options=options)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - start
    return (lambda: compiled(*args)), seconds


Key = tuple[str, str]  # (timer name, pass)


def time_round_robin(
    runners: dict[Key, Callable[[], Any]],
    blocks: Sequence[Sequence[Key]],
    iters: int,
    warmup: int,
    log: Callable[[str], None] = print,
) -> dict[Key, list[float]]:
    """Milliseconds of ``iters`` blocked calls of every runner, interleaved.

    Every round calls each block of runners (an implementation's passes next to its
    GEMM-equivalent's, so that each pair is measured under the same machine load) once. The
    first block of a round is one later than in the previous round, and odd rounds run each
    block back to front, so neither position nor order favours anyone. The first ``warmup``
    rounds are discarded; ``samples[key][i]`` is round ``i`` for every key.
    """
    samples: dict[Key, list[float]] = {key: [] for block in blocks for key in block}
    start_all = time.perf_counter()
    for rep in range(warmup + iters):
        if rep:
            log(f"  round {rep}/{warmup + iters} done ({time.perf_counter() - start_all:.0f} s)")
        shift = rep % len(blocks)
        for block in [*blocks[shift:], *blocks[:shift]]:
            for key in block if rep % 2 == 0 else reversed(block):
                run = runners[key]
                start = time.perf_counter()
                jax.block_until_ready(run())
                elapsed_ms = (time.perf_counter() - start) * 1e3
                if rep >= warmup:
                    samples[key].append(elapsed_ms)
    return samples


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


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
    gemm_fwd, gemm_fwd_bwd = gemm_functions()
    for name in names:
        impl = impls[name]
        log(f"compiling {name} ...")
        init, _ = _compile(jax.jit(impl.module.init), {"params": key_init}, x, options=options)
        params = jax.device_put(nn.unbox(init()["params"]), device)
        fwd, fwd_bwd = layer_functions(impl.module, with_losses)
        runners[(name, "fwd")], t_fwd = _compile(fwd, params, x, key_rng, options=options)
        runners[(name, "fwd_bwd")], t_bwd = _compile(
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
                "fwd": _compile(gemm_fwd, x_flat, w, options=options)[0],
                "fwd_bwd": _compile(gemm_fwd_bwd, x_flat, w, gemm_cot, options=options)[0],
            }
        gemm = f"gemm:{name}"
        for kind in PASSES:
            runners[(gemm, kind)] = gemm_runners[cols][kind]
        blocks.append([(name, "fwd"), (gemm, "fwd"), (name, "fwd_bwd"), (gemm, "fwd_bwd")])

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
    return {"metadata": meta, "results": results}


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
