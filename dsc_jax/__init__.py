"""dsc_jax: Dynamic Subspace Composition (arXiv 2512.23448) in JAX/Flax."""
