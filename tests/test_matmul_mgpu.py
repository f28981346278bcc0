"""The Mosaic GPU weight-streaming matmul against the jnp reference: on CPU through Pallas' Mosaic GPU interpreter
(TMA copies, the pipeline's barriers, wgmma), lowered for CUDA at Llama-2-7B's decode shapes, and compiled on a GPU
(tests marked gpu)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.kernels.matmul_mgpu import (
    MatmulTuning,
    matmul_mgpu,
    matmul_mgpu_reference,
    matmul_mgpu_unsupported_reason,
)


def make(m, k, n, *, dtype=jnp.bfloat16, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / k**0.5).astype(dtype)
    return x, w


def check(x, w, tuning=None, *, interpret):
    out = matmul_mgpu(x, w, tuning=tuning, interpret=interpret)
    assert out.shape == (x.shape[0], w.shape[1]) and out.dtype == x.dtype
    want = np.asarray(matmul_mgpu_reference(x, w), np.float32)
    got = np.asarray(out, np.float32)
    assert np.isfinite(got).all()  # the interpreter fills unwritten SMEM with NaN
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


TUNINGS = [
    MatmulTuning(),
    MatmulTuning(k_splits=2, num_stages=2),  # float32 partial sums
    MatmulTuning(block_n=64, num_stages=2),
    MatmulTuning(block_n=256, block_k=128, num_stages=3),
]


class TestInterpret:
    """Every case runs in the Mosaic GPU interpreter; the subclass below reruns them compiled on a GPU."""

    interpret = True

    @pytest.mark.parametrize("m", [1, 15, 16, 17, 64])  # below, at and past a 16-row bucket; a full wgmma tile
    def test_rows(self, m):
        check(*make(m, 256, 256, seed=m), interpret=self.interpret)

    @pytest.mark.parametrize("tuning", TUNINGS, ids=lambda t: t.name)
    def test_tunings(self, tuning):
        check(*make(16, 512, 512, seed=3), tuning, interpret=self.interpret)

    def test_float16(self):
        check(*make(8, 256, 128, dtype=jnp.float16, seed=4), interpret=self.interpret)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
class TestGpu(TestInterpret):
    interpret = False


# -- lowering for CUDA on CPU (Mosaic GPU's Python passes; not ptxas) --------------------------------------------------
LLAMA2_7B = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


@pytest.mark.parametrize("projection", list(LLAMA2_7B))
def test_lowers_for_cuda(projection):
    k, n = LLAMA2_7B[projection]
    sds = jax.ShapeDtypeStruct
    for tuning in (MatmulTuning(), MatmulTuning(k_splits=4), MatmulTuning(block_k=128, num_stages=3)):
        if matmul_mgpu_unsupported_reason(sds((16, k), jnp.bfloat16), sds((k, n), jnp.bfloat16), tuning):
            continue
        fn = functools.partial(matmul_mgpu, tuning=tuning)
        text = jax.jit(fn).trace(sds((16, k), jnp.bfloat16), sds((k, n), jnp.bfloat16))
        assert "mosaic_gpu" in text.lower(lowering_platforms=("cuda",)).as_text()


# -- validation --------------------------------------------------------------------------------------------------------
def test_default_tuning_fills_the_sms():
    from jpaged.kernels.matmul_mgpu import default_tuning

    tunings = {name: default_tuning(k, n) for name, (k, n) in LLAMA2_7B.items()}
    assert {name: (t.block_n, t.k_splits) for name, t in tunings.items()} == {
        "qkv": (128, 2), "o": (128, 8), "gate_up": (128, 1), "down": (128, 4)}  # fmt: skip
    assert default_tuning(64, 192).block_n == 64  # N = 3 x 64


def test_tuning_rejects_bad_values():
    for bad in (dict(block_n=96), dict(block_n=512), dict(block_k=32), dict(num_stages=1), dict(k_splits=0),
                dict(k_splits=True)):  # fmt: skip
        with pytest.raises(ValueError, match="MatmulTuning"):
            MatmulTuning(**bad)
    assert MatmulTuning(k_splits=4).name == "bn128_bk64_st4_ks4"


def test_unsupported_shapes_are_named():
    x, w = make(16, 256, 256)
    reason = functools.partial(matmul_mgpu_unsupported_reason, tuning=MatmulTuning())
    assert reason(x, w) is None
    assert "M = 65 > 64" in reason(jnp.zeros((65, 256), jnp.bfloat16), w)
    assert "N = 192 is not a multiple of block_n = 128" in reason(x, w[:, :192])
    assert "block_k * k_splits = 64 * 8" in matmul_mgpu_unsupported_reason(x, w, MatmulTuning(k_splits=8))
    assert "share a dtype" in reason(x.astype(jnp.float32), w.astype(jnp.float32))
    with pytest.raises(ValueError, match="cannot run these shapes: K of x"):
        matmul_mgpu(x, w[:128], interpret=True)
    with pytest.raises(ValueError, match=r"takes x \[M, K\] and w \[K, N\]"):
        matmul_mgpu(x[None], w, interpret=True)
