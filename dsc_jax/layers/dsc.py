"""The Dynamic Subspace Composition layer (the paper's Algorithm 1 and 2, and its regularisers).

``y = GELU(x W1) W2 + ((x U_Iᵀ) ⊙ ẑ) V_I ⊙ γ`` where the router picks, per token, the
top-K of M unit-norm rank-1 atoms ``(u_j, v_j)`` and ``ẑ`` shrinks to zero when the router's
total signal ``S`` is small. ``ΔW(x) ∈ R^{d×d}`` is never materialised.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsc_jax import _checks, paper
from dsc_jax.layers import (
    bank_parallel,
    common,
    dsc_contract,
    dsc_product_key,
    dsc_router,
    remat_names,
)
from dsc_jax.layers.routing import collects_losses, sow_routing

VARIANTS = ("refined", "basic")
ROUTERS = ("flat", "product_key")
PRODUCT_KEY_AUX = ("marginal", "joint", "selection")
COMPUTE_MODES = ("auto", "gather", "dense")
BANK_INITS = ("sphere", "orthogonal")

#: Default radius of the raw bank rows. The forward pass normalises every row, so the raw
#: norm ``r`` changes nothing the layer computes, but it sets how fast an atom turns: Adam
#: moves each raw coordinate by about the learning rate whatever the gradient's scale, so
#: an atom turns by about ``lr·√d / r`` radians per step. The reference code's raw rows
#: start at 0.02 and its atoms turn ~50× faster than unit rows; the bank retraction
#: (:func:`dsc_jax.bank_retraction`) keeps the rows at this radius after every update.
#: Chosen by measurement (README, "How fast the bank learns").
DEFAULT_BANK_RADIUS = paper.REFERENCE_BANK_INIT_SCALE

# "auto" picks "dense" (two [N,d]x[d,M] matmuls over every atom) when the bank is at most this
# many times larger than K; otherwise "gather" (fetch the K selected rows of U and V per token,
# O(N K d) memory traffic). Dense costs 4·N·M·d FLOPs of well-shaped matmuls, gather costs
# 4·N·K·d FLOPs but 2·N·K·d gathered elements, which run far below matmul peak. The CPU
# crossover measured with benchmarks/layer_latency.py lies above M/K=32 (benchmarks/README.md);
# GPUs and TPUs favour matmuls more, which moves it up, so 32 is conservative there.
AUTO_DENSE_MAX_BASES_PER_ACTIVE = 32


def resolve_compute(compute: str, num_bases: int, top_k: int, bank_axis: str | None = None) -> str:
    """The compute path ``compute`` selects for ``num_bases`` atoms with ``top_k`` active
    (``"gather"`` whenever the bank is sharded over ``bank_axis``)."""
    if compute != "auto":
        return compute
    if bank_axis is not None:
        return "gather"
    return "dense" if num_bases <= AUTO_DENSE_MAX_BASES_PER_ACTIVE * top_k else "gather"


def bank_initializer(kind: str, radius: float, eps: float = paper.EPS) -> common.Initializer:
    """Initialiser of a raw bank ``[M, d]`` (logical axes ``("bases", "embed")``): ``kind``
    ``"sphere"`` (orthogonal directions, each row at norm ``radius``) or ``"orthogonal"``
    (``radius ×`` orthogonal; rows shorter than ``radius`` when ``M > d``)."""
    _checks.check_choice("bank_initializer", "kind", kind, BANK_INITS)
    if kind == "orthogonal":
        return common.orthogonal(radius, ("bases", "embed"))
    directions = nn.initializers.orthogonal(1.0)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        rows = dsc_contract.normalize_rows(directions(key, shape, jnp.float32), eps)
        return radius * rows

    return common.logical(common.float32_init(init), ("bases", "embed"))


class DSCLayer(nn.Module):
    """Dynamic Subspace Composition FFN.

    Shapes: ``x [..., d] -> [..., d]`` in ``dtype`` (any leading axes, e.g. ``[B, T, d]``);
    ``d`` is fixed by the first call. Example::

        layer = DSCLayer(num_bases=128, top_k=4, hidden_dim=128)
        variables = layer.init(jax.random.key(0), x)          # x: [B, T, d]
        y = layer.apply(variables, x)                          # [B, T, d]

    Attributes:
      num_bases: ``M``, atoms in the shared bank.
      top_k: ``K``, active atoms per token (static, ``1 ≤ K ≤ M``).
      hidden_dim: ``H``, hidden width of the static FFN.
      variant: ``"refined"`` (Algorithm 2: router LayerNorm, vector γ) or ``"basic"``
        (Algorithm 1: no LayerNorm, scalar γ).
      tau: logit clip ``τ``.
      eps: ``ε`` of the coefficient normalisation and the bank-row normalisation.
      gamma_init: initial value of γ.
      budget_target: ``μ`` of the budget regulariser.
      bank_radius: ``r``, the norm of the raw bank rows ``û_j``, ``v̂_j`` (the forward pass
        normalises them, so ``r`` only sets the atoms' angular learning rate; see
        :data:`DEFAULT_BANK_RADIUS`). Chain the optimiser with
        ``dsc_jax.bank_retraction(bank_radius=r)`` to keep the rows there.
      bank_init: ``"sphere"`` (orthogonal directions, every row scaled to norm ``r``) or
        ``"orthogonal"`` (``r ×`` an orthogonal ``[M, d]`` matrix, the reference code's init:
        for ``M > d`` its rows have norms below ``r``). The reference code's bank is
        ``bank_radius=0.02, bank_init="orthogonal"`` with ``bank_projection="none"``.
      compute: ``"gather"``, ``"dense"`` or ``"auto"`` (see :func:`resolve_compute`).
      bank_axis: None (the bank is replicated, or sharded by the compiler as any weight), or
        the mesh axis the bank's atoms are split over (bank parallelism,
        :mod:`dsc_jax.layers.bank_parallel`): the gather contraction then runs with
        :func:`~dsc_jax.layers.bank_parallel.contract_sharded_banks`, so that no device
        holds more than its ``M / D`` rows of ``basis_u``/``basis_v``. Apply the layer inside
        ``jax.jit`` under ``jax.set_mesh(mesh)``, with logical-axis rules that map ``bases``
        to this axis (``dsc_jax.LOGICAL_AXIS_RULES`` maps it to ``tensor``); an ``embed``
        mapping of the bank (FSDP) is all-gathered inside the layer. ``M`` must be a
        multiple of the axis size; ``compute="dense"`` is not allowed (``"auto"`` picks
        ``"gather"``). ``init`` runs the unsharded contraction (the same values) and needs
        no mesh.
      router: ``"flat"`` (one ``[d, M]`` router) or ``"product_key"`` (two sub-key tables of
        ``n₁ × n₂ = M`` keys over the two halves of the router input, exact two-stage top-K;
        see :mod:`dsc_jax.layers.dsc_product_key`).
      product_key_rows: ``n₁`` of the product-key router (``0``: ``√M``, M a perfect square).
      product_key_aux: the product-key load-balancing loss: ``"marginal"`` balances each
        sub-key table's usage (``O(N·√M)``); ``"joint"`` balances the ``M`` atoms' mean
        probabilities like the flat router's loss; ``"selection"`` is Switch-style
        ``M Σ_j f_j P_j`` on the atoms' top-K pick fractions ``f`` (both ``O(N·M)`` FLOPs, no
        ``[N, M]`` array; see :mod:`dsc_jax.layers.dsc_product_key`). With the flat router
        it must stay ``"marginal"`` (another value would be ignored).
      frame_regularizer: sow the frame loss (``O(M d²)`` FLOPs per call, independent of the
        token count: at M=65,536, d=384 about 39 GFLOP forward; turn it off at large M).
      dropout_rate: dropout on the output when ``deterministic=False``.
      init_std: std of ``mlp_in`` and the router kernel (the paper: 0.02).
      out_init_std: std of ``mlp_out``, the static FFN's output projection (the paper: 0.02).
      dtype: compute dtype of the static FFN and the bank contraction, and the output dtype.
        The router always computes in float32.
      param_dtype: dtype of the parameters (initialisers compute in float32, then cast).

    Parameter tree (``params``): ``mlp_in/kernel [d,H]``, ``mlp_out/kernel [H,d]``,
    ``router_norm/scale [d]`` and ``router_norm/bias [d]`` (refined only), ``router/kernel [d,M]``,
    ``router/bias [M]`` (``router="product_key"``: ``router/keys_1/{kernel [d//2, n₁], bias
    [n₁]}`` and ``router/keys_2/{kernel [d - d//2, n₂], bias [n₂]}``), ``basis_u [M,d]``,
    ``basis_v [M,d]``, ``gamma`` (``[d]`` refined, ``[]`` basic).

    Sown (never at ``init``): ``intermediates/top_k_indices [..., K]`` int32,
    ``intermediates/gates [..., K]`` (``ẑ``) and ``intermediates/signal [...]`` (``S``),
    float32; ``losses/{aux, budget, frame, z}`` when ``"losses"`` is mutable (``frame`` only
    with ``frame_regularizer``, as its excess over the Welch bound,
    :func:`dsc_router.frame_excess`: the paper's ``L_frame`` less a constant; product-key
    ``aux``/``z``: see
    :mod:`dsc_jax.layers.dsc_product_key`).
    """

    num_bases: int
    top_k: int
    hidden_dim: int
    variant: str = "refined"
    tau: float = paper.TAU
    eps: float = paper.EPS
    gamma_init: float = paper.GAMMA_INIT
    budget_target: float = paper.BUDGET_TARGET
    bank_radius: float = DEFAULT_BANK_RADIUS
    bank_init: str = "sphere"
    compute: str = "auto"
    bank_axis: str | None = None
    router: str = "flat"
    product_key_rows: int = 0
    product_key_aux: str = "marginal"
    frame_regularizer: bool = True
    dropout_rate: float = 0.0
    init_std: float = paper.INIT_STD
    out_init_std: float = paper.INIT_STD
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        name = type(self).__name__
        _checks.check_positive_int(name, "num_bases", self.num_bases)
        common.check_top_k(name, self.top_k, "num_bases", self.num_bases)
        common.check_common_fields(self)
        _checks.check_choice(name, "variant", self.variant, VARIANTS)
        _checks.check_choice(name, "compute", self.compute, COMPUTE_MODES)
        _checks.check_choice(name, "router", self.router, ROUTERS)
        self._check_bank_axis(name)
        _checks.check_choice(name, "frame_regularizer", self.frame_regularizer, (True, False))
        _checks.check_choice(name, "product_key_aux", self.product_key_aux, PRODUCT_KEY_AUX)
        if self.router == "product_key":
            dsc_product_key.product_key_shape(name, self.num_bases, self.product_key_rows)
        elif self.product_key_rows:
            raise ValueError(
                f"{name}.product_key_rows={self.product_key_rows} is invalid with "
                "router='flat'; expected 0."
            )
        elif self.product_key_aux != PRODUCT_KEY_AUX[0]:
            raise ValueError(
                f"{name}.product_key_aux={self.product_key_aux!r} is only read with "
                f"router='product_key' (router='flat'); expected {PRODUCT_KEY_AUX[0]!r}."
            )
        _checks.check_positive_float(name, "tau", self.tau)
        _checks.check_positive_float(name, "eps", self.eps)
        _checks.check_positive_float(name, "budget_target", self.budget_target, allow_zero=True)
        _checks.check_positive_float(name, "bank_radius", self.bank_radius)
        _checks.check_choice(name, "bank_init", self.bank_init, BANK_INITS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Apply the layer (the paper's Algorithm 2; Algorithm 1 with ``variant="basic"``).

        Args:
          x: ``[..., d]`` floating input.
          deterministic: disables dropout when True (positional or keyword, so ``nn.remat``
            can mark it static).

        Returns:
          ``[..., d]`` in ``dtype``.
        """
        _checks.check_float_input(
            type(self).__name__, x, common.model_dim_of(self, ("basis_u",), axis=1)
        )
        d_model, lead_shape = x.shape[-1], x.shape[:-1]
        tokens = x.reshape(-1, d_model)  # [N, d]
        # f(x) = GELU(x W1) W2, built first: x's gradient then sums its three parts (static
        # FFN, router, contraction) in the order the golden numbers were recorded with.
        static = self._static_ffn(tokens)
        basis_u, basis_v, gamma = self._bank(d_model)

        # Route: the K atoms of every token and their gates ẑ (float32).
        routing = self.make_router()(self._router_input(tokens), with_losses=collects_losses(self))
        # Normalise the bank and contract: ((x U_Iᵀ) ⊙ ẑ) V_I, ΔW(x) never materialised.
        dynamic = self._contract(tokens.astype(self.dtype), basis_u, basis_v, routing)  # [N, d]
        dynamic = checkpoint_name(dynamic, remat_names.DSC_OUTPUT)
        # Add to the static FFN: y = f(x) + y_dyn ⊙ γ.
        y = static + (dynamic * gamma.astype(self.dtype)).astype(self.dtype)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

        frame = {}
        if self.frame_regularizer and collects_losses(self):
            unit_u = dsc_contract.normalize_rows(basis_u, self.eps)
            unit_v = dsc_contract.normalize_rows(basis_v, self.eps)
            frame = {"frame": dsc_router.frame_excess(unit_u, unit_v)}
        sow_routing(self, routing, lead_shape, signal=True, extra_losses=frame)
        return y.reshape(*lead_shape, d_model).astype(self.dtype)

    def _check_bank_axis(self, name: str) -> None:
        if self.bank_axis is None:
            return
        if not isinstance(self.bank_axis, str) or not self.bank_axis:
            raise ValueError(
                f"{name}.bank_axis={self.bank_axis!r} is invalid; expected None or the name "
                "of a mesh axis, e.g. 'tensor'."
            )
        if self.compute == "dense":
            raise ValueError(
                f"{name}.compute='dense' is invalid with bank_axis={self.bank_axis!r}: the "
                "sharded bank runs the gather contraction; expected compute 'gather' or "
                "'auto' (or bank_axis=None)."
            )

    def _contract(
        self, tokens: jax.Array, basis_u: jax.Array, basis_v: jax.Array, routing: Any
    ) -> jax.Array:
        """``((x U_Iᵀ) ⊙ ẑ) V_I`` on ``tokens: [N, d]`` (compute dtype) -> ``[N, d]``: the
        path of :func:`resolve_compute`, or the sharded bank's contraction (``bank_axis``)."""
        if self.bank_axis is not None and not self.is_initializing():
            return bank_parallel.contract_sharded_banks(
                tokens,
                basis_u,
                basis_v,
                routing.indices,
                routing.gates,
                self.eps,
                axis_name=self.bank_axis,
            )
        path = resolve_compute(self.compute, self.num_bases, self.top_k, self.bank_axis)
        return dsc_contract.contract(
            tokens, basis_u, basis_v, routing.indices, routing.gates, self.eps, path
        )

    def _bank(self, d_model: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The raw bank ``basis_u``, ``basis_v`` ``[M, d]`` (normalised where they are read)
        and ``gamma`` (``[d]`` refined, ``[]`` basic)."""
        bank_init = bank_initializer(self.bank_init, self.bank_radius, self.eps)
        bank_shape = (self.num_bases, d_model)
        basis_u = self.param("basis_u", bank_init, bank_shape, self.param_dtype)
        basis_v = self.param("basis_v", bank_init, bank_shape, self.param_dtype)
        gamma_shape, gamma_names = (
            ((d_model,), ("embed",)) if self.variant == "refined" else ((), ())
        )
        gamma = self.param(
            "gamma",
            common.logical(nn.initializers.constant(self.gamma_init), gamma_names),
            gamma_shape,
            self.param_dtype,
        )
        return basis_u, basis_v, gamma

    def _router_input(self, tokens: jax.Array) -> jax.Array:
        """``LayerNorm(x)`` (refined) or ``x`` (basic), float32 ``[N, d]``."""
        query = tokens.astype(jnp.float32)
        if self.variant == "refined":
            query = common.layer_norm(self.param_dtype, "router_norm")(query)
        return query

    @nn.nowrap
    def make_router(self) -> dsc_router.DSCRouter:
        """The layer's ``router`` module, flat or product-key (:class:`dsc_router.DSCRouter`),
        from the layer's fields; its input is ``LayerNorm(x)`` (refined) or ``x``."""
        fields = {
            "num_bases": self.num_bases,
            "top_k": self.top_k,
            "tau": self.tau,
            "eps": self.eps,
            "budget_target": self.budget_target,
            "init_std": self.init_std,
            "param_dtype": self.param_dtype,
            "name": "router",
        }
        if self.router == "product_key":
            return dsc_product_key.ProductKeyRouter(
                rows=self.product_key_rows, aux=self.product_key_aux, **fields
            )
        return dsc_router.FlatRouter(**fields)

    def _static_ffn(self, tokens: jax.Array) -> jax.Array:
        """``GELU(x W1) W2`` on ``tokens: [N, d]`` in ``dtype``."""
        return common.gelu_mlp(
            tokens.astype(self.dtype),
            self.hidden_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=self.init_std,
            out_init_std=self.out_init_std,
        )
