"""Every script in examples/ runs (tiny settings, in-process)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from tests._train_utils import REPO

pytestmark = pytest.mark.usefixtures("fast_compiles")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", REPO / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Flax modules are dataclasses: they look it up
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    tested = {"vit_dsc", "custom_block_dsc", "nnx_dsc", "generate_text"}
    assert {p.stem for p in (REPO / "examples").glob("*.py")} == tested


def test_vit_dsc(capsys):
    result = load_example("vit_dsc").main(["--steps=3", "--batch_size=8"])
    assert math.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
    assert "held-out" in capsys.readouterr().out


def test_custom_block_dsc(capsys):
    result = load_example("custom_block_dsc").main(["--steps=3", "--batch_size=4", "--seq_len=16"])
    assert math.isfinite(result["final_loss"])
    assert result["bank_norm_error"] < 1e-5  # bank_retraction kept the rows at bank_radius
    assert "weighted regularisers" in capsys.readouterr().out


def test_nnx_dsc(capsys):
    result = load_example("nnx_dsc").main(["--steps=4", "--batch_size=4", "--seq_len=16"])
    assert math.isfinite(result["final_loss"])
    assert result["traces"] == 1  # nnx.jit traced the train step once over 4 steps
    assert result["bank_norm_error"] < 1e-5
    assert "weighted regularisers" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_text(tmp_path):
    """Trains configs/default.py 2 steps, then samples. A subprocess on one CPU device: the
    tests' 8 fake devices would make the 4-layer model's compilation several times slower."""
    args = ["--train_steps=2", "--max_bytes=50000", "--max_new_tokens=8", "--num_samples=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    flags = [
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)  # XLA reads a lone " " as a file name
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "generate_text.py"),
            f"--workdir={tmp_path}",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded" in proc.stdout and proc.stdout.count("def ") >= 2
    assert "tokens/s" in proc.stdout
