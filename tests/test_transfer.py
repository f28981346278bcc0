import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import transfer
from jpaged.models.metadata import AttentionMetadata


def test_pack_round_trips_a_pytree_with_static_fields_inside_jit() -> None:
    rng = np.random.default_rng(0)
    tree = {
        "ids": rng.integers(-5, 5, (3, 4)).astype(np.int32),
        "temps": rng.random(5).astype(np.float32),
        "seeds": np.array([0, 2**32 - 1], np.uint32),
        "empty": np.zeros((0, 7), np.int32),
        "scalar": np.float32(-np.inf),
        "meta": AttentionMetadata(*(np.arange(n, dtype=np.int32) for n in (1, 2, 3, 4, 5, 6)), decode_only=True),
    }
    buffer, layout = transfer.pack(tree)
    # every leaf on a 256-byte boundary (Mosaic GPU kernels refuse unaligned operands): 11 leaves, the empty one
    # taking no room, the others 64 int32 each
    assert buffer.dtype == np.int32 and buffer.shape == (10 * 64,)
    assert all(offset % 64 == 0 for offset, _, _ in layout.leaves)
    out = jax.jit(transfer.unpack, static_argnames="layout")(jnp.asarray(buffer), layout=layout)
    assert out["meta"].decode_only is True
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(np.asarray(b), a)
    # equal (and equally hashed) layouts for equal shapes: a new batch of the same bucket reuses the compiled step
    again = transfer.pack(jax.tree.map(lambda x: x + 1, tree))[1]
    assert again == layout and hash(again) == hash(layout)


def test_pack_refuses_leaves_that_are_not_four_bytes_wide() -> None:
    with pytest.raises(TypeError, match="4-byte"):
        transfer.pack({"a": np.zeros(3, np.int64)})
