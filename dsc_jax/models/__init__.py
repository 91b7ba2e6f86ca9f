"""Models built from the layers: the GPT, its parameter counts and the iso-active solver."""

from dsc_jax.models.gpt import GPT, GPTConfig
from dsc_jax.models.param_count import count_params
from dsc_jax.models.solver import IsoActiveSolution, solve_iso_active

__all__ = ["GPT", "GPTConfig", "IsoActiveSolution", "count_params", "solve_iso_active"]
