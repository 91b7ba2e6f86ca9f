"""Sharded training: data/FSDP/tensor meshes, resharding restore, a real two-process run.

The component tests train a tiny DSC GPT (d=16, M=8, K=2, dropout on, 2 micro-batches,
``tests/_sharded_setup.py``) and must match the single-device run within float32 tolerance.
The end-to-end test runs ``train.py`` as two processes on 127.0.0.1 (gloo CPU collectives,
4 fake devices each) resuming on another mesh, against one in-process run on 8 devices.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from dsc_jax.train.checkpointing import Checkpointer
from tests import _sharded_setup as tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 2e-6


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """The single-device run."""
    return tiny.run((1, 1, 1), devices=jax.devices()[:1])


def _assert_same_run(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=RTOL)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=key)


def _leaf(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


EXPECTED = {  # path -> spec over (data, fsdp, tensor); sizes d=16, heads=2, M=8, H=8, V=64
    ("wte", "embedding"): P("tensor", "fsdp"),
    ("wpe", "embedding"): P(None, "fsdp"),
    ("block_0", "attn", "query", "kernel"): P("fsdp", "tensor", None),
    ("block_0", "attn", "out", "kernel"): P("tensor", None, "fsdp"),
    ("block_0", "ffn", "mlp_in", "kernel"): P("fsdp", "tensor"),
    ("block_0", "ffn", "basis_u"): P("tensor", "fsdp"),
    ("block_0", "ffn", "router", "kernel"): P("fsdp", "tensor"),
    ("block_0", "ffn", "router", "bias"): P("tensor"),
    ("block_0", "ln_1", "scale"): P("fsdp"),
}


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_train_step_matches_single_device(
    shape: tuple[int, int, int], reference: dict[str, np.ndarray]
) -> None:
    setup = tiny.build(shape)
    for path, spec in EXPECTED.items():
        assert _leaf(setup.shardings.params, path).spec == spec, path
        assert _leaf(setup.state.params, path).sharding.spec == spec, path
    # optimiser moments share their parameter's layout; the step counter is replicated
    moments = [x for x in jax.tree.leaves(setup.state.opt_state) if x.shape == (64, 16)]
    assert len(moments) == 2 and all(m.sharding.spec == P("tensor", "fsdp") for m in moments)
    assert setup.state.step.sharding.spec == P()
    state, losses = tiny.train(setup, setup.state, 0, tiny.STEPS)
    assert _leaf(state.params, ("block_0", "ffn", "basis_u")).sharding.spec == P("tensor", "fsdp")
    _assert_same_run({"losses": np.array(losses), **tiny.gather(state.params)}, reference)


def _saved(state: Any) -> dict[str, Any]:
    """The part of a train state that the trainer checkpoints (its rng aside)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def test_resharding_restore_continues_training(
    tmp_path: pathlib.Path, reference: dict[str, np.ndarray]
) -> None:
    """Save on 8-way data parallel, restore on fsdp x tensor = 4 x 2, keep training."""
    steps = tiny.STEPS
    first = tiny.build((8, 1, 1))
    state, losses_a = tiny.train(first, first.state, 0, steps - 1)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    checkpointer.save(steps - 1, _saved(state), {"step": steps - 1})
    checkpointer.close()
    del state

    second = tiny.build((1, 4, 2))  # its fresh state defines the restore target's shardings
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        _saved(second.state),
        _saved(second.shardings),
    )
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    restored = checkpointer.restore_latest(target)  # checks the content fingerprint too
    checkpointer.close()
    assert restored is not None and restored.step == steps - 1
    basis = _leaf(restored.tree["params"], ("block_0", "ffn", "basis_u"))
    assert basis.sharding.mesh.shape == second.mesh.shape
    assert basis.sharding.spec == P("tensor", "fsdp")
    state = second.state.replace(**restored.tree)
    state, losses_b = tiny.train(second, state, steps - 1, steps)
    _assert_same_run(
        {"losses": np.array(losses_a + losses_b), **tiny.gather(state.params)}, reference
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(workdir: pathlib.Path) -> dict[int, dict[str, Any]]:
    with open(workdir / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _restore_numpy(state_dir: pathlib.Path) -> list[np.ndarray]:
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(state_dir)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return jax.tree.leaves(checkpointer.restore(state_dir, restore_args=args))


@pytest.mark.slow
def test_two_process_cli_resumes_on_another_mesh(tmp_path: pathlib.Path) -> None:
    """``train.py`` on 8 devices (8,1,1) to step 6 is the reference; a copy of its run cut
    back to the step-3 checkpoint is resumed by two processes on (1,4,2) and must end equal."""
    from configs import tiny as tiny_config
    from dsc_jax.train.trainer import train_and_evaluate

    overrides = {"num_train_steps": 6, "checkpoint_every_steps": 3, "log_every_steps": 1}
    config = tiny_config.get_config()
    config.update(overrides)
    config.eval_every_steps = 0
    config.mesh.shape = (8, 1, 1)
    reference = tmp_path / "reference"
    train_and_evaluate(config, str(reference))

    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")

    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    port = _free_port()
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    flags += ["--config.eval_every_steps=0", "--config.mesh.shape=(1,4,2)"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                "--config=configs/tiny.py",
                f"--workdir={resumed}",
                *flags,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
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
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    assert "resumed" in logs[0] and "mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in logs[0]

    want, got = _metrics(reference), _metrics(resumed)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for key in ("train_loss", "grad_norm", "reg_aux", "reg_frame"):
            want_value = want[step][key]
            np.testing.assert_allclose(
                got[step][key], want_value, rtol=1e-5, atol=1e-7, err_msg=key
            )
    assert "eval_loss" in want[6]  # the last step evaluates (per-process eval slices)
    np.testing.assert_allclose(got[6]["eval_loss"], want[6]["eval_loss"], rtol=1e-5)
    final_want = _restore_numpy(reference / "checkpoints" / "6" / "state")
    final_got = _restore_numpy(resumed / "checkpoints" / "6" / "state")
    assert len(final_got) == len(final_want)
    for a, b in zip(final_got, final_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
