"""The FFN layers and the GPT as Flax NNX modules, computing with the Linen code.

Each class holds its (static) Linen module and stores the parameters that the Linen ``init``
creates as :class:`flax.nnx.Param` attributes under the same names (``layer.mlp_in.kernel``,
``layer.basis_u``), with the logical axis names as ``out_sharding`` metadata (no mesh is
needed: ``eager_sharding=False``). A call rebuilds the ``params`` dict and runs the Linen
``apply``: one copy of the math, the same parameter tree.

Every call OVERWRITES two groups of variables of fixed structure (so ``nnx.jit`` traces a step
once), one array per variable (so ``nnx.eval_shape`` under a mesh gives each a sharding):

* :class:`Regularizer`: the unweighted regularisers of the call (the Linen ``"losses"``
  collection: ``aux``, ``budget``, ``frame``, ``z``); zeros after a ``deterministic`` call;
* :class:`Diagnostic`: per-call routing sums (:func:`dsc_jax.layers.diagnostics.routing_statistics`:
  ``usage [M or E]`` selection counts, ``tokens``; DSC also ``signal_sum``, ``collapsed``).

Read them with :func:`collect_regularizers` / :func:`collect_diagnostics` (nested mappings).

Why not ``flax.nnx.bridge.ToNNX`` (checked against flax 0.12.8): it turns every Linen
collection into NNX variables of the same structure and feeds them back into the next
``apply``, which does not fit these layers:

* sown values accumulate: the previous call's ``"losses"`` and ``"intermediates"`` go back in
  as variables and ``sow`` appends to them, so every call adds one more entry per term (a
  regulariser summed from them counts old calls again, and the state's structure changes
  each call, so ``nnx.jit`` retraces every step); nothing resets them after a
  ``deterministic`` call;
* the sown per-token intermediates (``top_k_indices [B, T, K]``) become state whose shape
  follows the batch, and land as top-level attributes (``aux``, ``gates``) beside the
  parameters; here they are reduced to fixed-shape routing sums;
* the logical axis names become ``out_sharding`` metadata with eager sharding, so without a
  mesh ``lazy_init`` raises ("An auto mesh context or metadata is required") unless
  ``flax_always_shard_variable`` is turned off process-wide; here ``eager_sharding=False``
  per parameter;
* every call needs ``mutable=[...]`` (the default is immutable outside a bridge module).

Parameters themselves convert the same way (same names and metadata), so a Linen module
without sown collections could use ``ToNNX`` as well.

Usage::

    from flax import nnx
    import dsc_jax
    from dsc_jax import nnx as dnnx

    layer = dnnx.DSCLayer(64, num_bases=32, top_k=4, hidden_dim=128, rngs=nnx.Rngs(0))
    y = layer(x, deterministic=False)                       # x: [..., 64] -> [..., 64]
    reg, terms = dsc_jax.regularization_loss(dnnx.collect_regularizers(layer))

    model = dnnx.GPT(dsc_jax.GPTConfig(...), rngs=nnx.Rngs(0))  # tokens [B, T] -> [B, T, V]
    other = dnnx.from_linen(my_linen_module, example_input, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from dsc_jax import layers as linen_layers
from dsc_jax.layers.diagnostics import routing_statistics
from dsc_jax.models import gpt as linen_gpt

__all__ = [
    "GPT",
    "DSCLayer",
    "DenseFFN",
    "Diagnostic",
    "FromLinen",
    "MoELayer",
    "MoLoRALayer",
    "Regularizer",
    "collect_diagnostics",
    "collect_regularizers",
    "from_linen",
    "pop_regularizers",
]


class Regularizer(nnx.Variable):
    """One unweighted regulariser value of a module's latest call (a float32 scalar, or
    stacked per layer); :func:`collect_regularizers` returns them as the Linen ``"losses"``
    collection, ``{term: (value,)}`` (nested by submodule for a GPT)."""


class Diagnostic(nnx.Variable):
    """One routing sum of a module's latest call (fixed shape; see the module docstring)."""


def _to_param(leaf: Any) -> nnx.Param:
    """An unboxed ``nnx.Param``; logical axis names kept as ``out_sharding`` metadata."""
    if isinstance(leaf, nn.Partitioned):  # LogicallyPartitioned too; names are logical
        return nnx.Param(leaf.unbox(), out_sharding=tuple(leaf.names), eager_sharding=False)
    return nnx.Param(leaf)


def _to_nodes(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params mapping -> ``nnx.Dict`` subtrees with ``nnx.Param`` leaves."""
    return {
        name: nnx.Dict(_to_nodes(value)) if isinstance(value, Mapping) else _to_param(value)
        for name, value in tree.items()
    }


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


class FromLinen(nnx.Module):
    """An NNX face of any Linen module ``module(x, deterministic=...)``.

    Args:
      module: the Linen module (unbound; kept as static structure).
      example: an input of the right trailing shape/dtype used by ``init`` (e.g. a ``[1, d]``
        float array; ``[1, 1]`` int tokens for a GPT). Only its shape and dtype matter.
      rngs: ``rngs.params()`` initialises the parameters; the ``dropout`` stream (or the
        default one) is forked for the dropout / router-jitter keys of training calls.

    Attributes: the Linen parameters under their Linen names (``nnx.Dict`` for submodules),
    ``regularizers`` (``nnx.List`` of :class:`Regularizer`), ``diagnostics`` (``nnx.List`` of
    :class:`Diagnostic`): one array each, in the order of their static tree structures.
    """

    _OWN = frozenset(
        {"linen", "rngs", "regularizers", "diagnostics", "regularizer_tree", "diagnostic_tree"}
    )

    def __init__(self, module: nn.Module, example: jax.Array, *, rngs: nnx.Rngs):
        self.linen = module
        boxed = module.init({"params": rngs.params()}, example)["params"]
        clash = sorted(set(boxed) & (self._OWN | set(dir(type(self)))))
        if clash:
            raise ValueError(
                f"{type(self).__name__}: parameter names {clash} clash with attributes."
            )
        for name, node in _to_nodes(boxed).items():
            setattr(self, name, node)
        try:
            self.rngs = rngs["dropout"].fork()
        except KeyError:  # no dropout/default stream: training calls must pass `rngs=`
            self.rngs = nnx.data(None)
        params = jax.tree.map(nn.unbox, boxed, is_leaf=_is_partitioned)
        _, losses, stats = jax.eval_shape(
            lambda p, x, k: self._run(p, x, False, k), params, example, jax.random.key(0)
        )  # fixed structure of the per-call variables (independent of the input's shape)
        self.regularizer_tree = jax.tree.structure(losses)  # static
        self.diagnostic_tree = jax.tree.structure(stats)
        self.regularizers = nnx.List([Regularizer(_zeros(s)) for s in jax.tree.leaves(losses)])
        self.diagnostics = nnx.List([Diagnostic(_zeros(s)) for s in jax.tree.leaves(stats)])

    def _run(self, params: Any, x: jax.Array, deterministic: bool, key: jax.Array | None):
        """Pure Linen apply: ``(y, losses, routing sums)``."""
        mutable = ["intermediates"] if deterministic else ["losses", "intermediates"]
        rngs = None if key is None else {"dropout": key}
        y, state = self.linen.apply(
            {"params": params}, x, deterministic=deterministic, mutable=mutable, rngs=rngs
        )
        stats = routing_statistics(state.get("intermediates", {}), params)
        if set(stats) == {""}:  # a single layer: its own sums, not {"": sums}
            stats = stats[""]
        return y, dict(state.get("losses", {})), stats

    @property
    def params(self) -> dict[str, Any]:
        """The Linen ``params`` dict (plain nested dict of arrays)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(
        self,
        x: jax.Array,
        deterministic: bool = True,
        *,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Apply the Linen module (output as the Linen module's, e.g. ``[..., d]``).

        Args:
          x: the input (layers: ``[..., d]`` floats; GPT: ``[B, T]`` int tokens).
          deterministic: ``False`` enables dropout / MoE jitter and computes the regularisers.
          rngs: overrides the stored stream for this call's ``dropout`` key; only with
            ``deterministic=False`` (a deterministic call draws nothing, so it raises).
        """
        key = None
        if deterministic and rngs is not None:
            raise ValueError(
                f"{type(self).__name__}: rngs= is only used with deterministic=False (dropout, "
                "router jitter); a deterministic call draws nothing, so drop it."
            )
        if not deterministic:
            source = self.rngs if rngs is None else rngs
            if source is None:
                raise ValueError(
                    f"{type(self).__name__}: deterministic=False needs a dropout key; build it "
                    "with rngs holding a 'dropout' or 'default' stream, or pass rngs=."
                )
            if isinstance(source, nnx.Rngs):
                source = source["dropout"]
            key = source if isinstance(source, jax.Array) else source()
        y, losses, stats = self._run(self.params, x, deterministic, key)
        if deterministic:  # the Linen layers compute no regularisers then
            losses = jax.tree.map(jnp.zeros_like, self.regularizer_values())
        _store(self.regularizers, self.regularizer_tree, losses)
        _store(self.diagnostics, self.diagnostic_tree, stats)
        return y

    def regularizer_values(self) -> Any:
        """The latest call's regularisers as the Linen ``"losses"`` collection."""
        return self.regularizer_tree.unflatten([v.get_value() for v in self.regularizers])

    def diagnostic_values(self) -> Any:
        """The latest call's routing sums (nested mapping)."""
        return self.diagnostic_tree.unflatten([v.get_value() for v in self.diagnostics])


def _store(variables: nnx.List, treedef: Any, tree: Any) -> None:
    """Overwrite ``variables`` (one per leaf) with the leaves of ``tree`` (structure
    ``treedef``)."""
    for variable, leaf in zip(variables, treedef.flatten_up_to(tree), strict=True):
        variable.set_value(leaf)


def _zeros(shape: jax.ShapeDtypeStruct) -> jax.Array:
    return jnp.zeros(shape.shape, shape.dtype)


def from_linen(module: nn.Module, example: int | jax.Array, *, rngs: nnx.Rngs) -> FromLinen:
    """:class:`FromLinen` of ``module``; ``example`` is an input or the model width ``d``
    (a ``[1, d]`` float32 input)."""
    if isinstance(example, int):
        example = jnp.zeros((1, example), jnp.float32)
    return FromLinen(module, example, rngs=rngs)


class _Layer(FromLinen):
    """``Layer(d_model, **linen_fields, rngs=...)``; fields as the Linen layer's."""

    linen_class: ClassVar[type[nn.Module]]

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, **fields: Any):
        example = jnp.zeros((1, d_model), jnp.float32)
        super().__init__(self.linen_class(**fields), example, rngs=rngs)


class DSCLayer(_Layer):
    """NNX :class:`dsc_jax.layers.DSCLayer`: ``DSCLayer(d, num_bases=M, top_k=K, hidden_dim=H,
    rngs=...)``; ``[..., d] -> [..., d]``. Params ``mlp_in.kernel [d,H]``, ``mlp_out.kernel
    [H,d]``, ``router_norm.{scale,bias} [d]``, ``router.{kernel [d,M], bias [M]}``,
    ``basis_u``/``basis_v [M,d]``, ``gamma [d]`` (``[]`` basic); regularisers aux, budget,
    frame, z. ``router="product_key"`` (M a perfect square, or ``product_key_rows=n₁``)
    replaces ``router`` by two sub-key tables ``router.keys_1.{kernel [d/2,n₁], bias [n₁]}``
    and ``router.keys_2.{kernel [d-d/2,n₂], bias [n₂]}`` (``n₁·n₂ = M``)."""

    linen_class = linen_layers.DSCLayer


class MoELayer(_Layer):
    """NNX :class:`dsc_jax.layers.MoELayer`: ``MoELayer(d, num_experts=E, top_k=k,
    hidden_dim=H, rngs=...)``; ``[..., d] -> [..., d]``. Params ``router_norm.{scale,bias}
    [d]``, ``router.kernel [d,E]``, ``expert_in [E,d,H]``, ``expert_out [E,H,d]``; regularisers
    aux, z. Training calls draw the router jitter from the ``dropout`` stream."""

    linen_class = linen_layers.MoELayer


class MoLoRALayer(_Layer):
    """NNX :class:`dsc_jax.layers.MoLoRALayer`: ``MoLoRALayer(d, num_experts=E, rank=r,
    top_k=k, hidden_dim=H, rngs=...)``; ``[..., d] -> [..., d]``. Params ``mlp_in.kernel``,
    ``mlp_out.kernel``, ``router.{kernel [d,E], bias [E]}``, ``lora_a [E,d,r]``, ``lora_b
    [E,r,d]``; regularisers aux, z."""

    linen_class = linen_layers.MoLoRALayer


class DenseFFN(_Layer):
    """NNX :class:`dsc_jax.layers.DenseFFN`: ``DenseFFN(d, hidden_dim=H, rngs=...)``;
    ``[..., d] -> [..., d]``. Params ``mlp_in.kernel [d,H]``, ``mlp_out.kernel [H,d]``; no
    regularisers (``regularization_loss(..., allow_empty=True)``)."""

    linen_class = linen_layers.DenseFFN


class GPT(FromLinen):
    """NNX :class:`dsc_jax.GPT`: ``GPT(cfg, rngs=...)``; ``[B, T]`` int tokens ->
    ``[B, T, V]`` float32 logits. Params as the Linen tree (``wte.embedding``,
    ``block_0.ffn.basis_u``, ...); regularisers nested by block (``block_0/ffn/aux``)."""

    def __init__(self, cfg: linen_gpt.GPTConfig, *, rngs: nnx.Rngs):
        super().__init__(linen_gpt.GPT(cfg), jnp.zeros((1, 1), jnp.int32), rngs=rngs)


def _collect(model: nnx.Module, values: str) -> dict[str, Any]:
    """``layer.<values>()`` of every :class:`FromLinen` layer in ``model``, nested by the
    layer's path."""
    out: dict[str, Any] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, FromLinen):
            target = out
            for key in path:
                target = target.setdefault(str(key), {})
            target.update(getattr(node, values)())
    return out


def collect_regularizers(model: nnx.Module) -> dict[str, Any]:
    """The latest call's unweighted regularisers of every layer in ``model``, as a nested
    mapping for :func:`dsc_jax.regularization_loss` (``{"ffn": {"aux": (x,), ...}}``; the
    terms of ``model`` itself at the top level)."""
    return _collect(model, "regularizer_values")


def collect_diagnostics(model: nnx.Module) -> dict[str, Any]:
    """The latest call's routing sums of every layer in ``model``, nested by path."""
    return _collect(model, "diagnostic_values")


def pop_regularizers(model: nnx.Module) -> dict[str, Any]:
    """:func:`collect_regularizers`, then reset every :class:`Regularizer` to zeros."""
    collected = collect_regularizers(model)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Regularizer):
            node.set_value(jax.tree.map(jnp.zeros_like, node.get_value()))
    return collected
