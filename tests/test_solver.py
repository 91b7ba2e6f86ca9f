"""Iso-active solver (the paper's Appendix A.2): the paper's numbers, exact counts, MoLoRA
budgets, bad targets.

All counts come from ``jax.eval_shape`` of the real model (no parameters are materialised).
"""

from __future__ import annotations

import math

import pytest

from dsc_jax.layers.configs import DenseConfig, DSCConfig, MoEConfig, MoLoRAConfig
from dsc_jax.models.gpt import GPTConfig
from dsc_jax.models.param_count import (
    budget_ffn_params,
    closed_form_params,
    count_params,
    fixed_param_count,
)
from dsc_jax.models.solver import SIZED_FIELDS, solve_iso_active

PAPER = dict(d_model=384, num_layers=6, num_heads=6, vocab_size=50304, seq_len=256)
TOTAL, ACTIVE = 35e6, 28e6


def millions(count: int) -> float:
    return round(count / 1e6, 2)


@pytest.fixture(scope="module")
def paper_solutions():
    return {
        kind: solve_iso_active(kind, total_params=TOTAL, active_params=ACTIVE, **PAPER)
        for kind in ("dense", "moe", "dsc", "molora")
    }


def test_fixed_parameters_of_the_paper_model():
    assert fixed_param_count(384, 6, 50304, 256) == 22_963_968
    assert fixed_param_count(384, 6, 50304, 256, tie_embeddings=False) == 22_963_968 + 50304 * 384


def test_paper_dense(paper_solutions):
    sol = paper_solutions["dense"]
    assert sol.ffn == DenseConfig(hidden_dim=2611) and sol.config.ffn == sol.ffn
    assert sol.total_params == sol.active_params == 34_995_456
    assert millions(sol.total_params) == 35.00


def test_paper_moe(paper_solutions):
    sol = paper_solutions["moe"]
    assert sol.ffn == MoEConfig(num_experts=5, top_k=2, hidden_dim=545)
    assert sol.kind == sol.config.ffn_kind == "moe" and sol.config.ffn == sol.ffn
    assert sol.total_params == 35_536_896 and millions(sol.total_params) == 35.54
    assert sol.active_params == 28_002_816 and millions(sol.active_params) == 28.00
    assert millions(sol.budget_active_params) == 28.00


def test_paper_dsc(paper_solutions):
    sol = paper_solutions["dsc"]
    assert sol.ffn == DSCConfig(num_bases=1523, top_k=4, hidden_dim=327)
    assert sol.config.ffn == sol.ffn
    assert sol.total_params == 35_013_810 and millions(sol.total_params) == 35.01
    # The paper's 28.00 M is Appendix A.2's budget accounting (router weight, no router bias /
    # LayerNorm / γ). Counting those per-token vectors too gives 28.01 M.
    assert sol.budget_active_params == 27_998_208 and millions(sol.budget_active_params) == 28.00
    assert sol.active_params == 28_014_258
    assert sol.active_params - sol.budget_active_params == 6 * (1523 + 3 * 384)
    assert "M=1523" in sol.summary() and "35.01 M" in sol.summary()


def test_paper_defaults_match_solutions(paper_solutions):
    """GPTConfig() and each kind's config defaults are the solver's paper solutions."""
    default = GPTConfig()
    for sol in paper_solutions.values():
        assert type(sol.ffn)() == sol.ffn, sol.kind
        assert default.replace(ffn=sol.ffn) == sol.config, sol.kind


def test_paper_molora_within_budget(paper_solutions):
    sol = paper_solutions["molora"]
    d, layers = 384, 6
    assert sol.ffn == MoLoRAConfig(num_experts=16, top_k=2, rank=108, hidden_dim=868)
    # Floors only ever undershoot, each by less than one unit of the solved dimension.
    assert 0 <= TOTAL - sol.budget_total_params < layers * 2 * d * (16 - 2 + 1)
    assert 0 <= ACTIVE - sol.budget_active_params < layers * 2 * d * (1 + 2)
    assert sol.total_params <= TOTAL and abs(sol.active_params - ACTIVE) < 0.001 * ACTIVE


@pytest.mark.parametrize(
    "overrides",
    [
        {"ffn": DenseConfig(hidden_dim=40)},
        {"ffn": MoEConfig(num_experts=3, top_k=1, hidden_dim=20)},
        {"ffn": MoLoRAConfig(num_experts=5, rank=3, hidden_dim=24)},
        {"ffn": DSCConfig(num_bases=10, top_k=3, hidden_dim=24)},
        {
            "ffn": DSCConfig(num_bases=10, top_k=3, hidden_dim=24, variant="basic"),
            "tie_embeddings": False,
        },
        {"ffn": DSCConfig(num_bases=16, top_k=3, hidden_dim=24, router="product_key")},
        {
            "ffn": DSCConfig(
                num_bases=24, top_k=3, hidden_dim=24, router="product_key", product_key_rows=3
            )
        },
    ],
)
def test_tree_counts_equal_closed_form(overrides):
    cfg = GPTConfig(
        vocab_size=96,
        max_seq_len=12,
        num_layers=3,
        num_heads=2,
        d_model=16,
        **overrides,
    )
    total, active = count_params(cfg)
    assert (total, active) == closed_form_params(cfg)
    fixed = fixed_param_count(16, 3, 96, 12, cfg.tie_embeddings)
    budget_total, budget_active = budget_ffn_params(cfg)
    assert total >= fixed + 3 * budget_total and active >= fixed + 3 * budget_active
    assert active < total if cfg.ffn_kind != "dense" else active == total


def test_dsc_small_static_fallback():
    """Active budget too small for H >= 32: H = 32 and M from the active budget."""
    sol = solve_iso_active("dsc", total_params=TOTAL, active_params=24e6, **PAPER)
    c_act = (24e6 - 22_963_968) / 6
    assert sol.ffn.hidden_dim == 32
    assert sol.ffn.num_bases == math.floor((c_act - 2 * 384 * 32 - 2 * 384 * 4) / 384) == 377
    assert sol.active_params <= 24e6 + 6 * (377 + 3 * 384)


def test_moe_every_candidate_respects_minimum_hidden():
    sol = solve_iso_active("moe", total_params=40e6, active_params=23.2e6, top_k=1, **PAPER)
    assert sol.ffn.hidden_dim >= 32 and sol.ffn.num_experts >= 2


def test_untied_and_overrides():
    sol = solve_iso_active(
        "dsc",
        total_params=55e6,
        active_params=48e6,
        tie_embeddings=False,
        config_overrides={"dropout_rate": 0.0, "dtype": "bfloat16"},
        **PAPER,
    )
    assert sol.config.tie_embeddings is False and sol.config.dtype == "bfloat16"
    assert sol.fixed_params == 22_963_968 + 50304 * 384
    assert abs(sol.budget_active_params - 48e6) < 6 * 2 * 384


@pytest.mark.parametrize(
    ("kind", "kwargs", "match"),
    [
        ("dsc", {"total_params": 20e6, "active_params": 10e6}, "total_params=20000000.0"),
        ("dense", {"total_params": 22e6}, "fixed"),
        ("dsc", {"total_params": 35e6, "active_params": 22e6}, "active_params=22000000.0"),
        ("dsc", {"total_params": 28e6, "active_params": 35e6}, "must be < total_params"),
        ("moe", {"total_params": 35e6, "active_params": 35e6}, "must be < total_params"),
        ("dsc", {"total_params": 35e6, "active_params": 23_132_160}, "M=1 atoms < top_k=4"),
        ("moe", {"total_params": 35e6, "active_params": 23.1e6}, "no MoE with top_k=2"),
        ("molora", {"total_params": 28.0001e6, "active_params": 28e6}, "rank 0 < 1"),
        ("molora", {"total_params": 35e6, "active_params": 28e6, "top_k": 16}, "num_experts"),
        ("moe", {"total_params": 35e6}, "active_params is required"),
        ("moe", {"total_params": 35e6, "active_params": 28e6, "num_experts": 2}, "num_experts"),
        ("dense", {"total_params": 35e6, "top_k": 2}, "top_k=2 does not apply to kind='dense'"),
        ("dsc", {"total_params": 35e6, "active_params": 28e6, "rank": 8}, "rank=8 does not"),
        ("moe", {"total_params": 35e6, "active_params": 28e6, "num_bases": 8}, "num_bases"),
        ("dsc", {"total_params": 35e6, "active_params": 28e6, "num_bases": 3}, "num_bases=3"),
        (
            "dsc",
            {"total_params": 35e6, "active_params": 28e6, "num_bases": 2150},
            r"num_bases=2150 leaves hidden_dim=-?\d+ < 32",
        ),
        (
            "moe",
            {"total_params": 35e6, "active_params": 28e6, "num_experts": 2100},
            "num_experts=2100 leaves hidden_dim=21 < 32",
        ),
        (
            "molora",
            {"total_params": 35e6, "active_params": 28e6, "hidden_dim": 1100},
            "hidden_dim=1100 leaves rank",
        ),
        (
            "dsc",
            {"total_params": 35e6, "active_params": 28e6, "ffn_overrides": {"hidden_dim": 64}},
            "ffn_overrides may not set the sized field",
        ),
        (
            "dsc",
            {"total_params": 35e6, "active_params": 28e6, "ffn_overrides": {"colour": 1}},
            "unknown field",
        ),
        ("mlp", {"total_params": 35e6}, "kind"),
        ("dsc", {"total_params": -1, "active_params": 1}, "total_params=-1"),
        ("dsc", {"total_params": 35e6, "active_params": 28e6, "top_k": 0}, "top_k"),
        (
            "dsc",
            {"total_params": 35e6, "active_params": 28e6, "config_overrides": {"ffn": "moe"}},
            "config_overrides",
        ),
    ],
)
def test_bad_targets_raise(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_iso_active(kind, **kwargs, **PAPER)


# Sizes a caller may give (the inputs top_k and MoLoRA's num_experts are covered above).
GIVEN = [
    (kind, field)
    for kind, fields in SIZED_FIELDS.items()
    for field in fields
    if field != "top_k" and (kind, field) != ("molora", "num_experts")
]


@pytest.mark.parametrize(("kind", "field"), GIVEN)
def test_given_size_equal_to_the_solved_one_changes_nothing(paper_solutions, kind, field):
    """Giving a size its solved value re-solves the others to the same paper solution."""
    default = paper_solutions[kind]
    sol = solve_iso_active(
        kind,
        total_params=TOTAL,
        active_params=ACTIVE,
        **{field: getattr(default.ffn, field)},
        **PAPER,
    )
    assert sol.ffn == default.ffn and default.unfitted == ()
    assert sol.unfitted and set(sol.unfitted) <= {"total", "active"}


@pytest.mark.parametrize(("kind", "field"), GIVEN)
def test_given_size_is_kept_and_the_others_fit_a_target(paper_solutions, kind, field):
    """A given size is kept; the other sizes fit the target the solver can still reach
    (one unit of a solved size per layer, d·2·layers parameters at most)."""
    default = paper_solutions[kind]
    value = getattr(default.ffn, field) * 3 // 4
    sol = solve_iso_active(
        kind, total_params=TOTAL, active_params=ACTIVE, **{field: value}, **PAPER
    )
    assert getattr(sol.ffn, field) == value
    assert sol.ffn != default.ffn
    targets = {
        "total": (TOTAL, sol.budget_total_params),
        "active": (ACTIVE, sol.budget_active_params),
    }
    fitted = [t for t in targets if t not in sol.unfitted]
    if kind == "dense":
        assert sol.unfitted == ("total",)  # dense has no active target of its own
        return
    assert fitted, sol.unfitted
    for target in fitted:
        goal, got = targets[target]
        # one unit of the solved size: 2d (H), d (M) or 2dk (r) per layer; MoE's E: 2dH + d
        unit = 6 * (2 * 384 * max(sol.ffn.hidden_dim, 2 * getattr(sol.ffn, "top_k", 1)) + 384)
        assert abs(goal - got) <= unit, (target, goal, got)
    assert (sol.total_params, sol.active_params) == count_params(sol.config)


def test_given_sizes_of_every_free_dimension_fit_nothing():
    sol = solve_iso_active(
        "dsc", total_params=TOTAL, active_params=ACTIVE, num_bases=100, hidden_dim=64, **PAPER
    )
    assert (sol.ffn.num_bases, sol.ffn.top_k, sol.ffn.hidden_dim) == (100, 4, 64)
    assert sol.unfitted == ("total", "active")
    sol = solve_iso_active(
        "moe", total_params=TOTAL, active_params=ACTIVE, num_experts=8, top_k=1, **PAPER
    )
    assert (sol.ffn.num_experts, sol.ffn.top_k) == (8, 1) and sol.unfitted == ("total",)
    assert abs(sol.budget_active_params - ACTIVE) <= 6 * 2 * 384


def test_top_k_given_resolves_the_bank():
    """K is an input: M and H are solved for it (both targets fitted)."""
    sol = solve_iso_active("dsc", total_params=TOTAL, active_params=ACTIVE, top_k=8, **PAPER)
    assert sol.ffn.top_k == 8 and sol.unfitted == ()
    assert sol.ffn.num_bases != 1523 and sol.ffn.hidden_dim != 327
    assert abs(sol.budget_total_params - TOTAL) <= 6 * 3 * 384
    assert abs(sol.budget_active_params - ACTIVE) <= 6 * 2 * 384


def test_product_key_budget_counts_the_sub_key_tables():
    """``router="product_key"``: the router weight in the budget is ``d₁n₁ + d₂n₂`` (here
    8·3 + 9·8 at d=17, M=24, n₁=3), not a flat ``d·M``; the run sizes report it."""
    ffn = DSCConfig(num_bases=24, top_k=3, hidden_dim=24, router="product_key", product_key_rows=3)
    cfg = GPTConfig(vocab_size=96, max_seq_len=12, num_layers=2, num_heads=1, d_model=17, ffn=ffn)
    router = 8 * 3 + 9 * 8
    assert budget_ffn_params(cfg) == (
        2 * 17 * 24 + router + 2 * 17 * 24,
        2 * 17 * 24 + router + 2 * 17 * 3,
    )
    assert count_params(cfg) == closed_form_params(cfg)


def test_runner_reports_each_variants_own_budget():
    """The router ablation's run sizes: each budget is that run's own FFN's (product-key
    router, M, matched H), i.e. the exact count less the per-layer vectors the budget leaves
    out (router biases, router LayerNorm, γ)."""
    from dsc_jax.experiments import presets, runner
    from dsc_jax.train import config as config_lib

    study = presets.STUDIES["tiny"]
    base = study.base()
    for variant in runner.ablation_variants("router"):
        config, sizes = runner.method_config(study, base, variant, 0)
        model = config_lib.model_config(config, vocab_size=256)
        ffn = model.ffn
        biases = ffn.num_bases
        if ffn.router == "product_key":
            rows = ffn.product_key_rows or math.isqrt(ffn.num_bases)
            biases = rows + ffn.num_bases // rows
        left_out = model.num_layers * (biases + 3 * model.d_model)
        assert sizes["total_params"] - sizes["budget_total_params"] == left_out, variant.name
        assert sizes["active_params"] - sizes["budget_active_params"] == left_out, variant.name
