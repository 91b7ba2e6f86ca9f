"""The rows of a comparison: one :class:`Variant` per method, or the variants of an ablation.

Each ablation axis is one entry of :data:`ABLATION_TABLE`: its variants (name, FFN kind,
overrides) and the name of its reference row (the default setting the others are compared
to). Every derived list (:data:`ABLATIONS`, :data:`REFERENCE_VARIANTS`, the ``--ablation``
choices) is computed from that table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from dsc_jax import paper
from dsc_jax.experiments.presets import METHODS


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a comparison: an FFN kind plus config overrides.

    ``overrides`` are dotted config keys (``"losses.aux": 0.0``) applied after the FFN is
    sized; ``ffn`` overrides the solved FFN fields (``{"top_k": 8}``); ``scale`` multiplies
    ``d_model`` and the parameter targets' FFN budget (d and M scaled together);
    ``match_active`` (FFN field overrides of a reference, ``{}`` for the study's solved
    ``kind`` variant) then re-sizes the FFN's ``hidden_dim`` (the static FFN, or the experts)
    so that the run has as many active parameters as that reference (e.g. a product-key
    router, whose weights are ``d·√M`` instead of ``d·M``, spends the difference on the
    static FFN)."""

    name: str
    kind: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ffn: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scale: float = 1.0
    match_active: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Ablation:
    """One ablation axis: its DSC ``variants`` and the ``reference`` row among them."""

    reference: str
    variants: tuple[Variant, ...]

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if self.reference not in names or len(set(names)) < len(names):
            raise ValueError(f"Ablation: reference {self.reference!r} must be one of {names}.")


def _dsc(name: str, overrides: Mapping[str, Any] | None = None, **kw: Any) -> Variant:
    return Variant(name, "dsc", dict(overrides or {}), **kw)


_R = paper.REFERENCE_BANK_INIT_SCALE  # the reference code's raw bank scale (and our radius)
_PK = {"router": "product_key", "num_bases": 65536}  # product keys: √M × √M sub-keys
_FLAT_PAPER = {"num_bases": paper.DSC_NUM_BASES}

#: Every ablation axis: the DSC variants it trains and its reference row.
ABLATION_TABLE: dict[str, Ablation] = {
    # K varies; M (and H) stay those solved for the default K = 4
    "top_k": Ablation("dsc_k4", tuple(_dsc(f"dsc_k{k}", ffn={"top_k": k}) for k in (2, 4, 8, 16))),
    "regularisers": Ablation(
        "dsc_all",
        (
            _dsc("dsc_all"),
            *(_dsc(f"dsc_no_{t}", {f"losses.{t}": 0.0}) for t in ("aux", "budget", "frame", "z")),
        ),
    ),
    "variant": Ablation(
        "dsc_refined", tuple(_dsc(f"dsc_{v}", ffn={"variant": v}) for v in ("refined", "basic"))
    ),
    "bank_projection": Ablation(
        "dsc_retract",
        tuple(_dsc(f"dsc_{p}", {"bank_projection": p}) for p in ("retract", "tangent", "none")),
    ),
    # how fast the atoms turn: raw-row radius, projection, the reference code's bank
    "bank": Ablation(
        f"dsc_r{_R:g}",
        (
            *(_dsc(f"dsc_r{r:g}", ffn={"bank_radius": r}) for r in (_R, 0.05, 0.1, 1.0)),
            _dsc(
                "dsc_reference_bank",
                {"bank_projection": "none"},
                ffn={"bank_radius": _R, "bank_init": "orthogonal"},
            ),
            _dsc(f"dsc_r{_R:g}_tangent", {"bank_projection": "tangent"}, ffn={"bank_radius": _R}),
        ),
    ),
    "scale": Ablation("dsc_x1", tuple(_dsc(f"dsc_x{s:g}", scale=s) for s in (0.5, 1.0, 2.0))),
    # the flat router vs product keys at bigger banks
    "router": Ablation(
        "dsc_flat",
        (
            _dsc("dsc_flat"),
            *(
                v
                for bases in (4096, 65536)
                for pk in [{**_PK, "num_bases": bases}]
                for v in (
                    _dsc(f"dsc_pk{bases}_same_ffn", ffn=pk),
                    _dsc(f"dsc_pk{bases}", ffn=pk, match_active={}),
                )
            ),
            # balancing the atoms' top-K picks instead of each sub-key table's
            _dsc(
                "dsc_pk65536_selection",
                ffn={**_PK, "product_key_aux": "selection"},
                match_active={},
            ),
            # flat at the paper's M (more active router weights than the study's solved M)
            # and product keys with as many active parameters
            _dsc(f"dsc_flat{paper.DSC_NUM_BASES}", ffn=_FLAT_PAPER),
            _dsc(f"dsc_pk65536_as_flat{paper.DSC_NUM_BASES}", ffn=_PK, match_active=_FLAT_PAPER),
            # the frame regulariser at M >> d: its cost is O(M d²) per call
            _dsc("dsc_pk65536_no_frame", ffn={**_PK, "frame_regularizer": False}, match_active={}),
        ),
    ),
}
#: ``--ablation`` choices: ``"none"`` (the method comparison) and every axis.
ABLATIONS: tuple[str, ...] = ("none", *ABLATION_TABLE)
#: The reference row of each comparison (``"dsc"`` for the method comparison).
REFERENCE_VARIANTS: tuple[str, ...] = ("dsc", *(a.reference for a in ABLATION_TABLE.values()))


def method_variants(methods: Sequence[str]) -> list[Variant]:
    """The main comparison: one variant per FFN kind."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected among {METHODS}.")
    if len(set(methods)) < len(methods):
        raise ValueError(f"methods {list(methods)} name a method twice; give each once.")
    return [Variant(m, m) for m in methods]


def ablation_variants(axis: str) -> list[Variant]:
    """The DSC variants of one ablation axis (:data:`ABLATION_TABLE`)."""
    if axis not in ABLATION_TABLE:
        raise ValueError(f"unknown ablation {axis!r}; expected one of {ABLATIONS}.")
    return list(ABLATION_TABLE[axis].variants)


def select_variants(variants: Sequence[Variant], names: Sequence[str]) -> list[Variant]:
    """The variants named in ``names`` (in ``variants``' order); an unknown name raises
    naming the known ones."""
    known = [v.name for v in variants]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected among {known}.")
    return [v for v in variants if v.name in names]
