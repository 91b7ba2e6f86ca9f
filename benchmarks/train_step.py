"""Training-step throughput: tokens/s, model-FLOPs utilisation and peak memory per FFN kind.

For each FFN kind (dense, moe, molora, dsc; the paper model: ``GPTConfig()`` with the kind's
default config) and each micro-batch ``B × T``, this compiles one full training step
(:func:`dsc_jax.train.steps.train_step`: forward, regularisers, backward, AdamW with the bank
projection; dropout 0.1 as in the paper) with the train state donated
(``jax.jit(..., donate_argnums=0)``), then times it round-robin with a ``n³`` float32 matmul
(default ``2048³``) measured in the same rounds.

* ``tokens/s``: ``B·T`` / median step time.
* ``mfu``: model FLOPs per step (:func:`flops.model_train_flops`: ``6 · active matmul params
  · tokens + 12·L·T·d·tokens``) ÷ median step time ÷ the best matmul FLOP/s of the run (the
  share of the machine's large-matmul rate the step achieves; ``mfu_paired`` divides by the
  same round's matmul rate instead, see :func:`finalize`).
* memory (``compiled.memory_analysis()``): ``peak = argument + temp + output − alias`` bytes
  (with donation the output aliases the state); ``temp`` is the activation/workspace part.
  With ``--remat_compare`` (default) each configuration is also compiled with the other
  remat setting (``full`` when ``--remat none``, else ``none``) and the temp bytes remat saves
  are reported (compile only, not timed).
* breakdown (``--breakdown``, default ``dense``): the step's ``head_ce`` (final LayerNorm +
  tied LM head + cross-entropy), ``optimizer`` (one update) and ``blocks`` (embeddings +
  blocks), each compiled on its own and timed in the step's block of every round (see
  :mod:`step_parts`): ms, share of the same round's step, model FLOPs and MFU.
* targets: "Dense MFU >= 0.6" and "routed kinds >= 0.8x Dense's MFU", measured value, met,
  and when missed the reason and what it would take, computed from the breakdown.

Every round (:func:`harness.time_round_robin`) runs one block per kind: its step, its parts
and two matmuls (the faster counts as the round's matmul); the first block moves by one each
round and odd rounds run each block back to front.

If a step's first (warm-up) call exceeds ``--max_step_s`` the configuration is reported from
that one call (``"slow": true``) and not timed further.

Usage::

    python -m benchmarks.train_step                     # paper model, micro-batches 16 and 8
    python -m benchmarks.train_step --quick             # smaller model for CPUs
    python -m benchmarks.train_step --scan_layers --remat dots
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks import step_parts
from benchmarks.flops import model_active_matmul_params, model_train_flops
from benchmarks.harness import FAST_COMPILE_OPTIONS, Key, time_round_robin
from dsc_jax.layers.configs import DenseConfig, DSCConfig, MoEConfig, MoLoRAConfig
from dsc_jax.layers.losses import LossWeights
from dsc_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from dsc_jax.models.gpt import GPT, GPTConfig
from dsc_jax.train.state import TrainState
from dsc_jax.train.steps import train_step

_HERE = pathlib.Path(__file__).resolve().parent

KINDS = ("dense", "moe", "molora", "dsc")
PAPER_FFN = {
    "dense": DenseConfig(),
    "moe": MoEConfig(),
    "molora": MoLoRAConfig(),
    "dsc": DSCConfig(),
}
# --quick: d=192, L=4, V=8192, T=128, FFNs at half the paper's widths (same K, k, E).
QUICK_MODEL = {"d_model": 192, "num_layers": 4, "num_heads": 6, "vocab_size": 8192}
QUICK_FFN = {
    "dense": DenseConfig(hidden_dim=1305),
    "moe": MoEConfig(hidden_dim=272),
    "molora": MoLoRAConfig(rank=54, hidden_dim=434),
    "dsc": DSCConfig(num_bases=761, hidden_dim=163),
}


def model_config(kind: str, args: argparse.Namespace, remat: str) -> GPTConfig:
    """The GPT of ``kind`` (paper defaults, or the ``--quick`` / ``--tiny`` sizes)."""
    fields: dict[str, Any] = {"max_seq_len": args.seq, "scan_layers": args.scan_layers}
    fields["remat"] = remat
    fields["dtype"] = args.dtype  # compute dtype; parameters stay float32
    if args.attention != "einsum":  # fused attention has no dropout on the probabilities
        fields.update(attention=args.attention, attention_dropout=False)
    if args.dropout is not None:
        fields["dropout_rate"] = args.dropout
    if args.tiny:
        fields.update(d_model=16, num_layers=2, num_heads=2, vocab_size=64)
        ffn = {
            "dense": DenseConfig(hidden_dim=32),
            "moe": MoEConfig(num_experts=4, hidden_dim=8),
            "molora": MoLoRAConfig(num_experts=4, rank=2, hidden_dim=16),
            "dsc": DSCConfig(num_bases=16, hidden_dim=16),
        }[kind]
    elif args.quick:
        fields.update(QUICK_MODEL)
        ffn = QUICK_FFN[kind]
    else:
        ffn = PAPER_FFN[kind]
    return GPTConfig(ffn=ffn, **fields)


def compile_step(cfg: GPTConfig, batch: int, options: dict[str, Any] | None) -> tuple[Any, ...]:
    """``(compiled_step, state, tokens, rng, compile_s)`` for one donated training step."""
    model = GPT(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, cfg.max_seq_len), jnp.int32))["params"]
    state = TrainState.create(
        apply_fn=model.apply, params=nn.unbox(params), tx=optax.adamw(3e-4, weight_decay=0.02)
    )
    tokens = jax.random.randint(
        jax.random.key(1), (batch, cfg.max_seq_len + 1), 0, cfg.vocab_size, jnp.int32
    )
    rng = jax.random.key(2)
    step = jax.jit(functools.partial(train_step, loss_weights=LossWeights()), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, tokens, rng).compile(compiler_options=options)
    return compiled, state, tokens, rng, time.perf_counter() - start


def memory(compiled: Any) -> dict[str, int]:
    """``memory_analysis()`` sizes in bytes, and ``peak = argument + temp + output − alias``."""
    stats = compiled.memory_analysis()
    out = {
        name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
        for name in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["peak"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    return out


def matmul_runner(n: int, options: dict[str, Any] | None) -> Any:
    """A no-argument runner of an ``n³`` float32 matmul."""
    a = jax.random.normal(jax.random.key(3), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(4), (n, n), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=options)
    return lambda: compiled(a, b)


def timed(run: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


def measure_kind(
    kind: str, batch: int, args: argparse.Namespace, options: dict[str, Any] | None, parts: bool
) -> dict[str, Any]:
    """Compile ``kind``'s step at micro-batch ``batch`` (and, with ``parts``, its
    :mod:`step_parts`), run the first step; the entry's ``"runners"`` are ``{"step": ...,
    part: ...}`` no-argument runners (empty when the first step was ``slow``)."""
    cfg = model_config(kind, args, args.remat)
    compiled, state, tokens, rng, compile_s = compile_step(cfg, batch, options)
    entry: dict[str, Any] = {
        "kind": kind,
        "batch": batch,
        "seq": args.seq,
        "compile_s": compile_s,
        "active_matmul_params": model_active_matmul_params(cfg),
        "model_flops": model_train_flops(cfg, batch, args.seq),
        "memory": memory(compiled),
    }
    if args.remat_compare:
        other = "full" if args.remat == "none" else "none"
        other_compiled = compile_step(model_config(kind, args, other), batch, options)[0]
        temps = {args.remat: entry["memory"]["temp"], other: memory(other_compiled)["temp"]}
        del other_compiled
        entry["remat_temp_bytes"] = temps
        remat_key = other if args.remat == "none" else args.remat
        entry["remat_saves_temp_bytes"] = temps["none"] - temps[remat_key]
    # Before the first step: the step donates ``state``, the parts copy it.
    built = (
        step_parts.build_parts(cfg, state, tokens, entry["model_flops"]["total"], options)
        if parts
        else {}
    )
    holder = {"state": state}

    def run() -> Any:
        holder["state"], metrics = compiled(holder["state"], tokens, rng)
        return metrics

    entry["first_step_s"] = timed(run)
    entry["slow"] = entry["first_step_s"] > args.max_step_s
    entry["runners"] = {} if entry["slow"] else {"step": run}
    if built and not entry["slow"]:
        entry["runners"].update({name: part["run"] for name, part in built.items()})
        entry["parts_flops"] = {name: part["flops"] for name, part in built.items()}
        entry["parts_compile_s"] = {name: part["compile_s"] for name, part in built.items()}
    print(
        f"B={batch} {kind}: compiled in {compile_s:.1f} s, first step "
        f"{entry['first_step_s']:.2f} s" + (f", parts {', '.join(built)}" if built else ""),
        flush=True,
    )
    return entry


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--batches", default="16,8", help="micro-batch sizes (rows)")
    parser.add_argument("--seq", type=int, default=None, help="T (default 256, --quick 128)")
    parser.add_argument("--quick", action="store_true", help="smaller model (CPU)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (smoke test)")
    parser.add_argument("--scan_layers", action="store_true")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--no_remat_compare", dest="remat_compare", action="store_false")
    parser.add_argument("--dropout", type=float, default=None, help="override (paper: 0.1)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="GPTConfig.dtype (compute); bfloat16 on GPU/TPU, with --attention cudnn on GPU",
    )
    parser.add_argument(
        "--attention",
        default="einsum",
        choices=ATTENTION_IMPLEMENTATIONS,
        help="GPTConfig.attention; xla/cudnn run without dropout on the probabilities",
    )
    parser.add_argument(
        "--breakdown",
        default="dense",
        help="kinds whose step is split into head_ce / optimizer / blocks (comma list, 'all', '')",
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--max_step_s", type=float, default=20.0)
    parser.add_argument("--fast_compile", action="store_true", help="XLA opt off (tests only)")
    parser.add_argument("--out", default=str(_HERE / "results" / "train_step.json"))
    args = parser.parse_args(argv)
    if args.seq is None:
        args.seq = 16 if args.tiny else 128 if args.quick else 256
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    options = FAST_COMPILE_OPTIONS if args.fast_compile else None
    kinds = [k for k in args.kinds.split(",") if k]
    batches = [int(b) for b in args.batches.split(",") if b]
    breakdown = kinds if args.breakdown == "all" else [k for k in args.breakdown.split(",") if k]
    matmul = matmul_runner(args.matmul_n, options)
    results: dict[str, Any] = {}
    for batch in batches:
        entries = {
            kind: measure_kind(kind, batch, args, options, kind in breakdown) for kind in kinds
        }
        runners: dict[Key, Any] = {}
        blocks: list[list[Key]] = []
        for kind, entry in entries.items():
            kind_runners = entry.pop("runners")
            if entry["slow"]:
                entry["step_s"] = [entry["first_step_s"]]
                entry["matmul_s"] = [timed(matmul)]
                continue
            # One block per kind: its step, its parts, two matmuls (the faster one counts).
            kind_runners.update({"matmul": matmul, "matmul_2": matmul})
            runners.update({(kind, name): run for name, run in kind_runners.items()})
            blocks.append([(kind, name) for name in kind_runners])
        samples = time_round_robin(runners, blocks, args.iters, args.warmup) if blocks else {}
        for kind, entry in entries.items():
            if entry["slow"]:
                continue
            seconds = {
                name: [ms / 1e3 for ms in samples[(k, name)]] for k, name in samples if k == kind
            }
            entry["step_s"] = seconds.pop("step")
            entry["matmul_s"] = [
                min(a, b)
                for a, b in zip(seconds.pop("matmul"), seconds.pop("matmul_2"), strict=True)
            ]
            if seconds:
                entry["parts_s"] = seconds
        results[f"B{batch}"] = entries
        runners.clear()
    report = {
        "metadata": {
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "model": "tiny" if args.tiny else "quick" if args.quick else "paper",
            "seq": args.seq,
            "scan_layers": args.scan_layers,
            "remat": args.remat,
            "attention": args.attention,
            "dtype": args.dtype,
            "iters": args.iters,
            "matmul_n": args.matmul_n,
            "dropout_rate": model_config(kinds[0], args, "none").dropout_rate,
        },
        "results": results,
    }
    finalize(report)
    print_table(report)
    step_parts.print_breakdown(report)
    step_parts.print_targets(report)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def finalize(report: dict[str, Any]) -> None:
    """Derived numbers of every entry (from its ``step_s`` / ``matmul_s`` samples).

    ``matmul_peak_gflops`` is the best matmul rate of the whole run (the machine's large-matmul
    capability; the median moves with other jobs' load); ``mfu`` = model FLOP/s at the median
    step time ÷ that peak, so ``mfu_ratio_dense`` is a pure step-time comparison.
    ``mfu_paired`` is the median over rounds of model FLOP/s ÷ the same round's matmul rate.
    Entries timed with parts get ``breakdown`` (:func:`step_parts.finalize_breakdown`); the
    report gets ``targets`` (:func:`step_parts.targets`).
    """
    matmul_flops = 2 * report["metadata"]["matmul_n"] ** 3
    all_entries = [e for entries in report["results"].values() for e in entries.values()]
    peak = max(matmul_flops / min(e["matmul_s"]) for e in all_entries)
    report["metadata"]["matmul_peak_gflops"] = peak / 1e9
    for entries in report["results"].values():
        for entry in entries.values():
            flops = entry["model_flops"]["total"]
            step = statistics.median(entry["step_s"])
            entry["step_ms"] = step * 1e3
            entry["tokens_per_s"] = entry["batch"] * entry["seq"] / step
            entry["matmul_gflops"] = matmul_flops / statistics.median(entry["matmul_s"]) / 1e9
            entry["model_gflops_per_s"] = flops / step / 1e9
            entry["mfu"] = flops / step / peak
            entry["mfu_paired"] = statistics.median(
                flops / s / (matmul_flops / m)
                for s, m in zip(entry["step_s"], entry["matmul_s"], strict=True)
            )
        for entry in entries.values():
            entry["mfu_ratio_dense"] = (
                entry["mfu"] / entries["dense"]["mfu"] if "dense" in entries else None
            )
            if "parts_s" in entry:
                step_parts.finalize_breakdown(entry, peak, matmul_flops)
    report["targets"] = step_parts.targets(report)


def print_table(report: dict[str, Any]) -> None:
    meta = report["metadata"]
    print(
        f"\nmodel={meta['model']} T={meta['seq']} scan={meta['scan_layers']} "
        f"remat={meta['remat']} ({meta['device']})"
    )
    header = (
        f"{'B':>3} {'kind':<7} {'step ms':>9} {'tok/s':>8} {'GFLOP':>7} {'GF/s':>7} "
        f"{'mm GF/s':>8} {'mfu':>5} {'/dense':>6} {'peak MB':>8} {'temp MB':>8} "
        f"{'remat saves MB':>14}"
    )
    print(header)
    for entries in report["results"].values():
        for kind, e in entries.items():
            saves = e.get("remat_saves_temp_bytes")
            ratio = e["mfu_ratio_dense"]
            print(
                f"{e['batch']:>3} {kind:<7} {e['step_ms']:>9.1f} {e['tokens_per_s']:>8.0f} "
                f"{e['model_flops']['total'] / 1e9:>7.1f} {e['model_gflops_per_s']:>7.1f} "
                f"{e['matmul_gflops']:>8.1f} {e['mfu']:>5.2f} "
                f"{'-' if ratio is None else f'{ratio:.2f}':>6} "
                f"{e['memory']['peak'] / 2**20:>8.0f} {e['memory']['temp'] / 2**20:>8.0f} "
                f"{'-' if saves is None else f'{saves / 2**20:.0f}':>14}"
                + ("  (slow: one call)" if e["slow"] else "")
            )


if __name__ == "__main__":
    main()
