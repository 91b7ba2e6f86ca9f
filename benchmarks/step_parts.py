"""One training step split into parts, timed in the step's own rounds, and the MFU targets.

Parts of :func:`dsc_jax.train.steps.train_step` (each compiled on its own, at the step's
sizes and on the model's own parameters; ``N = B·T`` tokens, width ``d``, vocabulary ``V``):

* ``head_ce``: forward + backward of the final LayerNorm ``ln_f``, the tied LM head
  ``[N, d] × [d, V]`` (``wte.attend``) and the trainer's cross-entropy
  (``optax.softmax_cross_entropy_with_integer_labels`` on the float32 logits, mean over the
  tokens, as in :func:`dsc_jax.train.steps.loss_fn`), gradients w.r.t. the residual stream
  ``[B, T, d]``, ``ln_f`` and the embedding ``[V, d]``. Model FLOPs ``6·N·d·V``.
* ``optimizer``: one ``TrainState.apply_gradients`` (the state's ``tx``: the optimiser
  chained with the bank projection) on the model's parameter tree with random gradients,
  state donated as in the step. No model FLOPs (element-wise work only).
* ``blocks``: measured, not derived: forward + backward of the embeddings and the
  transformer blocks (:class:`Trunk`, dropout on, the weighted regularisers of the sown
  ``"losses"`` as in ``loss_fn``) with a random cotangent on the ``[B, T, d]`` output,
  gradients w.r.t. their parameters. Model FLOPs: the step's minus ``head_ce``'s.
* ``rest``: step − the three parts, per round (glue the step fuses differently, the
  gradient norm, the embedding-gradient sum; may be negative).

:func:`finalize_breakdown` turns the per-round samples into ms, share of the step and MFU;
:func:`targets` checks "Dense MFU >= 0.6" and "routed kinds >= 0.8× Dense's MFU", with the
measured reason and what it would take when missed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks.harness import compile_runner, vjp_function
from dsc_jax.layers.losses import LossWeights, regularization_loss
from dsc_jax.models import gpt
from dsc_jax.models.gpt import GPTConfig
from dsc_jax.train.state import TrainState
from dsc_jax.train.steps import split_tokens

PARTS = ("head_ce", "optimizer", "blocks")  # timed; "rest" = step − these, per round
DENSE_MFU_TARGET = 0.6
ROUTED_RATIO_TARGET = 0.8
BLOCKS_METHOD = "measured: embedding + blocks forward+backward with regularisers"


class Trunk(nn.Module):
    """:class:`dsc_jax.models.gpt.GPT` up to its final LayerNorm, from the model's own pieces
    (:func:`dsc_jax.models.gpt.embed`, :func:`dsc_jax.models.gpt.apply_blocks`; parameter
    names ``wte``, ``wpe``, ``block_{i}`` or ``blocks``): ``tokens [B, T]`` int -> the residual
    stream ``[B, T, d]`` float32 that ``ln_f`` receives."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        x, _ = gpt.embed(cfg, tokens, jnp.arange(tokens.shape[1]), deterministic)
        return gpt.apply_blocks(cfg, x, deterministic)


def head_ce_loss(cfg: GPTConfig) -> Callable[..., jax.Array]:
    """``loss(x [B, T, d] f32, ln_f params, embedding [V, d], targets [B, T] int) -> scalar``:
    the model's ``ln_f`` (:func:`dsc_jax.models.gpt.layer_norm`), the tied head
    (:func:`dsc_jax.models.gpt.token_embedding`) and the trainer's mean float32 cross-entropy."""
    if not cfg.tie_embeddings:
        raise ValueError("head_ce: only the tied LM head (GPTConfig.tie_embeddings=True).")
    ln_f = gpt.layer_norm(cfg, "ln_f")
    wte = gpt.token_embedding(cfg)

    def loss(x: jax.Array, ln_params: Any, embedding: jax.Array, targets: jax.Array) -> jax.Array:
        h = ln_f.apply({"params": ln_params}, x).astype(cfg.compute_dtype)
        logits = wte.apply({"params": {"embedding": embedding}}, h, method=nn.Embed.attend)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), targets
        ).mean()

    return loss


def head_flops(cfg: GPTConfig, batch: int, seq: int) -> int:
    """Training FLOPs of the LM head: ``6·N·d·V`` (forward ``2·N·d·V``, backward twice that)."""
    return 6 * batch * seq * cfg.d_model * cfg.vocab_size


def build_parts(
    cfg: GPTConfig,
    state: TrainState,
    tokens: jax.Array,
    step_flops: int,
    options: dict[str, Any] | None,
    loss_weights: LossWeights | None = None,
) -> dict[str, dict[str, Any]]:
    """``{part: {"run": no-argument runner, "flops": model FLOPs, "compile_s": s}}``.

    Call before the step runs: ``state`` ``[params, opt_state]`` is copied here (the step
    donates it). ``tokens`` is the step's ``[B, T + 1]`` batch; ``step_flops`` its model FLOPs.
    """
    loss_weights = loss_weights or LossWeights()
    inputs, targets = split_tokens(tokens)
    batch, seq = inputs.shape
    params = jax.tree.map(jnp.copy, state.params)  # the step and optimizer donate theirs
    keys = jax.random.split(jax.random.key(7), 4)
    parts: dict[str, dict[str, Any]] = {}

    x = jax.random.normal(keys[0], (batch, seq, cfg.d_model), jnp.float32)
    one = jnp.ones((), jnp.float32)
    head_args = (x, params["ln_f"], params["wte"]["embedding"], targets, one)
    run, seconds = compile_runner(
        vjp_function(head_ce_loss(cfg), (0, 1, 2)), *head_args, options=options
    )
    flops = head_flops(cfg, batch, seq)
    parts["head_ce"] = {"run": run, "flops": flops, "compile_s": seconds}

    leaves, treedef = jax.tree.flatten(params)
    grad_keys = jax.random.split(keys[1], len(leaves))
    noise = [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(grad_keys, leaves, strict=True)]
    grads = treedef.unflatten([1e-3 * g for g in noise])
    own_state = jax.tree.map(jnp.copy, state)  # donated below, like the step's
    update = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
    start = time.perf_counter()
    compiled = update.lower(own_state, grads).compile(compiler_options=options)
    seconds = time.perf_counter() - start
    holder = {"state": own_state}

    def run_optimizer() -> Any:
        holder["state"] = compiled(holder["state"], grads)
        return holder["state"]

    parts["optimizer"] = {"run": run_optimizer, "flops": 0, "compile_s": seconds}

    trunk = Trunk(cfg)
    trunk_params = {name: value for name, value in params.items() if name != "ln_f"}

    def blocks(p: Any, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, mutated = trunk.apply(
            {"params": p}, inputs, deterministic=False, rngs={"dropout": key}, mutable=["losses"]
        )
        total, _ = regularization_loss(mutated.get("losses"), loss_weights, allow_empty=True)
        return x, total

    cotangent = (jax.random.normal(keys[2], (batch, seq, cfg.d_model), jnp.float32), one)
    run, seconds = compile_runner(
        vjp_function(blocks, (0,)), trunk_params, keys[3], cotangent, options=options
    )
    parts["blocks"] = {"run": run, "flops": step_flops - flops, "compile_s": seconds}
    return parts


def finalize_breakdown(entry: dict[str, Any], peak: float, matmul_flops: int) -> None:
    """Add ``entry["breakdown"]`` from the per-round seconds ``entry["parts_s"][part]``.

    Per part: ``ms`` (median), ``share`` (median over rounds of part ÷ the same round's
    step), ``flops``, ``flops_share`` (of the step's model FLOPs), ``mfu`` (FLOPs ÷ median
    time ÷ ``peak``, the run's best matmul FLOP/s, as the step's ``mfu``) and ``mfu_paired``
    (÷ the same round's ``matmul_flops`` rate). ``rest`` is step − parts per round.
    """
    step_s, matmul_s = entry["step_s"], entry["matmul_s"]
    total = entry["model_flops"]["total"]
    parts: dict[str, dict[str, float]] = {}
    for name, samples in entry["parts_s"].items():
        flops = entry["parts_flops"][name]
        seconds = statistics.median(samples)
        parts[name] = {
            "ms": seconds * 1e3,
            "share": statistics.median(p / s for p, s in zip(samples, step_s, strict=True)),
            "flops": flops,
            "flops_share": flops / total,
            "mfu": flops / seconds / peak,
            "mfu_paired": statistics.median(
                flops / p / (matmul_flops / m) for p, m in zip(samples, matmul_s, strict=True)
            ),
        }
    rest = [s - sum(p[i] for p in entry["parts_s"].values()) for i, s in enumerate(step_s)]
    parts["rest"] = {
        "ms": statistics.median(rest) * 1e3,
        "share": statistics.median(r / s for r, s in zip(rest, step_s, strict=True)),
        "flops": 0,
        "flops_share": 0.0,
        "mfu": 0.0,
        "mfu_paired": 0.0,
    }
    entry["breakdown"] = {"blocks": BLOCKS_METHOD, "rest": "step - parts", "parts": parts}


def _describe(name: str, part: dict[str, float]) -> str:
    if name == "rest":
        return f"rest (step - parts) {part['share']:+.0%}"
    if not part["flops"]:
        return f"{name} {part['share']:.0%} of the step at 0 FLOPs"
    return (
        f"{name} {part['share']:.0%} of the step at MFU {part['mfu']:.2f} "
        f"({part['flops_share']:.0%} of the FLOPs)"
    )


def _dense_would_take(entry: dict[str, Any], peak: float) -> str:
    """What-ifs from the measured parts (seconds ``t``, model FLOPs ``F``, MFU = F / t / peak):
    ``head_ce`` at the blocks' MFU, then the optimizer at 0 s, then the MFU the model-FLOP
    parts would need for the step to reach the target."""
    parts = entry["breakdown"]["parts"]
    head, optimizer, blocks, rest = (parts[k] for k in ("head_ce", "optimizer", "blocks", "rest"))
    total = entry["model_flops"]["total"]
    needed_s = total / (DENSE_MFU_TARGET * peak)
    seconds = entry["step_ms"] / 1e3
    clauses = []
    if head["mfu"] < blocks["mfu"]:
        seconds += head["flops"] / (blocks["mfu"] * peak) - head["ms"] / 1e3
        clauses.append(
            "a fused/chunked cross-entropy that never materialises the [B*T, V] float32 "
            f"logits (head_ce at the blocks' MFU: step MFU {total / seconds / peak:.2f})"
        )
    seconds -= optimizer["ms"] / 1e3
    clauses.append(f"a fused AdamW (optimizer at ~0 ms: {total / seconds / peak:.2f})")
    if total / seconds / peak < DENSE_MFU_TARGET:
        budget = needed_s - max(rest["ms"], 0.0) / 1e3
        mfu = f">= {total / budget / peak:.2f}" if budget > 0 else "beyond reach"
        clauses.append(
            f"then head_ce + blocks at MFU {mfu} (blocks now {blocks['mfu']:.2f}): "
            "bfloat16 matmuls on an accelerator, fused attention softmax/dropout and GELU"
        )
    now = entry["step_ms"]
    return f"step <= {needed_s * 1e3:.1f} ms (now {now:.1f}): " + "; ".join(clauses)


def _target(name: str, entry: dict[str, Any], measured: float, threshold: float) -> dict:
    return {
        "target": name,
        "kind": entry["kind"],
        "batch": entry["batch"],
        "measured": measured,
        "threshold": threshold,
        "met": measured >= threshold,
        "reason": None,
        "would_take": None,
    }


def _fixed_s(entry: dict[str, Any]) -> float:
    """Seconds of the FFN-independent parts, ``head_ce`` + ``optimizer``."""
    parts = entry["breakdown"]["parts"]
    return (parts["head_ce"]["ms"] + parts["optimizer"]["ms"]) / 1e3


def _routed_target(entry: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    kind = entry["kind"]
    result = _target(
        f"{kind} MFU >= {ROUTED_RATIO_TARGET}x Dense's",
        entry,
        entry["mfu_ratio_dense"],
        ROUTED_RATIO_TARGET,
    )
    if result["met"]:
        return result
    flops_k, flops_d = entry["model_flops"]["total"], dense["model_flops"]["total"]
    step_k, step_d = entry["step_ms"] / 1e3, dense["step_ms"] / 1e3
    reason = (
        f"{kind} does {flops_k / flops_d:.2f}x Dense's model FLOPs in {step_k / step_d:.2f}x "
        "its step time"
    )
    needed_ms = flops_k / flops_d * step_d / ROUTED_RATIO_TARGET * 1e3
    would_take = (
        f"{kind}'s step <= {needed_ms:.1f} ms (now {step_k * 1e3:.1f}) at Dense's "
        f"{step_d * 1e3:.1f} ms"
    )
    own = "breakdown" in entry
    fixed_d = _fixed_s(dense) if "breakdown" in dense else None
    fixed_k = _fixed_s(entry) if own else fixed_d
    if fixed_k is not None and fixed_d is not None and fixed_k < step_k and fixed_d < step_d:
        head = dense["breakdown"]["parts"]["head_ce"]["flops"]
        ratio = ((flops_k - head) / (step_k - fixed_k)) / ((flops_d - head) / (step_d - fixed_d))
        estimate = "" if own else " (Dense's parts, as an estimate)"
        reason += (
            f"; head_ce + optimizer, the same work in every kind, take {fixed_k / step_k:.0%} "
            f"of its step{estimate}; without them the ratio is {ratio:.2f}"
        )
        if ratio >= ROUTED_RATIO_TARGET:
            would_take += (
                "; shrinking the shared head_ce + optimizer time (fused cross-entropy, fused "
                f"AdamW) lifts the ratio towards {ratio:.2f}"
            )
        else:
            would_take += (
                f"; its blocks alone reach only {ratio:.2f}x Dense's: faster routing "
                "(router top-k, gather/scatter of the selected atoms or experts)"
            )
    result.update(reason=reason, would_take=would_take)
    return result


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """For every micro-batch with a Dense entry: "Dense MFU >= 0.6" and, per routed kind,
    "MFU >= 0.8x Dense's", each ``{target, kind, batch, measured, threshold, met, reason,
    would_take}`` (``reason`` / ``would_take`` computed from the measurements when missed)."""
    peak = report["metadata"]["matmul_peak_gflops"] * 1e9
    out = []
    for entries in report["results"].values():
        dense = entries.get("dense")
        if dense is None:
            continue
        result = _target(f"Dense MFU >= {DENSE_MFU_TARGET}", dense, dense["mfu"], DENSE_MFU_TARGET)
        if not result["met"]:
            if "breakdown" in dense:
                parts = dense["breakdown"]["parts"]
                result["reason"] = "; ".join(_describe(k, p) for k, p in parts.items())
                result["would_take"] = _dense_would_take(dense, peak)
            else:
                result["reason"] = "no step breakdown measured (see --breakdown)"
        out.append(result)
        out.extend(_routed_target(e, dense) for k, e in entries.items() if k != "dense")
    return out


def print_breakdown(report: dict[str, Any]) -> None:
    """The parts of every entry that has a breakdown, next to its whole step."""
    rows = [e for entries in report["results"].values() for e in entries.values()]
    rows = [e for e in rows if "breakdown" in e]
    if not rows:
        return
    print(
        f"\nstep breakdown (same rounds as the steps; blocks {BLOCKS_METHOD}; rest = step - parts)"
    )
    print(f"{'B':>3} {'kind':<7} {'part':<10} {'ms':>9} {'share':>6} {'GFLOP':>7} {'mfu':>5}")
    for e in rows:
        print(
            f"{e['batch']:>3} {e['kind']:<7} {'step':<10} {e['step_ms']:>9.1f} {1:>6.2f} "
            f"{e['model_flops']['total'] / 1e9:>7.1f} {e['mfu']:>5.2f}"
        )
        for name, part in e["breakdown"]["parts"].items():
            print(
                f"{'':>3} {'':<7} {name:<10} {part['ms']:>9.1f} {part['share']:>6.2f} "
                f"{part['flops'] / 1e9:>7.1f} {part['mfu']:>5.2f}"
            )


def print_targets(report: dict[str, Any]) -> None:
    """The ``report["targets"]``: measured, target, met, and when missed reason and what it
    would take."""
    print("\ntargets")
    for t in report["targets"]:
        print(
            f"  B={t['batch']} {t['target']}: measured {t['measured']:.2f}, target "
            f"{t['threshold']:.2f}, met: {'yes' if t['met'] else 'no'}"
        )
        if t["reason"]:
            print(f"    reason: {t['reason']}")
        if t["would_take"]:
            print(f"    would take: {t['would_take']}")
