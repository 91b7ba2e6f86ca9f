"""Training: optimiser, train state, steps, checkpoints, metrics, config, the loop.

Modules (import them directly; this package imports nothing so that ``import dsc_jax`` stays
light):

* :mod:`dsc_jax.train.optim` -- ``make_optimizer``: AdamW groups (router ×multiplier, decay
  masks), warm-up + cosine schedule, global-norm clipping;
* :mod:`dsc_jax.train.state` -- ``TrainState`` with the bank projection (spec §4),
  ``create_train_state`` / ``abstract_train_state`` / ``init_train_state`` (sharded);
* :mod:`dsc_jax.train.steps` -- pure ``train_step`` (gradient accumulation) and ``eval_step``;
* :mod:`dsc_jax.train.diagnostics` -- routing usage, signal collapse, bank effective rank;
* :mod:`dsc_jax.train.checkpointing` -- ``Checkpointer`` (orbax, integrity fallback);
* :mod:`dsc_jax.train.metrics` -- ``MetricsWriter`` (metrics.jsonl, TensorBoard, console);
* :mod:`dsc_jax.train.config` -- ``base_config``, ``set_ffn_kind``, ``validate_config``;
* :mod:`dsc_jax.train.settings` -- ``unread_settings``, ``resume_changes``;
* :mod:`dsc_jax.train.presets` -- every named run config (``default``, ``tiny``,
  ``paper_recipe``, the ``dsc-compare`` study bases);
* :mod:`dsc_jax.train.trainer` -- ``train_and_evaluate(config, workdir)``.
"""
