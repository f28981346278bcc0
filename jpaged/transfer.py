"""A step's host arrays cross to the device as one buffer.

A step's inputs are ~25 small arrays (token rows, page tables, sampling parameters). Passed one by one, each is a
host-to-device transfer of its own: the jitted call converts each, and the device runs each copy in turn before the
step may start. `pack` concatenates them into one int32 buffer on the host (every field is 4 bytes wide) and
`unpack`, inside the jitted step, slices and bitcasts it back into the same pytree. The layout is static, so it
joins the compiled program's key without adding variants: it changes only with the padding bucket.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each leaf of a packed pytree sits in the buffer."""

    treedef: Any  # jax.tree_util.PyTreeDef (hashable; carries static fields such as decode_only)
    leaves: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype) of each leaf, in tree order


def pack(tree: Any) -> tuple[np.ndarray, Layout]:
    """One flat int32 buffer holding every (4-byte) numpy leaf of `tree`, and the layout to unpack it."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.ascontiguousarray(leaf) for leaf in leaves]
    for a in arrays:
        if a.dtype.itemsize != 4:
            raise TypeError(f"pack takes 4-byte leaves (int32, uint32, float32), got {a.dtype}")
    flat = [a.reshape(-1).view(np.int32) for a in arrays]
    buffer = np.concatenate(flat) if flat else np.zeros(0, np.int32)
    return buffer, Layout(treedef, tuple((a.shape, a.dtype.str) for a in arrays))


def unpack(buffer: jax.Array, layout: Layout) -> Any:
    """The pytree `pack` flattened, from its buffer (traced inside the jitted step)."""
    leaves, offset = [], 0
    for shape, dtype in layout.leaves:
        size = math.prod(shape)
        flat = jax.lax.bitcast_convert_type(buffer[offset : offset + size], jnp.dtype(dtype))
        leaves.append(flat.reshape(shape))
        offset += size
    return jax.tree.unflatten(layout.treedef, leaves)
