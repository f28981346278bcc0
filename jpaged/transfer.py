"""A step's host arrays cross to the device as one buffer.

A step's inputs are ~25 small arrays (token rows, page tables, sampling parameters). Passed one by one, each is a
host-to-device transfer of its own: the jitted call converts each, and the device runs each copy in turn before the
step may start. `pack` concatenates them into one int32 buffer on the host (every field is 4 bytes wide) and
`unpack`, inside the jitted step, slices and bitcasts it back into the same pytree. The layout is static and joins
the compiled program's key without adding variants: it follows the shapes, which only the padding bucket and the
step's static switches (penalty history, logit-bias width, prompt logprobs) change.

Each leaf starts on a 256-byte boundary: XLA may hand a kernel a slice of the buffer as a view rather than a copy,
and Mosaic GPU kernels refuse operands that are not 256-byte aligned (on the H200, an unaligned page-table slice
failed the warm-up of some buckets).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ALIGN = 64  # int32 elements: 256 bytes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each leaf of a packed pytree sits in the buffer."""

    treedef: Any  # jax.tree_util.PyTreeDef (hashable; carries static fields such as decode_only)
    leaves: tuple[tuple[int, tuple[int, ...], str], ...]  # (offset, shape, dtype) of each leaf, in tree order


def pack(tree: Any) -> tuple[np.ndarray, Layout]:
    """One flat int32 buffer holding every (4-byte) numpy leaf of `tree`, and the layout to unpack it."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.asarray(leaf, order="C") for leaf in leaves]  # (ascontiguousarray makes a scalar 1-D)
    for a in arrays:
        if a.dtype.itemsize != 4:
            raise TypeError(f"pack takes 4-byte leaves (int32, uint32, float32), got {a.dtype}")
    offsets, end = [], 0
    for a in arrays:
        offsets.append(end)
        end += -(-a.size // _ALIGN) * _ALIGN
    buffer = np.zeros(end, np.int32)
    for a, offset in zip(arrays, offsets, strict=True):
        buffer[offset : offset + a.size] = a.reshape(-1).view(np.int32)
    return buffer, Layout(treedef, tuple((o, a.shape, a.dtype.str) for o, a in zip(offsets, arrays, strict=True)))


def unpack(buffer: jax.Array, layout: Layout) -> Any:
    """The pytree `pack` flattened, from its buffer (traced inside the jitted step)."""
    leaves = []
    for offset, shape, dtype in layout.leaves:
        flat = jax.lax.bitcast_convert_type(buffer[offset : offset + math.prod(shape)], jnp.dtype(dtype))
        leaves.append(flat.reshape(shape))
    return jax.tree.unflatten(layout.treedef, leaves)
