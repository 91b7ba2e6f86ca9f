"""Training: optimiser, train state, steps, checkpoints, metrics, config, the loop.

Modules (import them directly; this package imports nothing so that ``import dsc_jax`` stays
light):

* :mod:`dsc_jax.train.trainer` -- ``train_and_evaluate(config, workdir)``: prepare, build,
  restore, loop, close;
* :mod:`dsc_jax.train.run` -- ``build_run`` (mesh, data, model, optimiser, abstract state)
  and ``restore_or_start``;
* :mod:`dsc_jax.train.resume` -- ``prepare_workdir``: lock, resume, set aside or refuse;
* :mod:`dsc_jax.train.workdir` -- the workdir lock, writability probe, ``config.json``;
* :mod:`dsc_jax.train.preemption` -- SIGINT/SIGTERM from the first import to the last step;
* :mod:`dsc_jax.train.numerics` -- the NaN/Inf gate before every log and checkpoint;
* :mod:`dsc_jax.train.evaluation` -- validation loss, perplexity and diagnostics;
* :mod:`dsc_jax.train.optim` -- ``make_optimizer``: AdamW groups (router ×multiplier, decay
  masks), warm-up + cosine schedule, global-norm clipping;
* :mod:`dsc_jax.train.state` -- ``TrainState`` with the bank projection,
  ``create_train_state`` / ``abstract_train_state`` / ``init_train_state`` (sharded);
* :mod:`dsc_jax.train.steps` -- pure ``train_step`` (gradient accumulation) and ``eval_step``;
* :mod:`dsc_jax.train.diagnostics` -- routing usage, signal collapse, bank effective rank;
* :mod:`dsc_jax.train.checkpointing` -- ``Checkpointer`` (orbax, integrity fallback);
* :mod:`dsc_jax.train.metrics` -- ``MetricsWriter`` (metrics.jsonl, TensorBoard, console);
* :mod:`dsc_jax.train.config` -- ``base_config``, ``set_ffn_kind``, ``validate_config``;
* :mod:`dsc_jax.train.settings` -- ``unread_settings``, ``resume_changes``;
* :mod:`dsc_jax.train.presets` -- every named run config (``default``, ``tiny``,
  ``paper_recipe``, the ``dsc-compare`` study bases);
"""
