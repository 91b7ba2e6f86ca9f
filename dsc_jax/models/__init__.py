"""Models built from the layers: the GPT and the iso-active parameter solver."""

from dsc_jax.models.gpt import GPT, GPTConfig
from dsc_jax.models.solver import IsoActiveSolution, count_params, solve_iso_active

__all__ = ["GPT", "GPTConfig", "IsoActiveSolution", "count_params", "solve_iso_active"]
