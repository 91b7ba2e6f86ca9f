"""Per-kind FFN configurations: what a model needs to build one FFN layer.

A model (e.g. :class:`dsc_jax.GPTConfig`) holds one of these as its ``ffn``; the config
carries the layer's own hyper-parameters, the model supplies the shared ones (``dtype``,
``param_dtype``, ``dropout_rate`` and the residual init std). The fields are the layer's
(:func:`_from_layer` reads them off the Linen dataclass, so a field added to a layer is in its
config), with the layer's defaults; the sizes the layer requires default to the paper's
iso-parameter ones (:mod:`dsc_jax.paper`). Each config is validated on construction by the
layer it builds, so the error names the layer field.

    ffn = DSCConfig(num_bases=128, top_k=4, hidden_dim=256)
    layer = ffn.make(dropout_rate=0.1, out_init_std=0.02 / (2 * 6) ** 0.5)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from dsc_jax import paper
from dsc_jax.layers.dense import DenseFFN
from dsc_jax.layers.dsc import DSCLayer
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
        unless this config fixes its own (``DSCConfig`` does)."""
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


MODEL_FIELDS = ("dropout_rate", "dtype", "param_dtype", "parent", "name")
"""Layer fields the model supplies to every FFN (:meth:`_FFNConfig.make`), not its config."""


def _from_layer(layer: type[nn.Module], **defaults: Any) -> Callable[[type], type]:
    """Class decorator: a frozen dataclass whose fields are ``layer``'s dataclass fields
    less :data:`MODEL_FIELDS`, in the layer's order and with the layer's defaults, except the
    ``defaults`` given here (sizes the layer requires, and ``out_init_std``). A field added to
    the layer is a field of its config; one without any default raises at import."""

    def build(cls: type) -> type:
        unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(layer)})
        if unknown:
            raise TypeError(f"{cls.__name__}: {unknown} are not fields of {layer.__name__}.")
        cls.layer_class = layer
        annotations = dict(inspect.get_annotations(cls))
        for f in dataclasses.fields(layer):
            if f.name in MODEL_FIELDS:
                continue
            if f.name in defaults:
                default = defaults[f.name]
            elif f.default is not dataclasses.MISSING:
                default = f.default
            else:
                raise TypeError(f"{cls.__name__}: {layer.__name__}.{f.name} needs a default.")
            annotations[f.name] = "float | None" if f.name == "out_init_std" else f.type
            setattr(cls, f.name, default)
        cls.__annotations__ = annotations
        return dataclasses.dataclass(frozen=True)(cls)

    return build


@_from_layer(DenseFFN, hidden_dim=paper.DENSE_HIDDEN, out_init_std=None)
class DenseConfig(_FFNConfig):
    """:class:`dsc_jax.DenseFFN`: ``hidden_dim`` ``H`` (the paper's 2611), ``init_std``;
    ``out_init_std`` None: the model's residual std."""

    kind: ClassVar[str] = "dense"


@_from_layer(
    MoELayer,
    num_experts=paper.MOE_NUM_EXPERTS,
    top_k=paper.MOE_TOP_K,
    hidden_dim=paper.MOE_HIDDEN,
    out_init_std=None,
)
class MoEConfig(_FFNConfig):
    """:class:`dsc_jax.MoELayer`: ``num_experts`` E, ``top_k``, ``hidden_dim`` (each expert),
    ``dispatch``, ``capacity_factor``, ``tile_size`` (``"sorted"``), ``jitter_std``,
    ``init_std``; ``out_init_std`` None: the model's residual std."""

    kind: ClassVar[str] = "moe"


@_from_layer(
    MoLoRALayer,
    num_experts=paper.MOLORA_NUM_EXPERTS,
    rank=paper.MOLORA_RANK,
    top_k=paper.MOLORA_TOP_K,
    hidden_dim=paper.MOLORA_HIDDEN,
    out_init_std=None,
)
class MoLoRAConfig(_FFNConfig):
    """:class:`dsc_jax.MoLoRALayer`: ``num_experts`` E, ``rank`` r, ``top_k``, ``hidden_dim``
    (static FFN), ``init_std``; ``out_init_std`` None: the model's residual std."""

    kind: ClassVar[str] = "molora"


@_from_layer(
    DSCLayer,
    num_bases=paper.DSC_NUM_BASES,
    top_k=paper.DSC_TOP_K,
    hidden_dim=paper.DSC_HIDDEN,
)
class DSCConfig(_FFNConfig):
    """:class:`dsc_jax.DSCLayer`: ``num_bases`` M, ``top_k`` K, ``hidden_dim`` H (static FFN)
    and the router/bank options, with the layer's defaults.

    ``out_init_std`` keeps the layer's 0.02, the paper's init of the static FFN's ``W2``
    (Appendix A.2); set it to ``None`` to take the model's residual std ``0.02/√(2L)`` like
    the other kinds.
    """

    kind: ClassVar[str] = "dsc"


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
