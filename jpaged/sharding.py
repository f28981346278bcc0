"""Everything about how arrays are laid out over devices lives here.

One mesh axis, `tp` (tensor parallel). Attention is split by heads: each device holds a slice of the query heads, the
KV heads they read and the matching slice of every KV page, so the paged-attention kernel runs with no communication
and only the output projection (`wo`) and the MLP's down projection all-reduce. When a model has fewer KV heads than
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
# Dimension legend as in models/llama.py: D model, N q-heads, K kv-heads, H head dim, F ffn, V vocab, E experts.
_SHARDED_DIM: dict[str, int] = {
    "wq": 1,  # [D, N, H]
    "wk": 1,  # [D, K, H]
    "wv": 1,  # [D, K, H]
    "wo": 0,  # [N, H, D]
    "w_gate": 1,  # [D, F]
    "w_up": 1,  # [D, F]
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
    """Wraps `fn(q, k, v, k_pages, v_pages, meta) -> (out, k_pages, v_pages)` to run per device on its own heads.

    Without a `tp` axis in the current mesh (`jax.set_mesh`), `fn` runs as it is.
    """

    def wrapped(q, k, v, k_pages, v_pages, meta):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or TP not in mesh.axis_names or mesh.shape[TP] == 1:
            return fn(q, k, v, k_pages, v_pages, meta)
        heads = P(None, TP, None)
        return jax.shard_map(
            fn,
            in_specs=(
                heads,  # q [T, N, H]: this device's query heads
                heads,  # k [T, K, H]: the new keys of the KV heads those query heads read
                heads,  # v [T, K, H]
                P(TP),  # k_pages [K, P, S, H]: the same KV heads' pages
                P(TP),  # v_pages
                P(),  # meta: every device sees the whole batch
            ),
            out_specs=(heads, P(TP), P(TP)),
            check_vma=False,
        )(q, k, v, k_pages, v_pages, meta)

    return wrapped
