"""Product-key vs flat DSC router: layer latency at a 43× larger bank, and atom usage.

Times, in the same interleaved rounds (:func:`harness.time_round_robin`), the forward (the
inference path) and forward+backward (the training path: dropout on, regularisers in the
objective; the product-key layer without the ``O(M d²)`` frame regulariser unless
``--frame``) of

* ``flat``: ``DSCLayer(num_bases=1523, top_k=4)`` (the paper's layer), and
* ``product_key``: ``DSCLayer(num_bases=65536, top_k=4, router="product_key")`` (256 × 256
  sub-keys),

both with the paper's static FFN (H=327) at ``d=384`` on ``N = batch × seq`` tokens, and
reports the median times and the same-round ratio ``product_key / flat`` (target ≤ 1.5 for
the forward). Atom usage over the timed batch (random init, random input): the fraction of
atoms selected at least once and ``KL(usage ‖ uniform)`` in nats (0: perfectly uniform;
with ``N·K < M`` selections a large bank cannot be fully used by one batch).

Usage::

    python benchmarks/product_key.py                 # N = 16 × 256 = 4096 tokens
    python benchmarks/product_key.py --batch 4       # fewer tokens on a slow CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.harness import (
    FAST_COMPILE_OPTIONS,
    compile_runner,
    layer_functions,
    paired_ratio,
    time_round_robin,
)
from dsc_jax import paper
from dsc_jax.layers.diagnostics import routing_statistics
from dsc_jax.layers.dsc import DSCLayer

_HERE = pathlib.Path(__file__).resolve().parent


def atom_usage(counts: jax.Array) -> dict[str, float]:
    """Fraction of atoms used and ``KL(usage ‖ uniform)`` (nats) of the selection ``counts
    [M]`` (:func:`dsc_jax.layers.diagnostics.routing_statistics`' ``usage``)."""
    num_bases = counts.shape[0]
    probs = counts / jnp.sum(counts)
    kl = jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs * num_bases), 0.0))
    return {"fraction_used": float(jnp.mean(counts > 0)), "kl_to_uniform": float(kl)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d_model", type=int, default=paper.D_MODEL)
    parser.add_argument("--flat_bases", type=int, default=paper.DSC_NUM_BASES)
    parser.add_argument("--pk_bases", type=int, default=65536)
    parser.add_argument("--top_k", type=int, default=paper.DSC_TOP_K)
    parser.add_argument("--hidden_dim", type=int, default=paper.DSC_HIDDEN)
    parser.add_argument("--frame", action="store_true", help="product-key frame loss on")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fast_compile", action="store_true", help="XLA opt off (tests only)")
    parser.add_argument("--out", default=str(_HERE / "results" / "product_key.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    options = FAST_COMPILE_OPTIONS if args.fast_compile else None
    common = {"top_k": args.top_k, "hidden_dim": args.hidden_dim}
    layers = {
        "flat": DSCLayer(num_bases=args.flat_bases, **common),
        "product_key": DSCLayer(
            num_bases=args.pk_bases,
            router="product_key",
            frame_regularizer=args.frame,
            **common,
        ),
    }
    x = jax.random.normal(jax.random.key(0), (args.batch * args.seq, args.d_model))
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    key = jax.random.key(2)
    runners, results = {}, {}
    for name, layer in layers.items():
        params = nn.unbox(layer.init(jax.random.key(3), x)["params"])
        fwd, _ = layer_functions(layer, with_losses=False)
        _, fwd_bwd = layer_functions(layer, with_losses=True)
        runners[(name, "fwd")], fwd_s = compile_runner(fwd, params, x, key, options=options)
        runners[(name, "fwd_bwd")], bwd_s = compile_runner(
            fwd_bwd, params, x, key, cotangent, options=options
        )
        _, state = jax.jit(
            lambda p, inputs, layer=layer: layer.apply(
                {"params": p}, inputs, mutable=["intermediates"]
            )
        )(params, x)
        usage = routing_statistics(state["intermediates"], params)[""]["usage"]
        results[name] = {
            "num_bases": layer.num_bases,
            "params": sum(p.size for p in jax.tree.leaves(params)),
            "compile_s": fwd_s + bwd_s,
            "usage": atom_usage(usage),
        }
    blocks = [[(name, "fwd"), (name, "fwd_bwd")] for name in layers]
    samples = time_round_robin(runners, blocks, args.iters, args.warmup)
    for (name, pass_), times in samples.items():
        results[name][f"{pass_}_ms"] = statistics.median(times)
    ratios = {
        pass_: paired_ratio(samples[("product_key", pass_)], samples[("flat", pass_)])
        for pass_ in ("fwd", "fwd_bwd")
    }
    report = {
        "metadata": {
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "tokens": int(x.shape[0]),
            "d_model": args.d_model,
            "top_k": args.top_k,
            "hidden_dim": args.hidden_dim,
            "product_key_frame_loss": args.frame,
            "iters": args.iters,
        },
        "results": results,
        "ratio_product_key_over_flat": ratios,
    }
    print(f"\nN={x.shape[0]} d={args.d_model} K={args.top_k} ({report['metadata']['device']})")
    print(f"{'router':<12} {'M':>6} {'fwd ms':>8} {'f+b ms':>8} {'used':>6} {'KL':>6}")
    for name, entry in results.items():
        usage = entry["usage"]
        print(
            f"{name:<12} {entry['num_bases']:>6} {entry['fwd_ms']:>8.1f} "
            f"{entry['fwd_bwd_ms']:>8.1f} {usage['fraction_used']:>6.3f} "
            f"{usage['kl_to_uniform']:>6.2f}"
        )
    print(f"product_key / flat: fwd {ratios['fwd']:.2f}, fwd+bwd {ratios['fwd_bwd']:.2f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
