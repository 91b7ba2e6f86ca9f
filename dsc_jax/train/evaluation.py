"""Evaluation over fixed validation batches: loss, perplexity and the routing diagnostics."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax.data import DataBundle
from dsc_jax.models.gpt import GPT
from dsc_jax.sharding import batch_sharding, shard_batch
from dsc_jax.train import config as config_lib
from dsc_jax.train import diagnostics, steps

Evaluator = Callable[[Any], dict[str, float]]


def make_evaluator(
    config: ml_collections.ConfigDict,
    bundle: DataBundle,
    model: GPT,
    mesh: Mesh,
    param_shardings: Any,
) -> Evaluator:
    """``params -> {"eval_loss", "eval_ppl", "diag/..."}`` over ``config.eval_batches``
    fixed validation batches of ``[eval_batch_size, T + 1]`` tokens (put on the mesh once).

    Args:
      config: the training config (``eval_batches``, ``eval_batch_size``).
      bundle: the run's data (its validation split).
      model: the model (``model.apply``).
      mesh: device mesh.
      param_shardings: ``NamedSharding`` tree of the parameters.

    Returns:
      The evaluator; ``{}`` for every call when ``config.eval_batches == 0``.
    """
    if config.eval_batches == 0:
        return lambda params: {}
    replicated = NamedSharding(mesh, P())
    host_batches = bundle.eval_batches(config.eval_batches, config_lib.eval_batch_size(config))
    batches = [shard_batch(b, mesh) for b in host_batches]
    eval_step = jax.jit(
        functools.partial(steps.eval_step, apply_fn=model.apply),
        in_shardings=(param_shardings, batch_sharding(mesh)),
        out_shardings=replicated,
    )
    banks = jax.jit(
        diagnostics.bank_parameters, in_shardings=(param_shardings,), out_shardings=replicated
    )

    def evaluate(params: Any) -> dict[str, float]:
        sums = None
        for batch in batches:
            out = eval_step(params, batch)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        result = diagnostics.finalize_eval(sums)
        result.update(diagnostics.bank_effective_ranks(banks(params)))
        return result

    return evaluate
