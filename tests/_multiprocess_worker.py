"""A few sharded GPT train steps, as one process of a multi-process run or as a single process.

``python tests/_multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR MESH_SHAPE`` starts
JAX's distributed runtime on ``127.0.0.1:PORT`` (CPU collectives through gloo; set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for N local devices), trains on the
global mesh and, on process 0, writes ``OUT_DIR/result.npz``. :func:`run` is the same loop for
the single-process comparison inside pytest.
"""

from __future__ import annotations

import functools
import os
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np

GLOBAL_BATCH, SEQ_LEN, STEPS = 8, 8, 3


def build(mesh_shape: tuple[int, ...], devices: list[Any] | None = None) -> SimpleNamespace:
    """Tiny DSC GPT, its optimiser, the sharded state and the jitted step on one mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsc_jax import sharding as sh
    from dsc_jax.gpt import GPT, GPTConfig
    from dsc_jax.losses import LossWeights
    from dsc_jax.train.optim import default_optim_config, make_optimizer
    from dsc_jax.train.state import create_train_state
    from dsc_jax.train.steps import train_step

    cfg = GPTConfig(
        vocab_size=64, max_seq_len=SEQ_LEN, num_layers=1, num_heads=2, d_model=16,
        dsc_num_bases=8, dsc_top_k=2, dsc_static_dim=8,
    )  # fmt: skip
    optim = default_optim_config()
    optim.warmup_steps = 0
    optim.learning_rate = 1e-2
    tx, _ = make_optimizer(optim, num_train_steps=10, router_lr_multiplier=5.0)
    mesh = sh.make_mesh(mesh_shape, devices)
    example = jax.ShapeDtypeStruct((GLOBAL_BATCH, SEQ_LEN), jnp.int32)
    state, state_sh = create_train_state(GPT(cfg), tx, jax.random.key(0), example, mesh)
    replicated = NamedSharding(mesh, P())
    step = jax.jit(
        functools.partial(train_step, loss_weights=LossWeights(), micro_batches=2),
        in_shardings=(state_sh, sh.batch_sharding(mesh), replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    return SimpleNamespace(mesh=mesh, state=state, shardings=state_sh, step=step)


def train(setup: SimpleNamespace, state: Any, start: int, stop: int) -> tuple[Any, list[float]]:
    """Steps ``start..stop-1`` on fixed random batches; every process feeds its own rows."""
    import jax

    from dsc_jax import sharding as sh

    data = np.random.default_rng(0).integers(0, 64, (STEPS * 4, GLOBAL_BATCH, SEQ_LEN + 1))
    rows = GLOBAL_BATCH // jax.process_count()
    lo = jax.process_index() * rows
    losses = []
    for i in range(start, stop):
        batch = sh.shard_batch(data[i, lo : lo + rows].astype(np.int32), setup.mesh)
        state, metrics = setup.step(state, batch, jax.random.key(1))
        losses.append(float(metrics["train_loss"]))
    return state, losses


def gather(params: Any) -> dict[str, np.ndarray]:
    """``{"param<path>": full numpy array}`` on every process."""
    import jax
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"param" + jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def run(
    mesh_shape: tuple[int, ...], steps: int = STEPS, devices: list[Any] | None = None
) -> dict[str, np.ndarray]:
    """Train ``steps`` steps on ``make_mesh(mesh_shape)``: ``{"losses", "param<path>"...}``."""
    setup = build(mesh_shape, devices)
    state, losses = train(setup, setup.state, 0, steps)
    return {"losses": np.array(losses), **gather(state.params)}


def main(argv: list[str]) -> None:
    port, num_processes, process_id, out_dir, mesh_arg = argv
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    from dsc_jax.sharding import initialize_distributed

    jax.config.update("jax_default_matmul_precision", "highest")
    initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id))
    assert jax.process_count() == int(num_processes), jax.process_count()
    result = run(tuple(int(s) for s in mesh_arg.split(",")))
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "result.npz"), **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
