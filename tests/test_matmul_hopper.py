"""JAX's persistent Hopper matmul behind jpaged's wrapper, against the jnp reference: on CPU through Pallas' Mosaic GPU
interpreter (warp-specialised pipeline, TMA copies, wgmma), lowered for CUDA at the tuned shape, compiled on a GPU
(tests marked gpu); and "auto" taking it only where it measured faster."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.kernels.matmul_hopper import (
    H200_FASTER_THAN_XLA,
    HopperTuning,
    MatmulDimension,
    default_tuning,
    matmul_hopper,
    matmul_hopper_reference,
    matmul_hopper_unsupported_reason,
    tuning_name,
)


def make(m, k, n, *, dtype=jnp.bfloat16, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / k**0.5).astype(dtype)
    return x, w


def check(x, w, tuning, *, interpret):
    out = matmul_hopper(x, w, tuning=tuning, interpret=interpret)
    assert out.shape == (x.shape[0], w.shape[1]) and out.dtype == x.dtype
    want = np.asarray(matmul_hopper_reference(x, w), np.float32)
    got = np.asarray(out, np.float32)
    assert np.isfinite(got).all()  # the interpreter fills unwritten SMEM with NaN
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


TUNED = H200_FASTER_THAN_XLA[(4096, 4096, 256)]
TUNINGS = [
    TUNED,  # the engine's: warpgroups side by side on N, 64 x 128 tiles, six slots
    HopperTuning(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, wg_dimension=MatmulDimension.M),
    HopperTuning(
        tile_m=64,
        tile_n=64,
        tile_k=128,
        max_concurrent_steps=2,
        wg_dimension=MatmulDimension.N,
        cluster_dimension=MatmulDimension.N,
    ),
]


class TestInterpret:
    """Every case runs in the Mosaic GPU interpreter (4 programs, so each loops over several output tiles); the
    subclass below reruns them compiled on a GPU (132 programs)."""

    interpret = True

    @pytest.mark.parametrize("tuning", TUNINGS, ids=tuning_name)
    def test_tunings(self, tuning):
        # 2 x 4 output tiles of 64 x 128 (M stacking: 128 x 64) for 4 programs; K over 4 pipeline steps
        check(*make(128, 256, 512, seed=1), tuning, interpret=self.interpret)

    def test_float16_and_one_row_tile(self):
        check(*make(64, 128, 128, dtype=jnp.float16, seed=2), default_tuning(64, 128, 128), interpret=self.interpret)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
class TestGpu(TestInterpret):
    interpret = False

    def test_the_tuned_shape(self):
        check(*make(256, 4096, 4096, seed=3), TUNED, interpret=False)


def test_lowers_for_cuda_at_the_tuned_shape():
    sds = jax.ShapeDtypeStruct
    (k, n, m), tuning = next(iter(H200_FASTER_THAN_XLA.items()))
    fn = functools.partial(matmul_hopper, tuning=tuning)
    text = jax.jit(fn).trace(sds((m, k), jnp.bfloat16), sds((k, n), jnp.bfloat16))
    assert "mosaic_gpu" in text.lower(lowering_platforms=("cuda",)).as_text()


def test_unsupported_shapes_are_named():
    x, w = make(128, 256, 512)
    reason = functools.partial(matmul_hopper_unsupported_reason, tuning=TUNED)
    assert reason(x, w) is None
    assert "is not a whole number of 64 x 128 output tiles" in reason(x[:100], w)
    assert "64 x 128 output tiles" in reason(x, w[:, :192])
    assert "K = 200 is not a multiple of tile_k = 64" in reason(x[:, :200], w[:200])
    assert "share a dtype" in reason(x.astype(jnp.float32), w.astype(jnp.float32))
    wide = HopperTuning(tile_m=128, tile_n=256, tile_k=64, max_concurrent_steps=2)
    assert "overflows a warpgroup's registers" in matmul_hopper_unsupported_reason(x, w, wide)
    deep = HopperTuning(tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=6)
    assert "bytes of shared memory" in matmul_hopper_unsupported_reason(x, w, deep)
    with pytest.raises(ValueError, match="cannot run these shapes: K of x"):
        matmul_hopper(x, w[:128], tuning=TUNED, interpret=True)
    with pytest.raises(ValueError, match=r"takes x \[M, K\] and w \[K, N\]"):
        matmul_hopper(x[None], w, tuning=TUNED, interpret=True)


def test_auto_takes_the_kernel_only_where_it_measured_faster(monkeypatch):
    """matmul_impl="auto" on Hopper: JAX's kernel for Llama-2-7B's o projection at a 256-row step; XLA (or jpaged's
    Mosaic GPU kernel, its own table) elsewhere, in float32, and off Hopper."""
    from jpaged.models import llama

    def kernels(m, k, n, dtype=jnp.bfloat16):
        sds = jax.ShapeDtypeStruct
        jaxpr = jax.jit(functools.partial(llama._matmul, impl="auto")).trace(sds((m, k), dtype), sds((k, n), dtype))
        return re.findall(r"matmul_(hopper|mgpu)_", str(jaxpr.jaxpr))[:1]

    assert kernels(256, 4096, 4096) == []  # not on Hopper here
    monkeypatch.setattr(llama, "on_hopper", lambda: True)
    assert kernels(256, 4096, 4096) == ["hopper"]
    assert kernels(128, 4096, 4096) == [] and kernels(256, 4096, 12288) == []
    assert kernels(128, 4096, 12288) == ["mgpu"]  # jpaged's kernel keeps its shapes
    assert kernels(256, 4096, 4096, jnp.float32) == []
