"""Load a trained model from a run folder without the trainer or the optimiser.

    from dsc_jax.loading import load_model
    config, params, tokenizer = load_model("runs/default")
    logits = GPT(config).apply({"params": params}, tokens)      # [B, T] -> [B, T, V]

A run folder (``--workdir`` of ``train.py``) holds ``config.json`` (``{"config": the
training config, "model": GPTConfig.to_dict()}``) and ``checkpoints/<step>/`` (orbax; item
``state`` is the tree ``{"step", "params", "opt_state", "rng"}``, item ``meta`` a JSON
record). Only ``params`` is read (orbax partial restore onto an abstract tree built from the
config), so the optimiser's moments never touch memory. Nothing in the folder is modified.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax._compat import closed_event_loop_errors_quieted
from dsc_jax._storage import short_error
from dsc_jax.data.tokenizers import Tokenizer, build_tokenizer
from dsc_jax.models.gpt import GPT, GPTConfig
from dsc_jax.run_folder import CHECKPOINT_DIR, CONFIG_FILE

__all__ = [
    "LoadedModel",
    "RunNotFoundError",
    "abstract_params",
    "checkpoint_steps",
    "load_model",
    "read_run_config",
]

logger = logging.getLogger(__name__)


class RunNotFoundError(ValueError):
    """The folder is not a (finished enough) dsc_jax run: missing, empty, foreign, or without
    a restorable checkpoint. The message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained model: unpacks as ``config, params, tokenizer``.

    Attributes:
      config: the :class:`dsc_jax.GPTConfig` the run trained.
      params: the parameter tree (``jax.Array`` leaves, unboxed) for ``GPT(config).apply``.
      tokenizer: the run's tokeniser (``encode(str) -> [N] ids``, ``decode(ids) -> str``).
      step: the checkpoint's step (completed optimiser updates).
      workdir: the absolute run folder.
      run_config: the training config as a plain dict (``config.json``'s ``"config"``).
    """

    config: GPTConfig
    params: Any
    tokenizer: Tokenizer
    step: int
    workdir: str
    run_config: dict[str, Any]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.config, self.params, self.tokenizer))

    @property
    def model(self) -> GPT:
        """``GPT(self.config)``."""
        return GPT(self.config)


def read_run_config(workdir: str) -> tuple[dict[str, Any], GPTConfig]:
    """``(training config dict, GPTConfig)`` from ``workdir/config.json``.

    Raises:
      RunNotFoundError: the folder or its ``config.json`` is missing or not a dsc_jax run's.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise RunNotFoundError(f"workdir {workdir} does not exist.")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunNotFoundError(
            f"workdir {workdir} holds no {CONFIG_FILE}: it is not a dsc_jax training run "
            f"(train one with: python train.py --config=configs/default.py --workdir={workdir})."
        )
    try:
        with open(path) as f:
            record = json.load(f)
        run_config, model = record["config"], record["model"]
        return run_config, GPTConfig.from_dict(model)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunNotFoundError(
            f"{path} is not a dsc_jax run config ({type(err).__name__}: {err}); expected the "
            'JSON {"config": ..., "model": ...} that train.py writes.'
        ) from err


def checkpoint_steps(workdir: str) -> list[int]:
    """Finalised checkpoint steps of a run, oldest first (``[]`` when none)."""
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    steps = (name for name in os.listdir(directory) if name.isdigit())
    return sorted(int(s) for s in steps if os.path.isdir(os.path.join(directory, s)))


def abstract_params(config: GPTConfig, sharding: jax.sharding.Sharding | None = None) -> Any:
    """``jax.ShapeDtypeStruct`` tree of ``GPT(config)``'s parameters (no compute), each on
    ``sharding`` (default: the first local device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.unbox(GPT(config).init(jax.random.key(0), tokens)["params"]))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def restore_params(path: str, target: Any) -> Any:
    """The ``params`` of the orbax ``state`` item at ``path`` (a ``<step>/state`` folder),
    restored onto ``target`` (abstract tree with shardings); nothing else is read. Orbax is
    imported here, not with the package (``import dsc_jax`` stays light)."""
    import orbax.checkpoint as ocp

    item = {"params": target}
    restore = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(path), args=restore)["params"]


def load_model(
    workdir: str,
    *,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> LoadedModel:
    """Model config, parameters and tokeniser of a training run, without the trainer.

    Args:
      workdir: the run folder (``--workdir`` of ``train.py``).
      step: a specific checkpoint step; default: the newest one that restores (older ones
        are tried when the newest fails to read, with a warning).
      sharding: where to put every parameter (default: the first local device).

    Returns:
      A :class:`LoadedModel`; ``config, params, tokenizer = load_model(workdir)``.

    Raises:
      RunNotFoundError: missing/foreign folder, no checkpoint, no restorable checkpoint, or
        ``step`` not among the saved ones.

    Example::

        config, params, tokenizer = dsc_jax.load_model("runs/default")
        tokens = jnp.asarray(tokenizer.encode("def "), jnp.int32)[None]   # [1, T]
        logits = GPT(config).apply({"params": params}, tokens)          # [1, T, V]
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    run_config, config = read_run_config(workdir)
    data = run_config.get("data") or {}
    try:
        tokenizer = build_tokenizer(data.get("tokenizer", "byte"), data.get("gpt2_bpe_dir"))
    except (ValueError, RuntimeError, OSError) as err:
        raise RunNotFoundError(f"{workdir}: cannot build the run's tokenizer: {err}") from err
    if tokenizer.vocab_size > config.vocab_size:
        raise RunNotFoundError(
            f"{workdir}: tokenizer {tokenizer.name!r} (vocab {tokenizer.vocab_size}) does not "
            f"fit the model's vocab_size={config.vocab_size}."
        )
    steps = checkpoint_steps(workdir)
    if not steps:
        raise RunNotFoundError(
            f"workdir {workdir} has no finished checkpoint yet ({CHECKPOINT_DIR}/<step>/); "
            "train longer or wait for the first checkpoint."
        )
    if step is not None:
        if step not in steps:
            raise RunNotFoundError(f"workdir {workdir} has no checkpoint {step}; it has {steps}.")
        steps = [step]
    # orbax only when restoring: ``import dsc_jax`` stays light

    target = abstract_params(config, sharding)
    errors = []
    for candidate in reversed(steps):
        path = os.path.join(workdir, CHECKPOINT_DIR, str(candidate), "state")
        try:
            # TensorStore's callbacks after a failed read print "Event loop is closed" noise
            with closed_event_loop_errors_quieted():
                params = restore_params(path, target)
        except Exception as err:  # unreadable or of another shape: try the previous one
            errors.append(f"{candidate}: {short_error(err)}")
            if candidate != steps[0]:
                logger.warning(
                    "checkpoint %s does not restore (%s); trying an older one",
                    path,
                    short_error(err),
                )
            continue
        return LoadedModel(config, params, tokenizer, candidate, workdir, run_config)
    raise RunNotFoundError(
        f"workdir {workdir}: no checkpoint restores with the model of its {CONFIG_FILE}: "
        + "; ".join(errors)
    )
