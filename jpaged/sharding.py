"""Everything about how arrays are laid out over devices lives here.

One mesh axis, `tp` (tensor parallel). Attention is split by heads: each device holds a slice of the query heads, the
KV heads they read and the matching slice of every KV page, so the paged-attention kernel runs with no communication
and only the output projection (`wo`) and the MLP's down projection all-reduce. The fused q/k/v weight is laid out
per KV head ([D, K, G + 2, H]: a KV head's G query heads, its key, its value), so splitting it on K hands every
device whole attention groups; the fused gate/up weight ([D, 2, F]) splits on F. When a model has fewer KV heads than
devices, the loader repeats each KV head (`replicate_kv_heads`) so every device still owns whole heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

TP = "tp"

# The dimension of each parameter that is split across `tp`; parameters not named here (norms, embeddings, the MoE
# router and experts for now) are replicated.
# Dimension legend as in models/llama.py: D model, N q-heads, K kv-heads, G = N / K, H head dim, F ffn, V vocab,
# E experts.
_SHARDED_DIM: dict[str, int] = {
    "wqkv": 1,  # [D, K, G + 2, H]
    "wo": 0,  # [N, H, D]
    "w_gate_up": 2,  # [D, 2, F]
    "w_down": 0,  # [F, D]
    "lm_head": 0,  # [V, D]
}


def make_mesh(tensor_parallel_size: int) -> Mesh:
    devices = jax.devices()
    if not 1 <= tensor_parallel_size <= len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} but {len(devices)} {devices[0].platform} device(s) "
            "are visible (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices)"
        )
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP,), axis_types=(AxisType.Auto,))


def check_model_fits(num_heads: int, num_kv_heads: int, tp: int) -> None:
    if num_heads % tp:
        raise ValueError(f"num_attention_heads ({num_heads}) must be divisible by tensor_parallel_size ({tp})")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads ({num_kv_heads}) and tensor_parallel_size ({tp}) must divide one another"
        )


def kv_heads_per_pool(num_kv_heads: int, tp: int) -> int:
    """KV heads stored in the page pool: the model's own, or `tp` when each must be repeated onto several devices."""
    return max(num_kv_heads, tp)


# The layer projections by role: column-parallel weights split on an output dimension (this one), row-parallel ones
# on their first, contracted, dimension (their outputs are summed over devices).
COLUMN_PARALLEL: dict[str, int] = {name: _SHARDED_DIM[name] for name in ("wqkv", "w_gate_up")}
ROW_PARALLEL = frozenset({"wo", "w_down"})  # each split on dimension 0 in _SHARDED_DIM


def param_spec(path: tuple[Any, ...], leaf: Any, tp: int) -> P:
    name = str(getattr(path[-1], "key", path[-1]))
    dim = _SHARDED_DIM.get(name)
    if dim is None or tp == 1 or leaf.shape[dim] % tp:
        return P()
    spec: list[str | None] = [None] * leaf.ndim
    spec[dim] = TP
    return P(*spec)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    tp = mesh.shape[TP]
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, param_spec(p, x, tp)), params)


def kv_pages_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(TP))  # [K, P, S, H]: split on KV heads


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def over_kv_heads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `fn(qkv, positions, k_pages, v_pages, meta) -> (out, k_pages, v_pages)` to run per device on its own
    heads.

    Without a `tp` axis in the current mesh (`jax.set_mesh`), `fn` runs as it is.
    """

    def wrapped(qkv, positions, k_pages, v_pages, meta):
        if _tp_size() == 1:
            return fn(qkv, positions, k_pages, v_pages, meta)
        return jax.shard_map(
            fn,
            in_specs=(
                P(None, TP, None, None),  # qkv [T, K, G + 2, H]: this device's KV heads, their queries, keys, values
                P(),  # positions [T]
                P(TP),  # k_pages [K, P, S, H]: the same KV heads' pages
                P(TP),  # v_pages
                P(),  # meta: every device sees the whole batch
            ),
            out_specs=(P(None, TP, None), P(TP), P(TP)),  # out [T, N, H]: this device's query heads
            check_vma=False,
        )(qkv, positions, k_pages, v_pages, meta)

    return wrapped


def _tp_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or TP not in mesh.axis_names else mesh.shape[TP]


def on_every_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `fn` of replicated arrays (a kernel XLA cannot partition) to run whole on every device, as it is without a
    `tp` axis in the current mesh."""

    def wrapped(*args: Any) -> Any:
        if _tp_size() == 1:
            return fn(*args)
        return jax.shard_map(fn, in_specs=P(), out_specs=P(), check_vma=False)(*args)

    return wrapped


def column_parallel(fn: Callable[[jax.Array, jax.Array], jax.Array], w_dim: int) -> Callable[..., jax.Array]:
    """Wraps `fn(x [T, I], w) -> [T, ...]` (a projection whose weight is split on its dimension `w_dim`, an output
    dimension) to run per device on its slice of w, giving its slice of the output (on output dimension w_dim).

    Per device, so `fn` may reshape its local w freely (a kernel wants it 2-D). Without a `tp` axis in the current
    mesh, `fn` runs as it is.
    """

    def wrapped(x: jax.Array, w: jax.Array) -> jax.Array:
        tp = _tp_size()
        if tp == 1 or w.shape[w_dim] % tp:  # param_spec replicates a weight that does not split evenly
            return fn(x, w)
        w_spec: list[str | None] = [None] * w.ndim
        w_spec[w_dim] = TP
        # out is [T, *w.shape[1:]]: w's dimension d >= 1 is out's dimension d
        out_spec: list[str | None] = [None] * w.ndim
        out_spec[w_dim] = TP
        return jax.shard_map(fn, in_specs=(P(), P(*w_spec)), out_specs=P(*out_spec), check_vma=False)(x, w)

    return wrapped


def row_parallel(fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable[..., jax.Array]:
    """Wraps `fn(x [T, I...], w [I..., O]) -> [T, O]` (a projection contracting over a split dimension: x split on
    its dimension 1, w on its dimension 0) to run per device on its slices, then sum the partial outputs."""

    def wrapped(x: jax.Array, w: jax.Array) -> jax.Array:
        tp = _tp_size()
        if tp == 1 or w.shape[0] % tp:  # param_spec replicates a weight that does not split evenly
            return fn(x, w)

        def local(x: jax.Array, w: jax.Array) -> jax.Array:
            return jax.lax.psum(fn(x, w), TP)

        return jax.shard_map(local, in_specs=(P(None, TP), P(TP)), out_specs=P(), check_vma=False)(x, w)

    return wrapped
