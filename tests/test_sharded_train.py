"""Sharded training: data/FSDP/tensor meshes, resharding restore, a real two-process run.

Every variant trains the same tiny DSC GPT (d=16, M=8, K=2, dropout on, 2 micro-batches) on
the same batches and must match the single-device run within float32 tolerance.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from tests import _multiprocess_worker as worker

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 2e-6


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    """Tiny programs: XLA's optimisation passes cost more than they save (restored after)."""
    previous = bool(jax.config.values.get("jax_disable_most_optimizations", False))
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """The single-device run."""
    return worker.run((1, 1, 1), devices=jax.devices()[:1])


def _assert_same_run(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=RTOL)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=key)


def _spec(tree: dict, *path: str) -> P:
    for key in path:
        tree = tree[key]
    return tree.spec


EXPECTED = {  # (path, spec on (data, fsdp, tensor)); sizes: d=16, heads=2, M=8, H=8, V=64
    ("wte", "embedding"): P("tensor", "fsdp"),
    ("wpe", "embedding"): P(None, "fsdp"),
    ("block_0", "attn", "query", "kernel"): P("fsdp", "tensor", None),
    ("block_0", "attn", "out", "kernel"): P("tensor", None, "fsdp"),
    ("block_0", "ffn", "static_in", "kernel"): P("fsdp", "tensor"),
    ("block_0", "ffn", "basis_u"): P("tensor", "fsdp"),
    ("block_0", "ffn", "router", "kernel"): P("fsdp", "tensor"),
    ("block_0", "ffn", "router", "bias"): P("tensor"),
    ("block_0", "ln_1", "scale"): P("fsdp"),
}


def _leaf(tree: object, path: tuple[str, ...]) -> object:
    for key in path:
        tree = tree[key]  # type: ignore[index]
    return tree


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_train_step_matches_single_device(
    shape: tuple[int, int, int], reference: dict[str, np.ndarray]
) -> None:
    setup = worker.build(shape)
    for path, spec in EXPECTED.items():
        assert _leaf(setup.shardings.params, path).spec == spec, path
        assert _leaf(setup.state.params, path).sharding.spec == spec, path
    # optimiser moments share their parameter's layout; the step counter is replicated
    moments = [x for x in jax.tree.leaves(setup.state.opt_state) if x.shape == (64, 16)]
    assert len(moments) == 2 and all(m.sharding.spec == P("tensor", "fsdp") for m in moments)
    assert setup.state.step.sharding.spec == P()
    state, losses = worker.train(setup, setup.state, 0, worker.STEPS)
    assert _leaf(state.params, ("block_0", "ffn", "basis_u")).sharding.spec == P("tensor", "fsdp")
    _assert_same_run({"losses": np.array(losses), **worker.gather(state.params)}, reference)


def test_resharding_restore_continues_training(
    tmp_path: pathlib.Path, reference: dict[str, np.ndarray]
) -> None:
    """Save on 8-way data parallel, restore on fsdp x tensor = 4 x 2, keep training."""
    steps = worker.STEPS
    first = worker.build((8, 1, 1))
    state, losses_a = worker.train(first, first.state, 0, steps - 1)
    directory = (tmp_path / "ckpt").absolute()
    with ocp.CheckpointManager(directory) as manager:
        manager.save(int(state.step), args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    del state

    second = worker.build((1, 4, 2))  # fresh state on the new mesh = restore target
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        second.state,
        second.shardings,
    )
    with ocp.CheckpointManager(directory) as manager:
        assert manager.latest_step() == steps - 1
        restored = manager.restore(steps - 1, args=ocp.args.StandardRestore(target))
    basis = _leaf(restored.params, ("block_0", "ffn", "basis_u"))
    assert basis.sharding.mesh.shape == second.mesh.shape
    assert basis.sharding.spec == P("tensor", "fsdp")
    assert int(restored.step) == steps - 1
    state, losses_b = worker.train(second, restored, steps - 1, steps)
    _assert_same_run(
        {"losses": np.array(losses_a + losses_b), **worker.gather(state.params)}, reference
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_matches_one_process(
    tmp_path: pathlib.Path, reference: dict[str, np.ndarray]
) -> None:
    """Two real processes on 127.0.0.1 (gloo CPU collectives), 4 fake devices each."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    port = _free_port()
    script = str(REPO / "tests" / "_multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(port), "2", str(i), str(tmp_path), "2,2,2"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=240)
            logs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    with np.load(tmp_path / "result.npz") as result:
        _assert_same_run(dict(result), reference)
