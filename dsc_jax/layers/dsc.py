"""The Dynamic Subspace Composition layer (spec §1-§3).

``y = GELU(x W1) W2 + ((x U_Iᵀ) ⊙ ẑ) V_I ⊙ γ`` where the router picks, per token, the
top-K of M unit-norm rank-1 atoms ``(u_j, v_j)`` and ``ẑ`` shrinks to zero when the router's
total signal ``S`` is small. ``ΔW(x) ∈ R^{d×d}`` is never materialised.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsc_jax import _checks, paper
from dsc_jax.layers import common, dsc_contract, dsc_product_key, dsc_router

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
# 4·N·K·d FLOPs but 2·N·K·d gathered elements, which run far below matmul peak. Measured with
# benchmarks/layer_latency.py on CPU (float32, 4096 tokens, d=384, K=4), gather/dense time is
# 1.2 at M/K=32, 0.93 at 64 and 0.64 at 381 (the paper's M=1523): the crossover sits near
# M/K≈48. GPUs and TPUs favour matmuls more, which moves it up, so 32 is conservative there.
AUTO_DENSE_MAX_BASES_PER_ACTIVE = 32


def resolve_compute(compute: str, num_bases: int, top_k: int) -> str:
    """The compute path ``compute`` selects for ``num_bases`` atoms with ``top_k`` active."""
    if compute != "auto":
        return compute
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
        rows = dsc_router.normalize_rows(directions(key, shape, jnp.float32), eps)
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
      init_std: std of ``mlp_in`` and the router kernel (spec: 0.02).
      out_init_std: std of ``mlp_out``, the static FFN's output projection (spec §1: 0.02).
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
        """Apply the layer.

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
        d_model = x.shape[-1]
        lead_shape = x.shape[:-1]
        x = x.reshape(-1, d_model)  # [N, d]

        # Static FFN f(x) = GELU(x W1) W2.
        static_out = common.gelu_mlp(
            x.astype(self.dtype),
            self.hidden_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=self.init_std,
            out_init_std=self.out_init_std,
        )

        # Router, always float32.
        router_in = x.astype(jnp.float32)
        if self.variant == "refined":
            router_in = common.router_layer_norm(self.param_dtype)(router_in)
        if self.router == "product_key":
            rows, cols = dsc_product_key.product_key_shape(
                type(self).__name__, self.num_bases, self.product_key_rows
            )
            scores = dsc_product_key.ProductKeyRouter(
                rows, cols, self.init_std, self.param_dtype, name="router"
            )(router_in)
            routing = dsc_product_key.route_product_key(*scores, self.top_k, self.tau, self.eps)
            logits: Any = scores
        else:
            routing, logits = self._flat_route(router_in)
        return self._finish(x, static_out, routing, logits, d_model, lead_shape, deterministic)

    def _flat_route(self, router_in: jax.Array) -> tuple[dsc_router.RouterOutput, jax.Array]:
        """The ``[d, M]`` router and :func:`dsc_router.route`; returns ``(routing,
        raw_logits [N, M])``."""
        router = nn.Dense(
            self.num_bases,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=common.normal(self.init_std, ("embed", "bases")),
            bias_init=common.logical(nn.initializers.zeros, ("bases",)),
            name="router",
        )
        raw_logits = router(router_in)  # [N, M]
        router_params = nn.unbox(router.variables["params"])

        def selected_gradient(selected: jax.Array, indices: jax.Array) -> jax.Array:
            # φ's gradient over the K selected router columns only (O(N K d), not O(N M d)).
            return dsc_contract.sparse_logit_gradient(
                selected, router_in, router_params["kernel"], router_params["bias"], indices
            )

        routing = dsc_router.route(
            raw_logits, self.top_k, self.tau, self.eps, selected_gradient=selected_gradient
        )
        return routing, raw_logits

    def _finish(
        self,
        x: jax.Array,
        static_out: jax.Array,
        routing: dsc_router.RouterOutput,
        logits: Any,
        d_model: int,
        lead_shape: tuple[int, ...],
        deterministic: bool,
    ) -> jax.Array:
        """Bank, contraction, output and sown diagnostics / losses. ``logits``: the flat
        router's raw ``[N, M]`` logits, or the product-key router's two score tables."""

        # Bank, normalised in the forward pass too (imported banks stay valid).
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

        dynamic = self._contract(x, basis_u, basis_v, routing)  # [N, d]
        y = static_out + (dynamic * gamma.astype(self.dtype)).astype(self.dtype)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

        if not self.is_initializing():  # keep diagnostics and losses out of `init`'s variables
            self._sow(routing, logits, basis_u, basis_v, lead_shape)
        return y.reshape(*lead_shape, d_model).astype(self.dtype)

    def _sow(
        self,
        routing: dsc_router.RouterOutput,
        logits: Any,
        basis_u: jax.Array,
        basis_v: jax.Array,
        lead_shape: tuple[int, ...],
    ) -> None:
        """Diagnostics into ``intermediates``; unweighted regularisers into mutable ``losses``."""
        self.sow("intermediates", "top_k_indices", routing.indices.reshape(*lead_shape, -1))
        self.sow("intermediates", "gates", routing.coefficients.reshape(*lead_shape, -1))
        self.sow("intermediates", "signal", routing.signal.reshape(lead_shape))
        if self.is_mutable_collection("losses"):
            if self.router == "flat":
                aux = dsc_router.aux_loss(routing.clipped_logits)
                z = common.z_loss(logits)
            else:
                aux = dsc_product_key.product_key_balance_loss(
                    self.product_key_aux, *logits, routing.indices, self.tau
                )
                z = dsc_product_key.product_key_z_loss(*logits)
            self.sow("losses", "aux", aux)
            self.sow("losses", "budget", dsc_router.budget_loss(routing.signal, self.budget_target))
            if self.frame_regularizer:
                unit_u = dsc_router.normalize_rows(basis_u, self.eps)
                unit_v = dsc_router.normalize_rows(basis_v, self.eps)
                self.sow("losses", "frame", dsc_router.frame_excess(unit_u, unit_v))
            self.sow("losses", "z", z)

    def _contract(
        self,
        x: jax.Array,
        basis_u: jax.Array,
        basis_v: jax.Array,
        routing: dsc_router.RouterOutput,
    ) -> jax.Array:
        """``((x U_Iᵀ) ⊙ ẑ) V_I`` for ``x: [N, d]``, raw banks ``[M, d]`` (rows normalised here:
        "gather" with ``M > N·K`` normalises only the ``N·K`` gathered rows, otherwise the
        whole bank once, whichever is less work); returns ``[N, d]``."""
        x = x.astype(self.dtype)
        mode = resolve_compute(self.compute, self.num_bases, self.top_k)
        if mode == "gather":
            return dsc_contract.contract_raw_banks(
                x, basis_u, basis_v, routing.indices, routing.coefficients, self.eps
            )
        unit_u = dsc_router.normalize_rows(basis_u, self.eps).astype(self.dtype)
        unit_v = dsc_router.normalize_rows(basis_v, self.eps).astype(self.dtype)
        # "dense": project onto every atom, keep the selected K through a sparse coefficient row.
        num_tokens = x.shape[0]
        projections = jnp.einsum("nd,md->nm", x, unit_u, preferred_element_type=jnp.float32)
        gates = jnp.zeros((num_tokens, self.num_bases), jnp.float32)
        gates = gates.at[jnp.arange(num_tokens)[:, None], routing.indices].set(routing.coefficients)
        coefficients = (projections * gates).astype(self.dtype)  # [N, M]
        return jnp.einsum("nm,md->nd", coefficients, unit_v)
