"""Per-kind FFN configurations: what a model needs to build one FFN layer.

A model (e.g. :class:`dsc_jax.GPTConfig`) holds one of these as its ``ffn``; the config
carries the layer's own hyper-parameters, the model supplies the shared ones (``dtype``,
``param_dtype``, ``dropout_rate`` and the residual init std). Defaults are the paper's
iso-parameter sizes (:mod:`dsc_jax.paper`). Each config is validated on construction by the
layer it builds, so the error names the layer field.

    ffn = DSCConfig(num_bases=128, top_k=4, hidden_dim=256)
    layer = ffn.make(dropout_rate=0.1, out_init_std=0.02 / (2 * 6) ** 0.5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from dsc_jax import paper
from dsc_jax.layers import moe
from dsc_jax.layers.dense import DenseFFN
from dsc_jax.layers.dsc import DEFAULT_BANK_RADIUS, DSCLayer
from dsc_jax.layers.moe import MoELayer
from dsc_jax.layers.molora import MoLoRALayer


@dataclasses.dataclass(frozen=True)
class _FFNConfig:
    """Shared behaviour: ``kind``, ``make``, ``to_dict`` / ``from_dict``."""

    kind: ClassVar[str]
    layer_class: ClassVar[type[nn.Module]]

    def __post_init__(self) -> None:
        self.make()  # the layer validates every field (ValueError naming it)

    def layer_fields(self) -> dict[str, Any]:
        """The layer constructor arguments this config sets (``out_init_std`` only when
        the config fixes it)."""
        fields = dataclasses.asdict(self)
        if fields.get("out_init_std") is None:
            fields.pop("out_init_std", None)
        return fields

    def make(
        self,
        *,
        dropout_rate: float = 0.0,
        out_init_std: float | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        name: str | None = None,
    ) -> nn.Module:
        """The Linen layer. ``out_init_std`` is the model's residual-projection std, used
        unless this config fixes its own (``DSCConfig`` does: spec §1)."""
        fields = self.layer_fields()
        if out_init_std is not None:
            fields.setdefault("out_init_std", out_init_std)
        return self.layer_class(
            **fields, dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype, name=name
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (without ``kind``)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> _FFNConfig:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DenseConfig(_FFNConfig):
    """:class:`dsc_jax.DenseFFN`: ``hidden_dim`` ``H``. ``out_init_std`` None: the model's."""

    kind: ClassVar[str] = "dense"
    layer_class: ClassVar[type[nn.Module]] = DenseFFN
    hidden_dim: int = paper.DENSE_HIDDEN
    out_init_std: float | None = None


@dataclasses.dataclass(frozen=True)
class MoEConfig(_FFNConfig):
    """:class:`dsc_jax.MoELayer`: ``num_experts`` E, ``top_k``, ``hidden_dim`` (each expert),
    ``dispatch``, ``capacity_factor``, ``tile_size`` (``"sorted"``), ``jitter_std``."""

    kind: ClassVar[str] = "moe"
    layer_class: ClassVar[type[nn.Module]] = MoELayer
    num_experts: int = paper.MOE_NUM_EXPERTS
    top_k: int = paper.MOE_TOP_K
    hidden_dim: int = paper.MOE_HIDDEN
    dispatch: str = "auto"
    capacity_factor: float = moe.DEFAULT_CAPACITY_FACTOR
    tile_size: int = moe.DEFAULT_TILE_SIZE
    jitter_std: float = paper.MOE_JITTER_STD
    out_init_std: float | None = None


@dataclasses.dataclass(frozen=True)
class MoLoRAConfig(_FFNConfig):
    """:class:`dsc_jax.MoLoRALayer`: ``num_experts`` E, ``rank`` r, ``top_k``, ``hidden_dim``
    (static FFN)."""

    kind: ClassVar[str] = "molora"
    layer_class: ClassVar[type[nn.Module]] = MoLoRALayer
    num_experts: int = paper.MOLORA_NUM_EXPERTS
    rank: int = paper.MOLORA_RANK
    top_k: int = paper.MOLORA_TOP_K
    hidden_dim: int = paper.MOLORA_HIDDEN
    out_init_std: float | None = None


@dataclasses.dataclass(frozen=True)
class DSCConfig(_FFNConfig):
    """:class:`dsc_jax.DSCLayer`: ``num_bases`` M, ``top_k`` K, ``hidden_dim`` H (static FFN)
    and the router/bank options.

    ``out_init_std`` defaults to 0.02, spec §1's init of the static FFN's ``W2``; set it to
    ``None`` to take the model's residual std ``0.02/√(2L)`` like the other kinds.
    """

    kind: ClassVar[str] = "dsc"
    layer_class: ClassVar[type[nn.Module]] = DSCLayer
    num_bases: int = paper.DSC_NUM_BASES
    top_k: int = paper.DSC_TOP_K
    hidden_dim: int = paper.DSC_HIDDEN
    variant: str = "refined"
    compute: str = "auto"
    router: str = "flat"
    product_key_rows: int = 0
    product_key_aux: str = "marginal"
    frame_regularizer: bool = True
    tau: float = paper.TAU
    eps: float = paper.EPS
    gamma_init: float = paper.GAMMA_INIT
    budget_target: float = paper.BUDGET_TARGET
    bank_radius: float = DEFAULT_BANK_RADIUS
    bank_init: str = "sphere"
    out_init_std: float | None = paper.INIT_STD


FFNConfig = DenseConfig | MoEConfig | MoLoRAConfig | DSCConfig
"""The type of a model's ``ffn`` field: any of the four per-kind configs."""
FFN_CONFIGS: dict[str, type[_FFNConfig]] = {
    cls.kind: cls for cls in (DenseConfig, MoEConfig, MoLoRAConfig, DSCConfig)
}
"""Kind name -> config class: ``{"dense": DenseConfig, "moe": MoEConfig, ...}``."""
FFN_KINDS: tuple[str, ...] = tuple(FFN_CONFIGS)
"""The FFN kind names: ``("dense", "moe", "molora", "dsc")``."""


def ffn_config(kind: str, fields: Mapping[str, Any] | None = None) -> FFNConfig:
    """Build the config of ``kind`` from a mapping; unknown kinds or fields raise naming them."""
    if kind not in FFN_CONFIGS:
        raise ValueError(f"ffn kind {kind!r} is not allowed; expected one of {FFN_KINDS}.")
    cls = FFN_CONFIGS[kind]
    fields = dict(fields or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown field(s) {unknown}; expected a subset of {sorted(known)}."
        )
    return cls(**fields)
