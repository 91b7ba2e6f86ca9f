"""Build a run from its config, then restore its newest checkpoint or start it.

:func:`build_run` makes everything the loop needs except the state (mesh, data, model,
optimiser, the abstract sharded state) and writes nothing; :func:`restore_or_start` restores
the newest intact checkpoint onto that layout (any mesh) or initialises the state sharded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax.data import DataBundle, build_data
from dsc_jax.models.gpt import GPT, GPTConfig
from dsc_jax.sharding import check_batch_size, make_mesh, rules_from_config
from dsc_jax.train import config as config_lib
from dsc_jax.train.checkpointing import Checkpointer, Restored
from dsc_jax.train.optim import make_optimizer
from dsc_jax.train.state import TrainState, abstract_train_state, init_train_state


class DataSetupError(RuntimeError):
    """The data could not be built (missing files or network, bad corpus); the message is the
    data layer's own."""


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built from the config (no state yet).

    Attributes:
      config: the validated training config.
      workdir: the absolute run folder.
      mesh: the device mesh ``("data", "fsdp", "tensor")``.
      bundle: the data (tokeniser, corpus, train iterator, validation batches).
      model_cfg: the model's config (vocabulary from the data).
      model: ``GPT(model_cfg)``.
      tx: the optimiser (without the bank projection, which the state adds).
      schedule: the base learning-rate schedule ``step -> lr``.
      abstract_state: the state's ``jax.ShapeDtypeStruct`` leaves with their shardings.
      state_shardings: the same tree of ``NamedSharding``.
      replicated: ``NamedSharding`` of a value every device holds whole.
      init_rng: parameter-initialisation key.
      dropout_rng: the run's base dropout key.
      example: ``[batch_size / micro_batches, seq_len]`` int32 shape of one model input.
    """

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    bundle: DataBundle
    model_cfg: GPTConfig
    model: GPT
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    replicated: NamedSharding
    init_rng: jax.Array
    dropout_rng: jax.Array
    example: jax.ShapeDtypeStruct


def _enable_compilation_cache(path: str) -> None:
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(os.path.expanduser(path))
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # take effect even after earlier compilations


def _build_data(config: ml_collections.ConfigDict) -> DataBundle:
    try:
        return build_data(
            config.data,
            seq_len=config.seq_len,
            global_batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except Exception as err:  # one clear message for every data failure (see DataSetupError)
        raise DataSetupError(f"data setup failed: {type(err).__name__}: {err}") from err


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Mesh, data, model, optimiser and the abstract sharded state (no files written).

    Raises:
      ValueError: a batch size that does not split over the mesh and the processes.
      DataSetupError: the data could not be built.
    """
    if config.compilation_cache_dir:
        _enable_compilation_cache(config.compilation_cache_dir)
    mesh = make_mesh(config.mesh.shape)
    rules = rules_from_config(config.mesh)
    check_batch_size(config.batch_size, mesh, "config.batch_size")
    check_batch_size(config_lib.eval_batch_size(config), mesh, "config.eval_batch_size")
    bundle = _build_data(config)
    model_cfg = config_lib.model_config(config, bundle.vocab_size)
    model = GPT(model_cfg)
    tx, schedule = make_optimizer(
        config.optim,
        num_train_steps=config.num_train_steps,
        router_lr_multiplier=config.router_lr_multiplier,
    )
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    micro_rows = config.batch_size // config.micro_batches
    example = jax.ShapeDtypeStruct((micro_rows, config.seq_len), jnp.int32)
    abstract_state, state_shardings = abstract_train_state(
        model, tx, init_rng, example, mesh, rules=rules, **config_lib.bank_settings(config)
    )
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        bundle=bundle,
        model_cfg=model_cfg,
        model=model,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        replicated=NamedSharding(mesh, P()),
        init_rng=init_rng,
        dropout_rng=dropout_rng,
        example=example,
    )


def checkpoint_tree(state: TrainState, rng: jax.Array) -> dict[str, Any]:
    """What a checkpoint holds: ``{"step", "params", "opt_state", "rng"}`` (the key as its
    uint32 data)."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(rng),
    }


def _fresh_start(run: Run) -> tuple[TrainState, jax.Array]:
    state = init_train_state(
        run.model,
        run.tx,
        run.init_rng,
        run.example,
        run.state_shardings,
        **config_lib.bank_settings(run.config),
    )
    # One global array on every process (device_put cannot target other processes'
    # devices; a jit output with a replicated sharding can).
    rng = jax.jit(jax.random.wrap_key_data, out_shardings=run.replicated)(
        np.asarray(jax.random.key_data(run.dropout_rng))
    )
    return state, rng


def _resumed(run: Run, restored: Restored) -> tuple[TrainState, jax.Array]:
    if restored.config is not None:  # the settings that wrote the state actually restored
        config_lib.check_resume_config(
            restored.config, run.config, run.workdir, f"its checkpoint {restored.step}"
        )
    tree = restored.tree
    state = run.abstract_state.replace(
        step=tree["step"], params=tree["params"], opt_state=tree["opt_state"]
    )
    run.bundle.train.set_state(restored.data_state)
    return state, jax.random.wrap_key_data(tree["rng"])


def restore_or_start(run: Run, checkpointer: Checkpointer) -> tuple[TrainState, jax.Array, bool]:
    """The newest intact checkpoint, or a freshly initialised state.

    Returns:
      ``(state, rng, restored)``.

    Raises:
      IncompatibleCheckpointError: a checkpoint of another configuration, or inconsistent.
      UnreadableCheckpointsError: checkpoints exist but none can be read.
      ValueError: the restored checkpoint records settings that may not change and did.
    """
    abstract_tree = checkpoint_tree(run.abstract_state, run.dropout_rng)
    abstract_tree["rng"] = jax.ShapeDtypeStruct(
        abstract_tree["rng"].shape, jnp.uint32, sharding=run.replicated
    )
    restored = checkpointer.restore_latest(abstract_tree)
    if restored is None:
        state, rng = _fresh_start(run)
        logging.info("fresh run in %s", run.workdir)
        return state, rng, False
    state, rng = _resumed(run, restored)
    logging.info("resumed %s from checkpoint step %d", run.workdir, restored.step)
    return state, rng, True
