"""Optimiser groups of a parameter tree, for ``optax.multi_transform`` / ``optax.partition``.

Labels, from the dict keys of each parameter's path (boxed ``nn.Partitioned`` trees label the
same as unboxed ones):

* ``"router"``: a path component is in ``router_names`` (``router``, ``router_norm``): every
  router kernel, bias and router LayerNorm (DSC, MoE, MoLoRA). The paper's recipe (Table 2): 5×
  learning rate, no weight decay.
* ``"bank"``: the DSC bank ``basis_u`` / ``basis_v`` ``[M, d]`` (rows at norm
  ``bank_radius``; see :mod:`dsc_jax.bank`).
* ``"decay"``: every other parameter with ``ndim >= 2`` (embeddings, attention and FFN
  kernels, expert weights); also DSC ``gamma`` when ``decay_gamma`` (the reference code
  decays it; the paper's recipe decays only ≥2-D parameters, so the default does not).
* ``"no_decay"``: the rest (LayerNorm scales and biases, biases, ``gamma``).

    tx = optax.multi_transform(
        {"decay": optax.adamw(3e-4), "bank": optax.adamw(3e-4), "no_decay": optax.adam(3e-4),
         "router": optax.adam(1.5e-3)},
        param_labels,
    )
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

ROUTER_MODULE_NAMES: tuple[str, ...] = ("router", "router_norm")
BANK_PARAM_NAMES: tuple[str, ...] = ("basis_u", "basis_v")
GROUPS: tuple[str, ...] = ("decay", "no_decay", "router", "bank")


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """The dict keys (or attribute names) of a ``jax.tree_util`` key path, as strings."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            names.append(key.name)
    return tuple(names)


def is_bank_path(path: Sequence[Any]) -> bool:
    """Whether a key path ends in a bank parameter name (``basis_u`` / ``basis_v``)."""
    names = path_names(path)
    return bool(names) and names[-1] in BANK_PARAM_NAMES


def param_label(
    path: Sequence[Any],
    leaf: Any,
    *,
    router_names: Sequence[str] = ROUTER_MODULE_NAMES,
    decay_gamma: bool = False,
) -> str:
    """Group label (one of :data:`GROUPS`) of one parameter from its key path and array."""
    names = path_names(path)
    if any(name in router_names for name in names):
        return "router"
    if is_bank_path(path):
        return "bank"
    if decay_gamma and names and names[-1] == "gamma":
        return "decay"
    return "decay" if jnp.ndim(leaf) >= 2 else "no_decay"


def param_labels(
    params: Any,
    *,
    router_names: Sequence[str] = ROUTER_MODULE_NAMES,
    decay_gamma: bool = False,
) -> Any:
    """Tree of group labels with the structure of ``params`` (boxed or unboxed)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_label(
            path, leaf, router_names=router_names, decay_gamma=decay_gamma
        ),
        params,
    )
