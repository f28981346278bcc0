"""The Mosaic GPU weight-streaming matmul against the jnp reference: on CPU through Pallas' Mosaic GPU interpreter
(TMA copies, the pipeline's barriers, wgmma), lowered for CUDA at Llama-2-7B's decode shapes, and compiled on a GPU
(tests marked gpu)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.kernels.matmul_mgpu import (
    MatmulTuning,
    default_tuning,
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
    MatmulTuning(block_n=256, block_k=128, num_stages=2),
]


class TestInterpret:
    """Every case runs in the Mosaic GPU interpreter; the subclass below reruns them compiled on a GPU."""

    interpret = True

    # below, at and past a 16-row bucket; one full wgmma tile, just past it (two); four tiles with 64-column blocks
    @pytest.mark.parametrize("m", [1, 15, 16, 17, 64, 65, 200])
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
    cases = [(16, t) for t in (MatmulTuning(), MatmulTuning(k_splits=4), MatmulTuning(block_k=128, num_stages=3))]
    cases += [(m, default_tuning(m, k, n)) for m in (128, 256)]  # two and four wgmma row tiles
    for m, tuning in cases:
        if matmul_mgpu_unsupported_reason(sds((m, k), jnp.bfloat16), sds((k, n), jnp.bfloat16), tuning):
            continue
        fn = functools.partial(matmul_mgpu, tuning=tuning)
        text = jax.jit(fn).trace(sds((m, k), jnp.bfloat16), sds((k, n), jnp.bfloat16))
        assert "mosaic_gpu" in text.lower(lowering_platforms=("cuda",)).as_text()


# -- validation --------------------------------------------------------------------------------------------------------
def test_default_tuning_fills_the_sms():
    tunings = {name: default_tuning(16, k, n) for name, (k, n) in LLAMA2_7B.items()}
    assert {name: (t.block_n, t.k_splits) for name, t in tunings.items()} == {
        "qkv": (128, 2), "o": (128, 8), "gate_up": (128, 1), "down": (128, 4)}  # fmt: skip
    assert default_tuning(16, 64, 192).block_n == 64  # N = 3 x 64
    # past 128 rows the accumulator takes 64-column blocks (twice the programs: fewer splits) and 3 slots
    assert default_tuning(256, 4096, 4096) == MatmulTuning(block_n=64, k_splits=4, num_stages=3)
    x, w = make(256, 4096, 4096)
    assert matmul_mgpu_unsupported_reason(x, w, default_tuning(256, 4096, 4096)) is None


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
    assert "M = 257 > 256" in reason(jnp.zeros((257, 256), jnp.bfloat16), w)
    assert "192 padded rows x block_n = 128 overflow" in reason(jnp.zeros((129, 256), jnp.bfloat16), w)
    big = MatmulTuning(block_n=64, block_k=256, num_stages=4)
    assert "bytes of shared memory for 256 padded rows" in reason(jnp.zeros((256, 256), jnp.bfloat16), w, tuning=big)
    assert "N = 192 is not a multiple of block_n = 128" in reason(x, w[:, :192])
    assert "block_k * k_splits = 64 * 8" in matmul_mgpu_unsupported_reason(x, w, MatmulTuning(k_splits=8))
    assert "share a dtype" in reason(x.astype(jnp.float32), w.astype(jnp.float32))
    with pytest.raises(ValueError, match="cannot run these shapes: K of x"):
        matmul_mgpu(x, w[:128], interpret=True)
    with pytest.raises(ValueError, match=r"takes x \[M, K\] and w \[K, N\]"):
        matmul_mgpu(x[None], w, interpret=True)


# -- the model through the kernel (matmul_impl="mgpu") -----------------------------------------------------------------
def test_model_through_the_kernel_matches_xla_in_bf16():
    """A bf16 prefill with every weight matmul the kernel can tile on it (wo, w_gate_up, w_down of llama-gqa4; its
    wqkv is 96 columns wide, so XLA) gives XLA's logits up to bf16 rounding, and the kernel is in the graph."""
    from conftest import HF_FIXTURES, one_prompt_metadata

    from jpaged import LLM
    from jpaged.models import get_forward

    llm = LLM(str(HF_FIXTURES / "llama-gqa4"), dtype="bfloat16", max_model_len=128, skip_tokenizer_init=True)
    runner, page_size = llm.engine.runner, llm.engine.config.page_size
    n = 24
    tokens = jax.random.randint(jax.random.key(0), (n,), 1, llm.engine.model_config.vocab_size, jnp.int32)
    meta = one_prompt_metadata(n, page_size)
    args = (runner.params, tokens, jnp.arange(n, dtype=jnp.int32), runner.kv_pages, meta)
    logits = {}
    with jax.set_mesh(runner.mesh):
        for impl in ("xla", "mgpu"):
            forward = jax.jit(get_forward(llm.engine.model_config, matmul_impl=impl))
            kernels = len(re.findall(r"name=matmul_mgpu\b", str(forward.trace(*args).jaxpr)))  # its jitted calls
            assert kernels == (3 * llm.engine.model_config.num_layers if impl == "mgpu" else 0)
            logits[impl] = np.asarray(forward(*args)[0], np.float32)
    err = np.linalg.norm(logits["mgpu"] - logits["xla"]) / np.linalg.norm(logits["xla"])
    assert err < 1e-2, err
    assert (logits["mgpu"].argmax(-1) == logits["xla"].argmax(-1)).mean() >= 0.9


def test_auto_takes_the_kernel_only_where_it_measured_faster(monkeypatch):
    """matmul_impl="auto" on Hopper: the Mosaic GPU kernel, with its measured tuning, for Llama-2-7B's q/k/v at a
    128-row step and its down projection at 64; XLA for other projections and row counts (fewer rows pad to the same
    tile, but XLA measured faster there), float32, and off Hopper."""
    from jpaged.models import llama

    def kernels(m, k, n, dtype=jnp.bfloat16):
        sds = jax.ShapeDtypeStruct
        jaxpr = jax.jit(functools.partial(llama._matmul, impl="auto")).trace(sds((m, k), dtype), sds((k, n), dtype))
        return re.findall(r"matmul_mgpu_(bn\w+)", str(jaxpr.jaxpr))[:1]

    assert kernels(128, 4096, 12288) == []  # not on Hopper here
    monkeypatch.setattr(llama, "on_hopper", lambda: True)
    assert kernels(128, 4096, 12288) == [MatmulTuning(block_n=128, num_stages=6).name]
    assert kernels(100, 4096, 12288) == [] and kernels(16, 11008, 4096) == [] and kernels(32, 11008, 4096) == []
    assert kernels(64, 11008, 4096) == [MatmulTuning(block_n=128, k_splits=4).name]
    assert kernels(16, 4096, 12288) == [] and kernels(128, 4096, 4096) == [] and kernels(128, 11008, 4096) == []
    assert kernels(128, 4096, 12288, jnp.float32) == []
