"""The training loop: ``train_and_evaluate(config, workdir)``.

Order of work: validate the config (no compute) → mesh → data → model and optimiser →
sharded state → restore the newest intact checkpoint (if any) → jitted steps → loop.

Step numbering: ``step`` in metrics and checkpoints counts completed optimiser updates; the
update that turns ``state.step = s - 1`` into ``s`` is "step ``s``". Logging happens at step
1, every ``log_every_steps``, at evaluations and at the last step; evaluation every
``eval_every_steps`` and at the last step; checkpoints every ``checkpoint_every_steps``, at
the last step and when SIGTERM/SIGINT arrives (the handler only sets a flag; the loop saves
after the current step and returns; a second signal kills at once).

Training losses are checked for NaN/Inf before every log, evaluation and checkpoint (the
per-step values are kept on device until then): the first bad step raises
:class:`NonFiniteLossError`; no checkpoint of a bad state is ever written, so the last good
one stays.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsc_jax.data import build_data
from dsc_jax.layers.losses import LossWeights
from dsc_jax.models.gpt import GPT
from dsc_jax.sharding import BATCH_AXES, make_mesh, rules_from_config, shard_batch
from dsc_jax.train import config as config_lib
from dsc_jax.train import diagnostics, steps
from dsc_jax.train.checkpointing import Checkpointer
from dsc_jax.train.metrics import MetricsWriter
from dsc_jax.train.optim import make_optimizer
from dsc_jax.train.state import TrainState, abstract_train_state, init_train_state


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


class DataSetupError(RuntimeError):
    """The data could not be built (missing files or network, bad corpus); the message is the
    data layer's own."""


class StopFlag:
    """SIGTERM/SIGINT → ``flag.requested = True`` (a second signal restores the default
    handler and re-raises it). A no-op outside the main thread."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.requested: str | None = None
        self._signals = signals
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.requested is not None:  # second signal: give up gracefully stopping
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.requested = signal.Signals(signum).name
        logging.warning(
            "%s received: saving a checkpoint after this step, then stopping", self.requested
        )

    def __enter__(self) -> StopFlag:
        try:
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _enable_compilation_cache(path: str) -> None:
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(os.path.expanduser(path))
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # take effect even after earlier compilations


def _check_batch_divisibility(config: ml_collections.ConfigDict, mesh: Any) -> None:
    shards = 1
    for axis in BATCH_AXES:
        shards *= mesh.shape[axis]
    for key, value in (
        ("batch_size", config.batch_size),
        ("eval_batch_size", config_lib.eval_batch_size(config)),
    ):
        if value % shards or value % jax.process_count():
            raise ValueError(
                f"config.{key}={value} is invalid for mesh {dict(mesh.shape)}; expected a "
                f"multiple of data*fsdp={shards} and of the process count {jax.process_count()}."
            )


def _first_nonfinite(pending: list[tuple[int, jax.Array]]) -> tuple[int, float] | None:
    values = jax.device_get([loss for _, loss in pending])
    for (step, _), value in zip(pending, values, strict=True):
        if not jnp.isfinite(value):
            return step, float(value)
    return None


def _agree_across_processes(local_flag: bool) -> bool:
    """True on every process when any process has the flag (a stop must be collective: every
    process has to join the same checkpoint save). One tiny all-gather per step, multi-host only.
    """
    if jax.process_count() == 1:
        return local_flag
    flags = multihost_utils.process_allgather(np.asarray(local_flag, np.int32))
    return bool(np.any(flags))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) the run in ``workdir`` as described by ``config``.

    Args:
      config: a training config (see :func:`dsc_jax.train.config.base_config`).
      workdir: run folder; ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and
        ``config.json`` go there. An existing run there is resumed.

    Returns:
      ``{"status": "completed" | "interrupted", "step": last step, "final": last metrics}``.

    Raises:
      ValueError: bad configuration (before any compute) or a checkpoint of another config.
      DataSetupError: the data could not be built.
      NonFiniteLossError: the training loss became NaN/Inf (names the step).
    """
    config_lib.validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    is_main = jax.process_index() == 0
    if config.compilation_cache_dir:
        _enable_compilation_cache(config.compilation_cache_dir)
    mesh = make_mesh(config.mesh.shape)
    rules = rules_from_config(config.mesh)
    _check_batch_divisibility(config, mesh)

    try:
        bundle = build_data(
            config.data,
            seq_len=config.seq_len,
            global_batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except Exception as err:  # one clear message for every data failure (see DataSetupError)
        raise DataSetupError(f"data setup failed: {type(err).__name__}: {err}") from err
    model_cfg = config_lib.model_config(config, bundle.vocab_size)
    model = GPT(model_cfg)
    tx, schedule = make_optimizer(
        config.optim,
        num_train_steps=config.num_train_steps,
        router_lr_multiplier=config.router_lr_multiplier,
    )
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"config": config.to_dict(), "model": model_cfg.to_dict()}, f, indent=2)

    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    micro_rows = config.batch_size // config.micro_batches
    example = jax.ShapeDtypeStruct((micro_rows, config.seq_len), jnp.int32)
    abstract_state, state_shardings = abstract_train_state(
        model, tx, init_rng, example, mesh, bank_projection=config.bank_projection, rules=rules
    )
    replicated = NamedSharding(mesh, P())
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
    )

    def to_tree(state: TrainState, rng: jax.Array) -> dict[str, Any]:
        return {
            "step": state.step,
            "params": state.params,
            "opt_state": state.opt_state,
            "rng": jax.random.key_data(rng),
        }

    abstract_tree = to_tree(abstract_state, dropout_rng)
    abstract_tree["rng"] = jax.ShapeDtypeStruct(
        abstract_tree["rng"].shape, jnp.uint32, sharding=replicated
    )
    try:
        restored = checkpointer.restore_latest(abstract_tree)
    except BaseException:  # e.g. IncompatibleCheckpointError: release orbax's threads first
        checkpointer.close()
        raise
    if restored is None:
        state = init_train_state(
            model, tx, init_rng, example, state_shardings, bank_projection=config.bank_projection
        )
        # One global array on every process (device_put cannot target other processes'
        # devices; a jit output with a replicated sharding can).
        rng = jax.jit(jax.random.wrap_key_data, out_shardings=replicated)(
            np.asarray(jax.random.key_data(dropout_rng))
        )
        logging.info("fresh run in %s", workdir)
    else:
        tree = restored.tree
        state = abstract_state.replace(
            step=tree["step"], params=tree["params"], opt_state=tree["opt_state"]
        )
        rng = jax.random.wrap_key_data(tree["rng"])
        bundle.train.set_state(restored.data_state)
        logging.info("resumed %s from checkpoint step %d", workdir, restored.step)
    start_step = int(jax.device_get(state.step))
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logging.info(
        "model: ffn=%s d=%d L=%d, %.2f M parameters | mesh %s | data: %d train / %d validation "
        "tokens, vocab %d | %d steps of %d x %d tokens",
        model_cfg.ffn_kind,
        model_cfg.d_model,
        model_cfg.num_layers,
        num_params / 1e6,
        dict(mesh.shape),
        len(bundle.train_tokens),
        len(bundle.validation_tokens),
        bundle.vocab_size,
        config.num_train_steps,
        config.batch_size,
        config.seq_len,
    )

    train_step = jax.jit(
        functools.partial(
            steps.train_step,
            loss_weights=LossWeights(**config.losses.to_dict()),
            micro_batches=config.micro_batches,
            lr_schedule=schedule,
            router_lr_multiplier=config.router_lr_multiplier,
        ),
        in_shardings=(state_shardings, shard_batch_spec(mesh), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    evaluate = _make_evaluator(config, bundle, model, mesh, state_shardings.params)

    writer = MetricsWriter(
        workdir, total_steps=config.num_train_steps, enabled=is_main, resume_step=start_step
    )
    tokens_per_step = config.batch_size * config.seq_len
    total = config.num_train_steps
    status, last_record = "completed", {}
    last_saved = start_step if restored is not None else None
    pending: list[tuple[int, jax.Array]] = []
    interval_start, interval_steps = None, 0

    def check_finite() -> None:
        bad = _first_nonfinite(pending) if pending else None
        pending.clear()
        if bad is not None:
            saved = checkpointer.all_steps()
            raise NonFiniteLossError(
                f"training loss is {bad[1]} at step {bad[0]}; stopping. The last good "
                f"checkpoint ({saved[-1] if saved else 'none'}) in {checkpointer.directory} "
                "is kept; lower the learning rate or check the data before resuming."
            )

    def save(step: int) -> None:
        nonlocal last_saved
        if last_saved != step:
            checkpointer.save(step, to_tree(state, rng), bundle.train.get_state())
            last_saved = step

    try:
        with StopFlag() as stop:
            if start_step >= total:
                logging.info("nothing to do: step %d >= num_train_steps %d", start_step, total)
            for step in range(start_step + 1, total + 1):
                batch = shard_batch(next(bundle.train), mesh)
                state, metrics = train_step(state, batch, rng)
                pending.append((step, metrics["train_loss"]))
                if interval_start is None:  # first step of this run: exclude compilation
                    jax.block_until_ready(metrics)
                    interval_start, interval_steps = time.perf_counter(), 0
                else:
                    interval_steps += 1
                last = step == total
                # One snapshot per step: a signal arriving later in this step is acted on
                # after the next step (save first, then stop), never half-way.
                stopping = _agree_across_processes(stop.requested is not None)
                do_eval = config.eval_batches > 0 and (
                    last or (config.eval_every_steps and step % config.eval_every_steps == 0)
                )
                do_log = do_eval or last or step == 1 or step % config.log_every_steps == 0
                do_save = (
                    last
                    or stopping
                    or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
                )
                if do_log:
                    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - interval_start
                    check_finite()
                    if interval_steps:
                        record["step_time"] = elapsed / interval_steps
                        record["tokens_per_sec"] = tokens_per_step * interval_steps / elapsed
                    else:
                        record["step_time"] = record["tokens_per_sec"] = None
                    if do_eval:
                        record.update(evaluate(state.params))
                    writer.write(step, record)
                    last_record = record
                if do_save:
                    check_finite()
                    save(step)
                if do_log or do_save:
                    interval_start, interval_steps = time.perf_counter(), 0
                if stopping and not last:
                    status = "interrupted"
                    logging.warning("stopped by %s after step %d", stop.requested, step)
                    break
            check_finite()
    finally:
        checkpointer.close()
        writer.close()
    final_step = int(jax.device_get(state.step))
    return {"status": status, "step": final_step, "final": last_record}


def shard_batch_spec(mesh: Any) -> NamedSharding:
    """Sharding of a ``[B, T + 1]`` batch: rows over ``("data", "fsdp")``."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def _make_evaluator(
    config: ml_collections.ConfigDict,
    bundle: Any,
    model: GPT,
    mesh: Any,
    param_shardings: Any,
) -> Callable[[Any], dict[str, float]]:
    """``params -> {"eval_loss", "eval_ppl", "diag/..."}`` over fixed validation batches."""
    if config.eval_batches == 0:
        return lambda params: {}
    replicated = NamedSharding(mesh, P())
    host_batches = bundle.eval_batches(config.eval_batches, config_lib.eval_batch_size(config))
    batches = [shard_batch(b, mesh) for b in host_batches]
    eval_step = jax.jit(
        functools.partial(steps.eval_step, apply_fn=model.apply),
        in_shardings=(param_shardings, shard_batch_spec(mesh)),
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
