"""Smoke tests of the ``benchmarks`` package (layer_latency, flops, harness, dsc_breakdown,
train_step, step_parts, product_key) on tiny configurations (JSON schema, flags).

Run in-process with XLA backend optimisation off (``--fast_compile``): they check the
plumbing and the schema, not speed.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import subprocess
import sys
from types import ModuleType

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
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
TINY = [
    "--batch=2",
    "--seq=8",
    "--d_model=16",
    "--iters=2",
    "--warmup=1",
    "--set=dense_hidden_dim=64",
    "--set=moe_num_experts=4",
    "--set=moe_hidden_dim=16",
    "--set=molora_num_experts=4",
    "--set=molora_rank=4",
    "--set=molora_hidden_dim=32",
    "--set=dsc_num_bases=32",
    "--set=dsc_hidden_dim=32",
]


def _load_module() -> ModuleType:
    """The ``benchmarks.layer_latency`` module."""
    return _load_script("layer_latency")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_layer_latency_schema(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "nested" / "latency.json"  # main must create the folder
    returned = _load_module().main([*TINY, f"--out={out}", "--fast_compile"])
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    results = report["results"]
    assert set(results) == set(IMPLEMENTATIONS)
    for name, entry in results.items():
        for key in (
            "fwd_ms",
            "fwd_bwd_ms",
            "fwd_ratio_gemm",
            "fwd_bwd_ratio_gemm",
            "fwd_ratio_dense",
            "fwd_bwd_ratio_dense",
            "gemm_fwd_ms",
            "gemm_fwd_bwd_ms",
            "flops",
            "flops_active",
        ):
            assert _positive(entry[key]), (name, key, entry.get(key))
        assert entry["flops_active"] <= entry["flops"], name
        n, d, cols = entry["gemm_shape"]
        assert (n, d) == (16, 16)
        assert abs(2 * n * d * cols - entry["flops"]) <= n * d, name  # F / (2 N d), rounded
        assert name in stdout
    assert results["dense"]["fwd_ratio_dense"] == pytest.approx(1.0)
    assert results["dense"]["fwd_bwd_ratio_dense"] == pytest.approx(1.0)
    # dense: 4·N·d·H; DSC dense path: 4·N·d·H + 2·N·d·M + 4·N·M·d.
    assert results["dense"]["flops"] == 4 * 16 * 16 * 64
    assert results["dsc_dense"]["flops"] == 4 * 16 * 16 * 32 + 6 * 16 * 16 * 32
    breakdown = report["breakdown"]["dsc_gather"]
    assert set(breakdown) == {"router", "top_k", "contract", "static_ffn", "regularisers"}
    for part, entry in breakdown.items():
        assert _positive(entry["fwd_ms"]) and _positive(entry["fwd_share"]), part
        assert _positive(entry["fwd_ratio_gemm"]), part
        assert (part == "top_k") or _positive(entry["fwd_bwd_ms"]), part
    moe_parts = report["breakdown"]["moe_sorted"]
    assert set(moe_parts) == {"router", "dispatch", "weight_gather", "expert_matmuls", "combine"}
    assert all(_positive(e["fwd_ms"]) and _positive(e["fwd_bwd_ms"]) for e in moe_parts.values())
    assert "part:" not in stdout and "static_ffn" in stdout and "expert_matmuls" in stdout
    rows = {r["target"]: r for r in report["targets"]}
    assert {"DSC layer forward", "DSC layer forward+backward"} <= set(rows)
    for row in rows.values():
        assert _positive(row["measured"]) and row["met"] == (row["measured"] <= row["limit"])
        assert row["target"] in stdout
    meta = report["metadata"]
    assert meta["moe_auto_resolves_to"] in ("dense", "dropless")
    for key in ("device_kind", "jax_version", "dtype", "input_shape", "iters", "date"):
        assert key in meta, key
    assert meta["dtype"] == "float32"
    assert meta["input_shape"] == [2, 8, 16]
    assert meta["iters"] == 2
    assert meta["with_losses"] is False


def test_select_and_sizes() -> None:
    bench = _load_module()
    assert bench.select(None) == list(IMPLEMENTATIONS)
    moe = ["moe_dense", "moe_dropless", "moe_sorted", "moe_capacity", "dense"]
    assert bench.select("moe") == moe
    assert bench.select("dsc_gather") == ["dsc_gather", "dense"]
    with pytest.raises(ValueError, match="matches no implementation"):
        bench.select("nope")
    paper = bench.LayerSizes.paper()
    assert (paper.dsc_num_bases, paper.dsc_top_k, paper.dsc_hidden_dim) == (1523, 4, 327)
    assert (paper.moe_num_experts, paper.moe_top_k, paper.moe_hidden_dim) == (5, 2, 545)
    assert paper.dense_hidden_dim == 2611
    assert paper.replace(["dsc_num_bases=64"]).dsc_num_bases == 64
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        paper.replace(["bogus=1"])


def test_with_losses_training_path() -> None:
    bench = _load_module()
    sizes = bench.LayerSizes.paper().replace(
        ["dense_hidden_dim=32", "dsc_num_bases=16", "dsc_hidden_dim=16"]
    )
    report = bench.run_benchmark(
        batch=2,
        seq=4,
        d_model=8,
        dtype="float32",
        param_dtype="float32",
        iters=1,
        warmup=0,
        only="dsc_gather",
        sizes=sizes,
        with_losses=True,
        fast_compile=True,
        log=lambda _: None,
    )
    assert list(report["results"]) == ["dsc_gather", "dense"]
    assert report["metadata"]["with_losses"] is True
    assert all(_positive(report["results"]["dsc_gather"][k]) for k in ("fwd_ms", "fwd_bwd_ms"))


def _load_script(name: str) -> ModuleType:
    """The module ``benchmarks.{name}`` (run as ``python -m benchmarks.{name}``)."""
    return importlib.import_module(f"benchmarks.{name}")


def test_train_step_schema(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "train_step.json"
    argv = ["--tiny", "--kinds=dense,dsc", "--batches=2", "--iters=1", "--warmup=0"]
    report = _load_script("train_step").main(
        [*argv, "--matmul_n=64", "--fast_compile", f"--out={out}"]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    stdout = capsys.readouterr().out
    assert "mfu" in stdout
    entries = report["results"]["B2"]
    assert set(entries) == {"dense", "dsc"}
    for entry in entries.values():
        for key in ("step_ms", "tokens_per_s", "mfu", "matmul_gflops", "model_gflops_per_s"):
            assert _positive(entry[key]), key
        assert entry["memory"]["peak"] >= entry["memory"]["temp"] > 0
        assert set(entry["remat_temp_bytes"]) == {"none", "full"}
    assert entries["dense"]["mfu_ratio_dense"] == 1.0
    assert "breakdown" not in entries["dsc"]  # --breakdown defaults to dense
    dense = entries["dense"]
    parts = dense["breakdown"]["parts"]
    assert set(parts) == {"head_ce", "optimizer", "blocks", "rest"}
    for name in ("head_ce", "optimizer", "blocks"):
        assert _positive(parts[name]["ms"]) and _positive(parts[name]["share"]), name
    for name in ("head_ce", "blocks"):
        assert _positive(parts[name]["flops"]) and _positive(parts[name]["mfu"]), name
    assert parts["optimizer"]["flops"] == 0 and parts["optimizer"]["mfu"] == 0
    assert math.isfinite(parts["rest"]["ms"]) and math.isfinite(parts["rest"]["share"])
    assert parts["head_ce"]["flops"] + parts["blocks"]["flops"] == dense["model_flops"]["total"]
    assert parts["head_ce"]["flops"] == 6 * 2 * 16 * 16 * 64  # 6·N·d·V
    targets = {(t["kind"], t["batch"]): t for t in report["targets"]}
    assert set(targets) == {("dense", 2), ("dsc", 2)}
    assert targets["dense", 2]["threshold"] == 0.6 and targets["dsc", 2]["threshold"] == 0.8
    for target in targets.values():
        assert _positive(target["measured"]) and isinstance(target["met"], bool)
        assert target["met"] or (target["reason"] and target["would_take"]), target
    assert "step breakdown" in stdout and "head_ce" in stdout
    assert "targets" in stdout and "met: " in stdout


def test_step_parts_compose_to_the_trainer_loss() -> None:
    """Trunk (embeddings + blocks) then head_ce give the trainer's cross-entropy."""
    step_parts = _load_script("step_parts")
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from dsc_jax import GPT, DSCConfig, GPTConfig
    from dsc_jax.layers.losses import LossWeights
    from dsc_jax.train.steps import loss_fn

    cfg = GPTConfig(
        ffn=DSCConfig(num_bases=16, hidden_dim=16),
        d_model=16,
        num_layers=2,
        num_heads=2,
        vocab_size=64,
        max_seq_len=8,
        dropout_rate=0.0,
    )
    model = GPT(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    batch = jax.random.randint(jax.random.key(1), (2, 9), 0, 64, jnp.int32)
    _, metrics = loss_fn(params, model.apply, batch, jax.random.key(2), LossWeights())
    trunk_params = {name: value for name, value in params.items() if name != "ln_f"}
    x = step_parts.Trunk(cfg).apply({"params": trunk_params}, batch[:, :-1])
    embedding = params["wte"]["embedding"]
    ce = step_parts.head_ce_loss(cfg)(x, params["ln_f"], embedding, batch[:, 1:])
    assert float(ce) == pytest.approx(float(metrics["train_ce"]), rel=1e-5)


def test_model_train_flops_formula() -> None:
    flops = _load_script("flops")
    from dsc_jax import DenseConfig, DSCConfig, GPTConfig

    cfg = GPTConfig(
        ffn=DenseConfig(hidden_dim=100),
        d_model=8,
        num_layers=2,
        num_heads=2,
        vocab_size=10,
        max_seq_len=4,
    )
    per_layer = 4 * 64 + 2 * 8 * 100
    assert flops.model_active_matmul_params(cfg) == 2 * per_layer + 80
    counted = flops.model_train_flops(cfg, batch=3, seq_len=4)
    assert counted["params"] == 6 * (2 * per_layer + 80) * 12
    assert counted["attention"] == 12 * 2 * 4 * 8 * 12
    dsc = cfg.replace(ffn=DSCConfig(num_bases=16, top_k=2, hidden_dim=10))
    assert flops.model_active_matmul_params(dsc) == 2 * (4 * 64 + 160 + 128 + 32) + 80


def test_product_key_schema(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "product_key.json"
    argv = ["--batch=1", "--seq=8", "--d_model=16", "--flat_bases=32", "--pk_bases=64"]
    report = _load_script("product_key").main(
        [*argv, "--hidden_dim=8", "--iters=1", "--warmup=0", "--fast_compile", f"--out={out}"]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["results"]) == {"flat", "product_key"}
    for entry in report["results"].values():
        assert _positive(entry["fwd_ms"]) and _positive(entry["fwd_bwd_ms"])
        assert 0 < entry["usage"]["fraction_used"] <= 1 and entry["usage"]["kl_to_uniform"] >= 0
    assert all(_positive(r) for r in report["ratio_product_key_over_flat"].values())


def test_targets_reason_is_computed_from_the_parts() -> None:
    """A missed target's reason adds up the same-round part ratios (synthetic report)."""
    targets = _load_module().targets

    report = {
        "metadata": {"dsc_auto_resolves_to": "gather", "moe_auto_resolves_to": "sorted"},
        "results": {
            "dsc_gather": {
                "fwd_ratio_gemm": 1.6,
                "fwd_bwd_ratio_gemm": 1.4,
                "gemm_fwd_bwd_ms": 10.0,
                "flops": 100,
                "flops_active": 100,
            },
            "moe_sorted": {
                "fwd_ratio_gemm": 1.4,
                "fwd_bwd_ratio_gemm": 1.9,
                "flops": 120,
                "flops_active": 100,
            },
        },
        "breakdown": {
            "dsc_gather": {
                "router": {"fwd_ratio_gemm": 0.5, "fwd_bwd_ratio_gemm": 0.4},
                "top_k": {"fwd_ratio_gemm": 0.3, "fwd_ms": 2.0},
                "static_ffn": {"fwd_ratio_gemm": 0.4, "fwd_bwd_ratio_gemm": 0.4},
                "regularisers": {"fwd_ratio_gemm": 9.0, "fwd_bwd_ratio_gemm": 9.0},
            }
        },
    }
    rows = {r["target"]: r for r in targets.evaluate(report)}
    fwd = rows["DSC layer forward"]
    assert not fwd["met"] and fwd["would_take"]
    # regularisers are training-only: left out; 1.6 - (0.5 + 0.4 + 0.3) = 0.4 unattributed
    assert "matmul parts 0.90" in fwd["reason"] and "other parts 0.30 (top_k 0.30)" in fwd["reason"]
    assert "unattributed 0.40" in fwd["reason"] and "regularisers" not in fwd["reason"]
    assert rows["DSC layer forward+backward"]["met"]
    assert rows["DSC layer forward+backward"]["reason"] is None
    # MoE against its active FLOPs: 1.4 x 120/100 = 1.68 > 1.5; no breakdown -> no reason
    moe = rows["MoE layer forward (exact)"]
    assert moe["measured"] == pytest.approx(1.68) and not moe["met"] and moe["reason"] is None
    assert rows["MoE layer forward+backward (exact)"]["measured"] == pytest.approx(2.28)


def test_benchmarks_are_a_package_without_path_edits() -> None:
    """Every benchmark imports its siblings as ``benchmarks.<name>``: none edits ``sys.path``."""
    assert (REPO / "benchmarks" / "__init__.py").is_file()
    edits = [p.name for p in (REPO / "benchmarks").glob("*.py") if "sys.path" in p.read_text()]
    assert not edits, edits


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layer_latency", "train_step", "product_key"])
def test_runs_with_python_dash_m(name: str) -> None:
    """``python -m benchmarks.<name> --help`` from the repository root, as the docs say."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout and "--out" in proc.stdout
