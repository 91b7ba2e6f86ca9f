"""Bank parallelism: the DSC contraction over a bank whose atoms are split across devices.

The raw banks ``U, V: [M, d]`` are sharded along ``M`` (the ``bases`` logical axis) over one
mesh axis, ``axis_name``, of size ``D``; atom ``j`` and its two rows ``u_j, v_j`` live on
shard ``j // (M / D)``. Because both rows of an atom live together, each term
``ẑ_nk (x_n·u_{i_nk}) v_{i_nk}`` of the sum is computed where its atom lives, and one
collective sums the shards' partial outputs:

1. the tokens of the ``D`` devices along the axis, with their ``[N, K]`` picks and gates, are
   all-gathered (``d + 2K`` values per token);
2. every device contracts all of them against its own ``M / D`` atoms, with the gates of the
   picks it does not own set to zero (:func:`dsc_jax.layers.dsc_contract.contract_raw_banks`,
   the same gather path and custom derivative rules as the unsharded layer);
3. a reduce-scatter (``psum_scatter``) sums the partial outputs and hands each device its own
   tokens back (``d`` values per token).

Per token that is ``2·d·(D−1)/D`` floats each way, what a tensor-parallel MLP pays, and it
does not grow with ``M`` or ``K``. The alternative, sending each pick's two rows to the
token's device (an all-to-all of the picked rows), moves ``2·K·d`` floats per token, ``K``
times more. The cost of the chosen form is compute: every device gathers ``K`` rows for each
of the ``D·N`` tokens of its group (most of them masked), i.e. ``D`` times the gather work of
a replicated bank, which is small next to the FFN's ``2·d·H`` per token at the sizes the
bank is meant for. The reverse pass is the transpose: all-gather of the output gradient,
local scatter-add into the shard, reduce-scatter of the input gradient. No device ever
holds more than its ``M / D`` rows of either bank (checked from the compiled program's
memory analysis in the tests).

When the token count is not a multiple of ``D`` the tokens are kept whole on every device
of the axis and the partial outputs are summed with a ``psum`` instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsc_jax.layers.dsc_contract import contract_raw_banks


def bank_shards(axis_name: str) -> int:
    """Number of devices along mesh axis ``axis_name`` of the active mesh (``jax.set_mesh``).

    Raises:
      ValueError: no mesh is active, or it has no axis ``axis_name``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            f"bank_axis={axis_name!r} shards the bank over a mesh axis, but no mesh is active; "
            "call the layer under `with jax.set_mesh(mesh):` (or set bank_axis=None)."
        )
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"bank_axis={axis_name!r} is not an axis of the active mesh {mesh.axis_names}; "
            "choose one of them (or bank_axis=None)."
        )
    return mesh.shape[axis_name]


def contract_sharded_banks(
    x: jax.Array,
    bank_u: jax.Array,
    bank_v: jax.Array,
    indices: jax.Array,
    gates: jax.Array,
    eps: float,
    *,
    axis_name: str,
) -> jax.Array:
    """``((x U_Iᵀ) ⊙ ẑ) V_I`` with unit rows, the banks sharded along ``M`` over ``axis_name``.

    The same values (up to float32 summation order) and derivatives as
    :func:`~dsc_jax.layers.dsc_contract.contract_raw_banks`; call it inside ``jax.jit`` under
    the mesh. Only ``axis_name`` is manual (``jax.shard_map(..., axis_names={axis_name})``);
    the other mesh axes (data, FSDP) stay under the compiler's automatic partitioning.

    Args:
      x: ``[N, d]`` tokens in the compute dtype.
      bank_u, bank_v: raw banks ``[M, d]``; ``M`` a multiple of the axis size.
      indices: ``[N, K]`` int32 global atom ids in ``[0, M)``.
      gates: ``[N, K]`` coefficients ``ẑ``.
      eps: the row-normalisation floor.
      axis_name: the mesh axis that splits the bank.

    Returns:
      ``[N, d]`` in ``x.dtype``.
    """
    shards = bank_shards(axis_name)
    num_bases = bank_u.shape[0]
    if num_bases % shards:
        raise ValueError(
            f"num_bases={num_bases} is not a multiple of the {shards} devices of mesh axis "
            f"{axis_name!r}; choose num_bases divisible by {shards}."
        )
    tokens_split = isinstance(x.shape[0], int) and x.shape[0] % shards == 0
    tokens = P(axis_name) if tokens_split else P()

    def local(x, bank_u, bank_v, indices, gates):
        if tokens_split:
            x, indices, gates = (
                jax.lax.all_gather(a, axis_name, axis=0, tiled=True) for a in (x, indices, gates)
            )
        rows = bank_u.shape[0]
        local_ids = indices - jax.lax.axis_index(axis_name) * rows
        mine = (local_ids >= 0) & (local_ids < rows)
        partial = contract_raw_banks(
            x,
            bank_u,
            bank_v,
            jnp.where(mine, local_ids, 0),
            jnp.where(mine, gates, jnp.zeros_like(gates)),
            eps,
        )
        if tokens_split:
            return jax.lax.psum_scatter(partial, axis_name, scatter_dimension=0, tiled=True)
        return jax.lax.psum(partial, axis_name)

    bank = P(axis_name, None)
    return jax.shard_map(
        local,
        in_specs=(tokens, bank, bank, tokens, tokens),
        out_specs=tokens,
        axis_names={axis_name},
    )(x, bank_u, bank_v, indices, gates)
