"""A tiny DSC GPT trained for a few sharded steps with the trainer's own pieces.

:func:`build` creates the model, optimiser, sharded state and jitted step on a mesh,
:func:`train` feeds fixed batches (each process its own rows), :func:`gather` collects the
parameters as numpy. Used by ``tests/test_sharded_train.py``.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax import sharding as sh
from dsc_jax.layers.configs import DSCConfig
from dsc_jax.layers.losses import LossWeights
from dsc_jax.models.gpt import GPT, GPTConfig
from dsc_jax.train.optim import default_optim_config, make_optimizer
from dsc_jax.train.state import create_train_state
from dsc_jax.train.steps import train_step

GLOBAL_BATCH, SEQ_LEN, STEPS = 8, 8, 3
CONFIG = GPTConfig(
    vocab_size=64, max_seq_len=SEQ_LEN, num_layers=1, num_heads=2, d_model=16,
    ffn=DSCConfig(num_bases=8, top_k=2, hidden_dim=8), dropout_rate=0.1,
)  # fmt: skip


def build(mesh_shape: tuple[int, ...], devices: list[Any] | None = None) -> SimpleNamespace:
    """Model, optimiser (the paper's Table 2 groups, clipping), sharded state and jitted step
    on a mesh."""
    optim = default_optim_config()
    optim.warmup_steps = 0
    optim.learning_rate = 1e-2
    tx, _ = make_optimizer(optim, num_train_steps=10, router_lr_multiplier=5.0)
    mesh = sh.make_mesh(mesh_shape, devices)
    example = jax.ShapeDtypeStruct((GLOBAL_BATCH, SEQ_LEN), jnp.int32)
    state, state_sh = create_train_state(GPT(CONFIG), tx, jax.random.key(0), example, mesh)
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
