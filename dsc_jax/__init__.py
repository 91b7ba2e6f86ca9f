"""dsc_jax: Dynamic Subspace Composition (arXiv 2512.23448) in JAX/Flax.

Public API:

* layers (Flax Linen, :mod:`dsc_jax.layers`): :class:`DSCLayer`, :class:`MoELayer`,
  :class:`MoLoRALayer`, :class:`DenseFFN`, and their per-kind configs :class:`DSCConfig`,
  :class:`MoEConfig`, :class:`MoLoRAConfig`, :class:`DenseConfig`;
* the same layers as Flax NNX modules: :mod:`dsc_jax.nnx`;
* the model (:mod:`dsc_jax.models`): :class:`GPT` / :class:`GPTConfig`, the iso-active
  solver :func:`solve_iso_active`;
* losses: :class:`LossWeights`, :func:`regularization_loss`, :func:`cross_entropy_loss`;
* optimisation: :func:`bank_retraction` (optax), :func:`retract_bank`, :func:`param_labels`;
* sharding: :data:`LOGICAL_AXIS_RULES` (merge into your model's rules);
* after training: :func:`load_model` (config, params, tokenizer of a run folder) and
  :func:`generate` / :func:`sample_text` (key/value-cached sampling);
* the paper's numbers: :mod:`dsc_jax.paper`.

The names are imported on first use (PEP 562): ``import dsc_jax`` itself loads neither JAX nor
Flax, so the command-line tools can answer Ctrl-C before those imports start.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.2.0"

# public name -> the module that defines it ("" for a submodule of the same name)
_EXPORTS: dict[str, str] = {
    "GPT": "dsc_jax.models",
    "LOGICAL_AXIS_RULES": "dsc_jax.sharding",
    "DSCConfig": "dsc_jax.layers",
    "DSCLayer": "dsc_jax.layers",
    "DenseConfig": "dsc_jax.layers",
    "DenseFFN": "dsc_jax.layers",
    "GPTConfig": "dsc_jax.models",
    "Generation": "dsc_jax.generate",
    "IsoActiveSolution": "dsc_jax.models",
    "LoadedModel": "dsc_jax.loading",
    "LossWeights": "dsc_jax.layers",
    "MoEConfig": "dsc_jax.layers",
    "MoELayer": "dsc_jax.layers",
    "MoLoRAConfig": "dsc_jax.layers",
    "MoLoRALayer": "dsc_jax.layers",
    "RunNotFoundError": "dsc_jax.loading",
    "SamplingConfig": "dsc_jax.generate",
    "bank_retraction": "dsc_jax.bank",
    "cross_entropy_loss": "dsc_jax.layers",
    "generate": "dsc_jax.generate",
    "load_model": "dsc_jax.loading",
    "paper": "",
    "param_labels": "dsc_jax.param_groups",
    "regularization_loss": "dsc_jax.layers",
    "retract_bank": "dsc_jax.bank",
    "sample_text": "dsc_jax.generate",
    "solve_iso_active": "dsc_jax.models",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, e.g. ``dsc_jax.nnx``) on first use."""
    if name in _EXPORTS:
        module = _EXPORTS[name]
        value = (
            importlib.import_module(f"{__name__}.{name}")
            if not module
            else getattr(importlib.import_module(module), name)
        )
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``dsc_jax.generate`` the function: importing the submodule of the same name
    would otherwise bind the module to that attribute."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and _EXPORTS[name] and isinstance(value, types.ModuleType):
            return  # the import system binding a submodule over a public name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
