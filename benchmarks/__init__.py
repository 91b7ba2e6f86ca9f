"""Latency and throughput benchmarks of the dsc_jax layers and training step.

Run from the repository root as modules, e.g. ``python -m benchmarks.layer_latency``,
``python -m benchmarks.train_step``, ``python -m benchmarks.product_key``. They import only
the library (``dsc_jax``) and each other; method and measured tables: ``docs/benchmarks.md``
and ``benchmarks/README.md``.
"""
