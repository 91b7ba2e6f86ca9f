"""Iso-active parameter solver (the paper's Appendix A.2).

Per-layer budgets ``C_tot = (P_total - fixed) / L``, ``C_act = (P_active - fixed) / L`` are
matched with the budget accounting of :mod:`dsc_jax.models.param_count`, and every solution
reports its exact counts from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from dsc_jax import paper
from dsc_jax._checks import check_choice, check_positive_int
from dsc_jax.layers.configs import FFNConfig, ffn_config
from dsc_jax.models.gpt import GPTConfig
from dsc_jax.models.param_count import (
    budget_ffn_params,
    count_params,
    fixed_param_count,
)

SOLVER_KINDS = ("dense", "moe", "dsc", "molora")
DEFAULT_TOP_K = {
    "dense": None,
    "moe": paper.MOE_TOP_K,
    "dsc": paper.DSC_TOP_K,
    "molora": paper.MOLORA_TOP_K,
}
MIN_HIDDEN = paper.SOLVER_MIN_HIDDEN  # smallest FFN hidden width the solver accepts
MAX_MOE_EXPERTS = paper.SOLVER_MAX_MOE_EXPERTS  # MoE experts searched: E = k+1 ... 255
DEFAULT_MOLORA_EXPERTS = paper.MOLORA_NUM_EXPERTS
#: The FFN fields :func:`solve_iso_active` sizes, per kind (``top_k`` and MoLoRA's
#: ``num_experts`` are inputs with defaults; the others are solved unless given).
SIZED_FIELDS: dict[str, tuple[str, ...]] = {
    "dense": ("hidden_dim",),
    "moe": ("num_experts", "top_k", "hidden_dim"),
    "dsc": ("num_bases", "top_k", "hidden_dim"),
    "molora": ("num_experts", "top_k", "rank", "hidden_dim"),
}


@dataclasses.dataclass(frozen=True)
class IsoActiveSolution:
    """Result of :func:`solve_iso_active`.

    Attributes:
      ffn: the solved per-kind FFN config (:class:`dsc_jax.DSCConfig`, ...): ``hidden_dim``
        and, by kind, ``top_k``, ``num_experts``, ``num_bases``, ``rank``.
      config: ready :class:`GPTConfig` whose ``ffn`` is :attr:`ffn`.
      total_params: exact count of the initialised parameter tree.
      active_params: exact per-token count, see :func:`count_params`.
      budget_total_params, budget_active_params: the budget accounting (module docstring)
        that the solver matches to the targets; the paper reports these for ``active``.
      fixed_params: the non-FFN parameters (exact; equal to the budget's ``fixed`` term).
      unfitted: the targets (``"total"``, ``"active"``) that no size was fitted to because
        the sizes given to :func:`solve_iso_active` fix them (empty when both were fitted).
    """

    ffn: FFNConfig
    config: GPTConfig
    total_params: int
    active_params: int
    budget_total_params: int
    budget_active_params: int
    fixed_params: int
    unfitted: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``"dense"``, ``"moe"``, ``"dsc"`` or ``"molora"``."""
        return self.ffn.kind

    def summary(self) -> str:
        """One line, e.g. ``dsc: M=1523 K=4 H=327 | total 35.01 M, active 28.01 M ...``."""
        dims = {"E": "num_experts", "M": "num_bases", "r": "rank", "k": "top_k"}
        text = " ".join(
            f"{key}={getattr(self.ffn, name)}"
            for key, name in dims.items()
            if hasattr(self.ffn, name)
        )
        return (
            f"{self.kind}: {text + ' ' if text else ''}H={self.ffn.hidden_dim} | total "
            f"{self.total_params / 1e6:.2f} M, active {self.active_params / 1e6:.2f} M "
            f"(budget accounting: {self.budget_total_params / 1e6:.2f} M / "
            f"{self.budget_active_params / 1e6:.2f} M)"
        )


def _floor(value: Fraction) -> int:
    return math.floor(value)


def _as_fraction(name: str, value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"solve_iso_active: {name}={value!r} is invalid; expected a number > 0.")
    return Fraction(value)


def solve_iso_active(
    kind: str,
    *,
    total_params: float,
    active_params: float | None = None,
    d_model: int = paper.D_MODEL,
    num_layers: int = paper.NUM_LAYERS,
    num_heads: int = paper.NUM_HEADS,
    vocab_size: int = paper.VOCAB_SIZE,
    seq_len: int = paper.SEQ_LEN,
    top_k: int | None = None,
    num_experts: int | None = None,
    num_bases: int | None = None,
    rank: int | None = None,
    hidden_dim: int | None = None,
    tie_embeddings: bool = True,
    min_hidden: int = MIN_HIDDEN,
    max_experts: int = MAX_MOE_EXPERTS,
    config_overrides: Mapping[str, Any] | None = None,
    ffn_overrides: Mapping[str, Any] | None = None,
) -> IsoActiveSolution:
    """Size the FFN of ``kind`` so the model hits ``total_params`` / ``active_params``
    (Appendix A.2).

    * dense: ``H = ⌊C_tot / 2d⌋`` (``active_params`` is ignored: dense is all-active).
    * moe (``top_k`` default 2): for ``E = k+1 … max_experts``: ``avail = C_act − dE``, skip
      when ``avail < 2d·min_hidden·k``, ``H = ⌊avail / 2dk⌋``; pick the ``E`` minimising
      ``|E·2dH + dE − C_tot|`` (first on ties).
    * dsc (``top_k`` = K, default 4): ``M = ⌊(C_tot − C_act + 2dK) / 2d⌋``,
      ``H = ⌊(C_act − dM − 2dK) / 2d⌋``; if ``H < min_hidden``: ``H = min_hidden``,
      ``M = ⌊(C_act − 2dH − 2dK) / d⌋``.
    * molora (not in the paper; ``top_k`` default 2, ``num_experts`` default 16, both fixed):
      the rank spends the inactive budget, ``r = ⌊(C_tot − C_act) / (2d(E − k))⌋``, the static
      FFN the active one, ``H = ⌊(C_act − dE − 2dkr) / 2d⌋``; if ``H < min_hidden``:
      ``H = min_hidden``, ``r = ⌊(C_act − dE − 2dH) / 2dk⌋``.

    Given sizes (``hidden_dim``, ``num_bases``, ``rank``, MoE ``num_experts``) are kept and
    the others sized around them with the same formulas; a target that no size is left to
    fit is reported in :attr:`IsoActiveSolution.unfitted`:

    * dsc: ``num_bases`` given: ``H`` from the active budget; ``hidden_dim`` given: ``M``
      from the active budget (as in the fallback above); both: nothing fitted.
    * moe: ``num_experts`` given: ``H`` from the active budget; ``hidden_dim`` given: the
      ``E`` in ``k+1 … max_experts`` closest to the total budget; both: nothing fitted.
    * molora: ``rank`` given: ``H`` from the active budget; ``hidden_dim`` given: ``r`` from
      the active budget; both: nothing fitted.
    * dense: ``hidden_dim`` given: nothing fitted.

    A size solved next to a given one must still be valid (``H >= min_hidden``, ``M >=
    top_k``, ``r >= 1``), else ``ValueError`` names the given field and the size it leaves.

    Args:
      kind: one of :data:`SOLVER_KINDS`.
      total_params, active_params: targets (``active`` required and ``< total`` for the
        sparse kinds).
      d_model, num_layers, num_heads, vocab_size, seq_len: the transformer (``seq_len`` is
        ``max_seq_len``, the learned position table).
      top_k, num_experts: see above (MoE: ``num_experts`` given fixes ``E``).
      num_bases, rank, hidden_dim: sizes to keep instead of solving them (see above).
      tie_embeddings: untied adds ``V·d`` to the fixed parameters.
      min_hidden, max_experts: 32 and 255 (:data:`MIN_HIDDEN`, :data:`MAX_MOE_EXPERTS`).
      config_overrides: further :class:`GPTConfig` fields (e.g. ``dropout_rate``, ``dtype``);
        they must not name ``ffn`` or the transformer's shape.
      ffn_overrides: further fields of the FFN config that are not sized (e.g. DSC
        ``variant``, MoE ``dispatch``); a sized field there raises (pass it by name).

    Returns:
      :class:`IsoActiveSolution` with counts from the real parameter tree.

    Raises:
      ValueError: bad arguments, or targets that leave no room (naming the values).
    """
    owner = "solve_iso_active"
    check_choice(owner, "kind", kind, SOLVER_KINDS)
    for name, value in (
        ("d_model", d_model),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("vocab_size", vocab_size),
        ("seq_len", seq_len),
        ("min_hidden", min_hidden),
    ):
        check_positive_int(owner, name, value)
    d, L = d_model, num_layers
    fixed = fixed_param_count(d, L, vocab_size, seq_len, tie_embeddings)
    p_total = _as_fraction("total_params", total_params)
    c_tot = (p_total - fixed) / L
    if c_tot <= 0:
        raise ValueError(
            f"{owner}: total_params={total_params!r} leaves no room for FFNs: the fixed "
            f"(non-FFN) parameters are {fixed}."
        )
    given = {
        name: value
        for name, value in (
            ("top_k", top_k),
            ("num_experts", num_experts),
            ("num_bases", num_bases),
            ("rank", rank),
            ("hidden_dim", hidden_dim),
        )
        if value is not None
    }
    for name, value in given.items():
        if name not in SIZED_FIELDS[kind]:
            kinds = tuple(k for k in SOLVER_KINDS if name in SIZED_FIELDS[k])
            raise ValueError(
                f"{owner}: {name}={value!r} does not apply to kind={kind!r}; it sizes the "
                f"kinds {kinds}."
            )
        check_positive_int(owner, name, value)
    k = top_k if top_k is not None else DEFAULT_TOP_K[kind]
    unfitted: tuple[str, ...] = ()
    if kind == "dense":
        if hidden_dim is not None:
            hidden, unfitted = hidden_dim, ("total",)
        else:
            hidden = _floor(c_tot / (2 * d))
        if hidden < 1:
            raise ValueError(f"{owner}: total_params={total_params!r} gives dense hidden {hidden}.")
        dims: dict[str, int] = {"hidden_dim": hidden}
    else:
        check_positive_int(owner, "top_k", k)
        if active_params is None:
            raise ValueError(f"{owner}: active_params is required for kind={kind!r}.")
        p_act = _as_fraction("active_params", active_params)
        if p_act >= p_total:
            raise ValueError(
                f"{owner}: active_params={active_params!r} must be < total_params="
                f"{total_params!r} for kind={kind!r}."
            )
        c_act = (p_act - fixed) / L
        if c_act <= 0:
            raise ValueError(
                f"{owner}: active_params={active_params!r} leaves no room for FFNs: the fixed "
                f"(non-FFN) parameters are {fixed}."
            )
        solve = {"moe": _solve_moe, "dsc": _solve_dsc, "molora": _solve_molora}[kind]
        dims, unfitted = solve(d, k, c_tot, c_act, min_hidden, max_experts, given)
    extra = dict(ffn_overrides or {})
    sized = sorted(set(extra) & set(SIZED_FIELDS[kind]))
    if sized:
        raise ValueError(
            f"{owner}: ffn_overrides may not set the sized field(s) {sized}; pass them by name "
            f"({', '.join(f'{n}=...' for n in sized)}) to keep them and size the rest."
        )
    overrides = dict(config_overrides or {})
    clash = sorted(set(overrides) & {"ffn", "d_model", "num_layers", "num_heads"})
    if clash:
        raise ValueError(f"{owner}: config_overrides may not set solved/explicit fields {clash}.")
    ffn = ffn_config(kind, {**dims, **extra})
    cfg = GPTConfig(
        vocab_size=vocab_size,
        max_seq_len=seq_len,
        num_layers=L,
        num_heads=num_heads,
        d_model=d,
        ffn=ffn,
        tie_embeddings=tie_embeddings,
        **overrides,
    )
    total, active = count_params(cfg)
    budget_total, budget_active = budget_ffn_params(cfg)
    return IsoActiveSolution(
        ffn=ffn,
        config=cfg,
        total_params=total,
        active_params=active,
        budget_total_params=fixed + L * budget_total,
        budget_active_params=fixed + L * budget_active,
        fixed_params=fixed,
        unfitted=unfitted,
    )


Sizes = dict[str, int]


def _too_small(given: str, value: int, field: str, size: int, minimum: int, c_act: Fraction) -> str:
    return (
        f"solve_iso_active: {given}={value} leaves {field}={size} < {minimum} in the per-layer "
        f"active budget {float(c_act):.1f}; give {field} too, or a smaller {given}."
    )


def _solve_moe(
    d: int,
    k: int,
    c_tot: Fraction,
    c_act: Fraction,
    min_hidden: int,
    max_experts: int,
    given: Mapping[str, int],
) -> tuple[Sizes, tuple[str, ...]]:
    experts, hidden = given.get("num_experts"), given.get("hidden_dim")
    if experts is not None:
        check_positive_int("solve_iso_active", "num_experts", experts, minimum=k + 1)
        if hidden is not None:
            return {"num_experts": experts, "top_k": k, "hidden_dim": hidden}, ("total", "active")
        hidden = _floor((c_act - d * experts) / (2 * d * k))
        if hidden < min_hidden:
            raise ValueError(
                _too_small("num_experts", experts, "hidden_dim", hidden, min_hidden, c_act)
            )
        return {"num_experts": experts, "top_k": k, "hidden_dim": hidden}, ("total",)
    if hidden is not None:  # E spends the total budget; the active one is then fixed by H
        experts = min(
            range(k + 1, max_experts + 1),
            key=lambda e: abs(e * 2 * d * hidden + d * e - c_tot),
        )
        return {"num_experts": experts, "top_k": k, "hidden_dim": hidden}, ("active",)
    best: tuple[Fraction, int, int] | None = None
    for experts in range(k + 1, max_experts + 1):
        avail = c_act - d * experts
        if avail < 2 * d * min_hidden * k:
            continue
        hidden = _floor(avail / (2 * d * k))
        cost = abs(experts * 2 * d * hidden + d * experts - c_tot)
        if best is None or cost < best[0]:
            best = (cost, experts, hidden)
    if best is None:
        raise ValueError(
            f"solve_iso_active: no MoE with top_k={k} and E in [{k + 1}, {max_experts}] fits the "
            f"per-layer active budget {float(c_act):.1f} (needs >= d·E + 2d·{min_hidden}·k)."
        )
    _, experts, hidden = best
    return {"num_experts": experts, "top_k": k, "hidden_dim": hidden}, ()


def _solve_dsc(
    d: int,
    k: int,
    c_tot: Fraction,
    c_act: Fraction,
    min_hidden: int,
    _: int,
    given: Mapping[str, int],
) -> tuple[Sizes, tuple[str, ...]]:
    bases, hidden = given.get("num_bases"), given.get("hidden_dim")
    unfitted: tuple[str, ...] = ("total",)
    if bases is None and hidden is None:
        unfitted = ()
        bases = _floor((c_tot - c_act + 2 * d * k) / (2 * d))
        hidden = _floor((c_act - d * bases - 2 * d * k) / (2 * d))
        if hidden < min_hidden:
            hidden = min_hidden
            bases = _floor((c_act - 2 * d * hidden - 2 * d * k) / d)
    elif hidden is None:  # M given: the static FFN spends the rest of the active budget
        hidden = _floor((c_act - d * bases - 2 * d * k) / (2 * d))
        if hidden < min_hidden:
            raise ValueError(
                _too_small("num_bases", bases, "hidden_dim", hidden, min_hidden, c_act)
            )
    elif bases is None:  # H given: the bank's router spends the rest of the active budget
        bases = _floor((c_act - 2 * d * hidden - 2 * d * k) / d)
    else:
        unfitted = ("total", "active")
    if bases < k:
        if "num_bases" in given:
            raise ValueError(f"solve_iso_active: num_bases={bases} is < top_k={k}.")
        source = f"hidden_dim={hidden} leaves" if "hidden_dim" in given else "DSC targets leave"
        raise ValueError(
            f"solve_iso_active: {source} M={bases} atoms < top_k={k} (per-layer "
            f"budgets total {float(c_tot):.1f}, active {float(c_act):.1f}, static H={hidden})."
        )
    return {"num_bases": bases, "top_k": k, "hidden_dim": hidden}, unfitted


def _solve_molora(
    d: int,
    k: int,
    c_tot: Fraction,
    c_act: Fraction,
    min_hidden: int,
    _: int,
    given: Mapping[str, int],
) -> tuple[Sizes, tuple[str, ...]]:
    experts = given.get("num_experts", DEFAULT_MOLORA_EXPERTS)
    check_positive_int("solve_iso_active", "num_experts", experts, minimum=k + 1)
    rank, hidden = given.get("rank"), given.get("hidden_dim")
    unfitted: tuple[str, ...] = ("total",)
    if rank is None and hidden is None:
        unfitted = ()
        rank = _floor((c_tot - c_act) / (2 * d * (experts - k)))
        hidden = _floor((c_act - d * experts - 2 * d * k * rank) / (2 * d))
        if hidden < min_hidden:
            hidden = min_hidden
            rank = _floor((c_act - d * experts - 2 * d * hidden) / (2 * d * k))
    elif hidden is None:  # r given: the static FFN spends the rest of the active budget
        hidden = _floor((c_act - d * experts - 2 * d * k * rank) / (2 * d))
        if hidden < min_hidden:
            raise ValueError(_too_small("rank", rank, "hidden_dim", hidden, min_hidden, c_act))
    elif rank is None:  # H given: the experts' rank spends the rest of the active budget
        rank = _floor((c_act - d * experts - 2 * d * hidden) / (2 * d * k))
    else:
        unfitted = ("total", "active")
    if rank < 1:
        source = f"hidden_dim={hidden} leaves" if "hidden_dim" in given else "MoLoRA targets leave"
        raise ValueError(
            f"solve_iso_active: {source} rank {rank} < 1 (E={experts}, top_k={k}, "
            f"per-layer budgets total {float(c_tot):.1f}, active {float(c_act):.1f})."
        )
    return {"num_experts": experts, "top_k": k, "rank": rank, "hidden_dim": hidden}, unfitted
