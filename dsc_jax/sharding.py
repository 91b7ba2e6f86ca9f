"""Device mesh, logical-axis rules and sharded state creation.

Parameters name their axes logically (``embed``, ``mlp``, ``bases``, ...; see
``docs/DESIGN.md``). This module turns those names into ``NamedSharding``\\ s on a
three-axis mesh ``("data", "fsdp", "tensor")``:

* ``data``   -- pure data parallelism: the batch is split, parameters are replicated;
* ``fsdp``   -- the batch is split *and* parameters are sharded along ``embed``
  (ZeRO-3 style; XLA all-gathers a weight just before it is used);
* ``tensor`` -- Megatron-style model parallelism over ``mlp``/``heads``/``vocab`` and
  basis parallelism over ``bases`` (the DSC bank rows and router columns).

A dimension whose size is not divisible by its mesh axes is replicated instead
(logged once), so e.g. ``M = 1523`` atoms simply stay whole on a 2-way tensor axis.

(A little over 400 lines: the rules, the specs they give and the sharded creation that uses
them are read together; splitting them would split one lookup across modules.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Ordered (logical name, mesh axes) pairs in Flax's format, highest priority first: a
# mesh axis is used at most once per array, so earlier rules win. ``mlp`` precedes
# ``experts``: MoE expert weights [experts, embed, mlp] shard their hidden dim over
# ``tensor`` (Megatron within each expert, independent of the often prime expert
# count and of the token->expert dispatch), while arrays without an ``mlp`` dim (the
# gate [embed, experts], MoLoRA factors [experts, embed, rank]) shard experts instead.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),  # activations: batch over data x fsdp
    ("length", None),  # no sequence parallelism
    ("embed", "fsdp"),  # d_model: FSDP shard of every weight
    ("mlp", "tensor"),  # FFN hidden (dense, DSC static FFN, MoE experts)
    ("heads", "tensor"),  # attention heads
    ("vocab", "tensor"),  # token embedding / tied head rows
    ("bases", "tensor"),  # DSC atoms: bank rows and router columns (basis parallelism)
    ("experts", "tensor"),  # only taken when no mlp dim claimed "tensor"
    ("subkeys", None),  # DSC product-key sub-key tables (√M keys): small, kept whole
    ("kv", None),  # head dim: small, kept whole
    ("position", None),  # learned positions: small, kept whole
    ("rank", None),  # LoRA rank: small, kept whole
    ("layers", None),  # the stacked-layer axis of GPTConfig(scan_layers=True)
)

_LOGGED_FALLBACKS: set[tuple[Any, ...]] = set()


def default_mesh_config() -> ml_collections.ConfigDict:
    """Default ``config.mesh`` block."""
    cfg = ml_collections.ConfigDict()
    # Mesh shape over MESH_AXES = (data, fsdp, tensor). One entry may be -1: it takes
    # all remaining devices. (-1, 1, 1) = pure data parallelism on every device.
    cfg.shape = (-1, 1, 1)
    # Overrides of LOGICAL_AXIS_RULES as "name=axis[+axis],..." ("" keeps defaults),
    # e.g. "bases=,experts=tensor" replicates the bank; "embed=fsdp+tensor" is 2-D FSDP.
    cfg.logical_axis_rules = ""
    return cfg


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over :data:`MESH_AXES` with Auto axis types.

    Args:
      shape: three sizes ``(data, fsdp, tensor)``; at most one may be ``-1`` (fills the
        remaining devices).
      devices: devices to use (default: ``jax.devices()``, all processes).

    Raises:
      ValueError: malformed shape, or its product does not match the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(s) for s in shape)
    n = len(devices)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"mesh shape {shape}: entries must be positive, with at most one -1 (fill)"
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ValueError(
                f"mesh shape {shape}: the fixed sizes (product {known}) do not divide "
                f"the device count {n}"
            )
        shape = tuple(n // known if s == -1 else s for s in shape)
    elif known != n:
        raise ValueError(
            f"mesh shape {shape} has {known} devices but {n} devices are available; "
            f"the product must equal the device count (or use -1 for one axis)"
        )
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:  # topology-aware device order (TPU tori, GPU ids)
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as err:
        logger.info("jax.make_mesh failed (%s); using the plain device order", err)
        return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def normalize_rules(rules: Rules | Mapping[str, MeshAxes]) -> tuple[tuple[str, MeshAxes], ...]:
    """Rules as ordered ``(name, mesh_axes)`` pairs; accepts pairs or a mapping."""
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for name, axes in items:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def merge_rules(
    *rule_sets: Rules | Mapping[str, MeshAxes], mesh: Mesh | Any | None = None
) -> tuple[tuple[str, MeshAxes], ...]:
    """Logical-axis rule sets merged into one rule per name, the first occurrence winning.

    Linen applies rules in order (the first rule for a name wins) while Flax NNX looks them
    up in a dict (the LAST duplicate wins), so ``your_rules + LOGICAL_AXIS_RULES`` means
    different things in the two; the merged rules have no duplicate and mean the same in
    both. With ``mesh`` (a ``Mesh`` or ``AbstractMesh``), mesh axes it lacks are dropped (a
    rule left without axes replicates), so Flax's own ``nn.logical_to_mesh_sharding``,
    ``nn.get_sharding`` and NNX's shardings accept the rules on another model's mesh, e.g. a
    1-axis ``("data",)`` mesh. Example::

        rules = merge_rules(your_rules, dsc_jax.LOGICAL_AXIS_RULES, mesh=mesh)

    Args:
      rule_sets: rules as ``(name, mesh_axes)`` pairs or mappings, highest priority first.
      mesh: restrict the mesh axes to this mesh's (None: keep every axis).

    Returns:
      Ordered ``(name, mesh_axes)`` pairs, one per logical name.
    """
    merged: dict[str, MeshAxes] = {}
    for rules in rule_sets:
        for name, axes in normalize_rules(rules):
            merged.setdefault(name, axes)
    if mesh is not None:
        present = set(mesh.axis_names)
        for name, axes in merged.items():
            kept = tuple(a for a in _axis_tuple(axes) if a in present)
            merged[name] = None if not kept else (kept[0] if len(kept) == 1 else kept)
    return tuple(merged.items())


def parse_rule_overrides(
    text: str, base: Rules | Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES
) -> tuple[tuple[str, MeshAxes], ...]:
    """Apply ``"name=axis[+axis],..."`` overrides to ``base`` (empty axis/None: replicate).

    An overridden name keeps its position (priority).

    Raises:
      ValueError: a malformed entry, an unknown mesh axis, or a logical name that is not one
        of ``base``'s (a typo would otherwise be ignored silently: no array uses the name).
    """
    rules = list(normalize_rules(base))
    known = [n for n, _ in rules]
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ValueError(f"logical_axis_rules entry {item!r} is not 'name=axis[+axis]'")
        axes_list = [a.strip() for a in value.split("+") if a.strip() not in ("", "None")]
        for a in axes_list:
            if a not in MESH_AXES:
                raise ValueError(
                    f"logical_axis_rules entry {item!r}: mesh axis {a!r} not in {MESH_AXES}"
                )
        axes: MeshAxes = (
            None if not axes_list else (axes_list[0] if len(axes_list) == 1 else tuple(axes_list))
        )
        if name not in known:
            raise ValueError(
                f"logical_axis_rules entry {item!r}: unknown logical name {name!r}; expected "
                f"one of {known}"
            )
        idx = [i for i, (n, _) in enumerate(rules) if n == name]
        rules[idx[0]] = (name, axes)
        for i in reversed(idx[1:]):
            del rules[i]
    return tuple(rules)


def rules_from_config(config: ml_collections.ConfigDict | None) -> tuple[tuple[str, MeshAxes], ...]:
    """:data:`LOGICAL_AXIS_RULES` with the overrides of ``config.logical_axis_rules``."""
    text = "" if config is None else (config.get("logical_axis_rules", "") or "")
    if not isinstance(text, str):  # a tuple of pairs given programmatically
        return normalize_rules(text)
    return parse_rule_overrides(text)


def _axis_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _log_fallback_once(
    name: str, size: int, wanted: tuple[str, ...], got: tuple[str, ...], mesh: Mesh
) -> None:
    key = (name, size, wanted, got, tuple(mesh.shape.items()))
    if key not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(key)
        sizes = [mesh.shape[a] for a in wanted]
        msg = "sharding: dim %r of size %d not divisible by mesh axes %s %s; using %s"
        logger.info(msg, name, size, wanted, sizes, got or "replication")


def logical_to_mesh_spec(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: Rules | Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
    shape: Sequence[int] | None = None,
) -> P:
    """Mesh ``PartitionSpec`` for one array whose dims carry logical ``names``.

    Rules are applied in priority order; a mesh axis is used at most once per array;
    mesh axes absent from ``mesh`` are dropped; a name that is itself a mesh axis and
    has no rule maps to that axis. With ``shape``, a dim not divisible by its mesh
    axes keeps the longest divisible prefix of them (for one axis: replication).
    """
    rules = normalize_rules(rules)
    names = tuple(names)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {names} do not match the array shape {tuple(shape)}")
    result: list[MeshAxes] = [None] * len(names)
    assigned = [n is None for n in names]
    used: set[str] = set()
    ruled = {n for n, _ in rules}
    candidates = list(rules) + [(n, n) for n in names if n in MESH_AXES and n not in ruled]
    for name, axes in candidates:
        if name not in names:
            continue
        pos = names.index(name)
        if assigned[pos]:
            continue
        wanted = tuple(a for a in _axis_tuple(axes) if a in mesh.shape)
        if used.intersection(wanted):
            continue  # mesh axis already taken: try a lower-priority rule
        got = wanted
        if shape is not None:
            while got and shape[pos] % math.prod(mesh.shape[a] for a in got):
                got = got[:-1]
            if got != wanted:
                _log_fallback_once(name, shape[pos], wanted, got, mesh)
        assigned[pos] = True
        used.update(got)
        result[pos] = None if not got else (got[0] if len(got) == 1 else got)
    return P(*result)


def _is_spec_leaf(x: Any) -> bool:
    return isinstance(x, nn.Partitioned | P)


def _leaf_sharding(leaf: Any, shape_leaf: Any, mesh: Mesh, rules: Rules) -> Any:
    if isinstance(leaf, nn.Partitioned):
        if not hasattr(leaf.value, "shape"):  # e.g. optax MaskedNode: keep the empty node
            return leaf.value
        names, shape = leaf.names, leaf.value.shape
    elif isinstance(leaf, P):
        names, shape = tuple(leaf), None
    else:  # unboxed array / ShapeDtypeStruct / scalar: no logical names -> replicated
        return NamedSharding(mesh, P())
    if shape_leaf is not None:
        shape = getattr(shape_leaf, "value", shape_leaf).shape
    if len(names) == 0:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_mesh_spec(names, mesh, rules, shape))


def logical_to_shardings(
    logical_spec_tree: Any,
    mesh: Mesh,
    rules: Rules | Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
    *,
    shapes: Any = None,
) -> Any:
    """Tree of ``NamedSharding`` for a tree of logical specs.

    Args:
      logical_spec_tree: leaves are ``nn.Partitioned`` boxes (e.g. the output of
        ``jax.eval_shape(model.init, ...)``; names *and* shapes, so the divisibility
        fallback applies), ``PartitionSpec``\\ s of logical names (e.g. from
        ``nn.get_partition_spec``), or plain arrays (replicated).
      mesh: the device mesh.
      rules: logical-axis rules (pairs or a mapping).
      shapes: optional tree of arrays/``ShapeDtypeStruct`` matching ``logical_spec_tree``
        (leaf-for-box) that supplies shapes for ``PartitionSpec`` leaves.

    Returns:
      The tree with every box/spec/array replaced by its ``NamedSharding`` (the
      structure of the *unboxed* tree).
    """
    rules = normalize_rules(rules)
    if shapes is None:
        return jax.tree.map(
            lambda x: _leaf_sharding(x, None, mesh, rules),
            logical_spec_tree,
            is_leaf=_is_spec_leaf,
        )
    return jax.tree.map(
        lambda x, s: _leaf_sharding(x, s, mesh, rules),
        logical_spec_tree,
        shapes,
        is_leaf=_is_spec_leaf,
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dim over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the ``("data", "fsdp")`` axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(rows: int, mesh: Mesh, what: str = "global batch") -> None:
    """Refuse a global batch of ``rows`` rows that does not split evenly over the batch
    axes of ``mesh`` and over the processes (each process feeds its own rows).

    Raises:
      ValueError: naming ``what``, the value and the multiple it must be.
    """
    shards, nproc = batch_shards(mesh), jax.process_count()
    if rows % shards or rows % nproc:
        raise ValueError(
            f"{what}={rows} is not divisible by data*fsdp={shards} and by the process count "
            f"{nproc} (mesh {dict(mesh.shape)}); use a multiple of {math.lcm(shards, nproc)}."
        )


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Global batch ``jax.Array``\\ s from each process's own rows (a tree of numpy arrays).

    Process ``p`` passes rows ``[p·B/P, (p+1)·B/P)`` of the global batch ``B``.
    """
    nproc = jax.process_count()
    if batch_shards(mesh) % nproc:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: data*fsdp = {batch_shards(mesh)} must be a multiple of "
            f"the process count {nproc} so that each process feeds its own batch rows"
        )

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        global_rows = x.shape[0] * nproc
        check_batch_size(global_rows, mesh)
        return jax.make_array_from_process_local_data(
            batch_sharding(mesh, x.ndim), x, (global_rows, *x.shape[1:])
        )

    return jax.tree.map(one, local_batch)


def abstract_sharded(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    rules: Rules | Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
    *,
    args: Sequence[Any] = (),
) -> tuple[Any, Any]:
    """Shapes and shardings of what ``init_fn(*args)`` creates, without computing it.

    ``jax.eval_shape`` gives the abstract tree with its ``nn.Partitioned`` boxes; their
    logical names become shardings (:func:`logical_to_shardings`, with the divisibility
    fallback). ``init_fn`` may return params, a train state or optimiser state built from
    boxed params (optax keeps the boxes).

    Returns:
      ``(abstract, shardings)``: the unboxed tree of ``jax.ShapeDtypeStruct`` leaves that
      carry their sharding (a restore target), and the matching tree of ``NamedSharding``
      (for ``jit`` in/out shardings).
    """
    boxed = jax.eval_shape(init_fn, *args)
    shardings = logical_to_shardings(boxed, mesh, normalize_rules(rules))
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def init_sharded(init_fn: Callable[..., Any], shardings: Any, *, args: Sequence[Any] = ()) -> Any:
    """``init_fn(*args)`` unboxed and materialised directly in ``shardings`` (a jitted init
    with ``out_shardings``: each device computes its own shards only)."""

    def unboxed_init(*a: Any) -> Any:
        return nn.unbox(init_fn(*a))

    # No mesh/rules context: the out_shardings place every leaf, and Flax would otherwise
    # apply logical constraints while unboxing inside init (DenseGeneral's fail there).
    return jax.jit(unboxed_init, out_shardings=shardings)(*args)


def create_sharded(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    rules: Rules | Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
    *,
    args: Sequence[Any] = (),
) -> tuple[Any, Any]:
    """Create a (boxed) tree directly in its sharded layout: :func:`abstract_sharded` then
    :func:`init_sharded`.

    Returns:
      ``(tree, shardings)``: the unboxed tree and the matching tree of ``NamedSharding``.
    """
    _, shardings = abstract_sharded(init_fn, mesh, rules, args=args)
    return init_sharded(init_fn, shardings, args=args), shardings
