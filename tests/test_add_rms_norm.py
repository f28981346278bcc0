"""The fused residual add + RMSNorm: the kernel gives the reference's residual and normed rows (the residual exactly),
whatever the row count, width and dtype, also when it adds a projection's split-K partial sums itself, and the model's
layers give the same logits through it.

T tokens, D model width, S partial sums.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_h200

from jpaged.kernels.add_rms_norm import (
    AddRmsNormTuning,
    add_rms_norm,
    add_rms_norm_reference,
    default_tuning,
    pallas_unsupported_reason,
    rms_norm,
)

# jax 0.11.2 warns on every Triton lowering of a Pallas kernel; that backend is what this kernel is written for.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

ON_GPU = jax.default_backend() == "gpu"
# The package re-exports the function under the module's name, so fetch the module itself.
module = importlib.import_module("jpaged.kernels.add_rms_norm")


def rows(seed: int, num_tokens: int, width: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, width)) * 4  # a residual stream larger than what is added to it
    delta = rng.standard_normal((num_tokens, width))
    weight = 1 + 0.1 * rng.standard_normal(width)
    return jnp.asarray(x, dtype), jnp.asarray(delta, dtype), jnp.asarray(weight, dtype)


def close(got, want) -> None:
    """Interpreted, the kernel is the reference op by op: equal. Compiled, the float32 sum of squares adds in another
    order, which can flip a rounding of the normalised row: at most one bf16 ulp, in few elements."""
    if got.dtype == jnp.float32:  # the mean of squares adds in another order: float32's last bits
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        return
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not ON_GPU:
        np.testing.assert_array_equal(got, want)
        return
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)
    assert np.mean(got != want) <= 0.01


@pytest.mark.parametrize("num_tokens", [1, 7, 128, 300])
@pytest.mark.parametrize(("width", "dtype"), [(64, jnp.float32), (128, jnp.bfloat16), (4096, jnp.bfloat16)])
def test_kernel_matches_reference(num_tokens, width, dtype):
    x, delta, weight = rows(num_tokens * width, num_tokens, width, dtype)
    residual, normed = add_rms_norm(x, delta, weight, eps=1e-5, impl="pallas", interpret=not ON_GPU)
    want_residual, want_normed = add_rms_norm_reference(x, delta, weight, 1e-5)
    assert residual.dtype == x.dtype and normed.dtype == x.dtype and normed.shape == (num_tokens, width)
    np.testing.assert_array_equal(np.asarray(residual, np.float32), np.asarray(want_residual, np.float32))
    close(normed, want_normed)


def partial_sums(seed: int, splits: int, num_tokens: int, width: int) -> jax.Array:
    """[S, T, D] float32: what `llama.split_partials` gives for a delta of rows()'s scale."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((splits, num_tokens, width)) / splits**0.5, jnp.float32)


@pytest.mark.parametrize("num_tokens", [1, 7, 128])
@pytest.mark.parametrize("splits", [2, 8])
@pytest.mark.parametrize(("width", "dtype"), [(64, jnp.float32), (4096, jnp.bfloat16)])
def test_kernel_adds_partial_sums(num_tokens, splits, width, dtype):
    """delta as S float32 partial sums: added in float32 and rounded once to x's dtype, then as a [T, D] delta."""
    x, _, weight = rows(num_tokens + splits, num_tokens, width, dtype)
    partials = partial_sums(num_tokens * splits, splits, num_tokens, width)
    residual, normed = add_rms_norm(x, partials, weight, eps=1e-5, impl="pallas", interpret=not ON_GPU)
    assert residual.shape == normed.shape == x.shape and residual.dtype == normed.dtype == x.dtype
    delta = np.asarray(partials, np.float64).sum(0)
    assert not np.allclose(delta, np.asarray(partials[0]), atol=0.1)  # every split counts
    # Two roundings to x's dtype (the sum, then the residual), each within half an ulp of what it rounds. Not
    # compared bit for bit with the reference: XLA may keep the sum unrounded inside a fusion (excess precision;
    # the interpreter runs the kernel through XLA too), which moves the residual by up to an ulp of delta.
    want_residual, _ = add_rms_norm_reference(x, partials, weight, 1e-5)
    x64, ulp = np.asarray(x, np.float64), 2.0 ** (-8 if dtype == jnp.bfloat16 else -24)
    bound = ulp * (np.abs(x64) + 2 * np.abs(delta)) + 1e-6
    for got in (residual, want_residual):
        assert np.all(np.abs(np.asarray(got, np.float64) - (x64 + delta)) <= bound)
    close(normed, rms_norm(residual, weight, 1e-5))  # the norm of the residual it gave


def test_partial_sums_are_checked():
    x, _, weight = rows(5, 3, 64, jnp.bfloat16)
    partials = partial_sums(5, 4, 3, 64)
    with pytest.raises(ValueError, match=r"partial sums \(4, 3, 64\) bfloat16 must be \[S, 3, 64\] float32"):
        add_rms_norm(x, partials.astype(jnp.bfloat16), weight, eps=1e-5)
    with pytest.raises(ValueError, match=r"must be \[S, 3, 64\] float32"):
        add_rms_norm(x, partials[:, :2], weight, eps=1e-5)
    assert pallas_unsupported_reason(x, partials) is None
    assert pallas_unsupported_reason(x, partial_sums(5, 3, 3, 64)) == (
        "S = 3 partial sums is not a power of two (a Triton block's side)"
    )


def test_reference_is_hf_rms_norm():
    """Against the formula spelled out in numpy: float32 mean of squares, rounded to bf16, then scaled."""
    x, delta, weight = rows(0, 3, 64, jnp.bfloat16)
    residual, normed = add_rms_norm_reference(x, delta, weight, 1e-6)
    s = (np.asarray(x, np.float32) + np.asarray(delta, np.float32)).astype(jnp.bfloat16).astype(np.float32)
    n = (s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(residual, np.float32), s)
    # numpy's float32 mean adds in its own order: a bf16 rounding of the normalised row may flip
    want = (np.asarray(weight, np.float32) * n).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_allclose(np.asarray(normed, np.float32), want, rtol=2**-7)
    assert np.mean(np.asarray(normed, np.float32) != want) <= 0.01


@pytest.mark.parametrize("num_warps", [1, 2, 8])
def test_every_tuning_gives_the_same_rows(num_warps):
    x, delta, weight = rows(1, 5, 256, jnp.bfloat16)
    tuning = AddRmsNormTuning(num_warps=num_warps)
    got = add_rms_norm(x, delta, weight, eps=1e-5, impl="pallas", tuning=tuning, interpret=not ON_GPU)
    want = add_rms_norm_reference(x, delta, weight, 1e-5)
    for g, w in zip(got, want, strict=True):
        close(g, w)


def test_auto_is_the_kernel_only_on_gpus_and_widths_a_triton_block_can_hold(monkeypatch):
    calls = []
    kernel = module._add_rms_norm_pallas
    monkeypatch.setattr(module, "_add_rms_norm_pallas", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    x, delta, weight = rows(2, 3, 64, jnp.float32)
    add_rms_norm(x, delta, weight, eps=1e-5)
    assert len(calls) == int(ON_GPU)  # off GPU: XLA
    monkeypatch.setattr(module, "on_gpu", lambda: True)
    calls.clear()
    wide = rows(2, 3, 80, jnp.float32)
    assert pallas_unsupported_reason(wide[0]) == "D = 80 is not a power of two (a Triton block's side)"
    want = jax.jit(lambda x, d, w: add_rms_norm_reference(x, d, w, 1e-5))(*wide)  # the XLA path, as XLA fuses it
    for g, w in zip(add_rms_norm(*wide, eps=1e-5), want, strict=True):  # "auto" on a "GPU": 80 wide takes XLA
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert calls == []
    add_rms_norm(x, delta, weight, eps=1e-5, interpret=True)  # 64 wide takes the kernel
    assert calls == [{"eps": 1e-5, "tuning": default_tuning(64), "interpret": True}]


def test_bad_inputs_are_refused_with_the_reason():
    x, delta, weight = rows(3, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match=r"x must be \[T, D\]"):
        add_rms_norm(x[None], delta[None], weight, eps=1e-5)
    with pytest.raises(ValueError, match="must match x"):
        add_rms_norm(x, delta.astype(jnp.bfloat16), weight, eps=1e-5)
    with pytest.raises(ValueError, match=r"weight must be \[D=64\]"):
        add_rms_norm(x, delta, weight[:32], eps=1e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        add_rms_norm(x, delta, weight, eps=1e-5, impl="triton")
    with pytest.raises(ValueError, match="num_warps"):
        AddRmsNormTuning(num_warps=3)
    if not ON_GPU:
        with pytest.raises(ValueError, match="needs a GPU"):
            add_rms_norm(x, delta, weight, eps=1e-5, impl="pallas")
    assert default_tuning(4096).num_warps == 8 and default_tuning(64).num_warps == 1


def test_kernel_lowers_to_triton_for_an_h200():
    """The compiled kernel lowers for CUDA at Llama-2-7B's width and 8192 rows from any machine (an abstract H200
    answers Triton's question of which GPU; the compile to PTX needs the GPU)."""
    x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
    kernel = functools.partial(module._add_rms_norm_pallas, eps=1e-5, tuning=default_tuning(4096), interpret=False)
    text = lower_for_h200(kernel, x, x, weight)
    assert "add_rms_norm" in text and "triton" in text
    # and adding the down projection's partial sums at a 256-row decode step
    text = lower_for_h200(kernel, x, jax.ShapeDtypeStruct((8, 256, 4096), jnp.float32), weight)
    assert "add_rms_norm" in text and "triton" in text


def test_model_leaves_split_partials_to_the_kernel(monkeypatch):
    """With H200_SPLIT_PARTIALS naming a layer's output and down projections, a bf16 prefill runs them as split-K
    partial sums that the add + norm (kernel or XLA) adds, and gives the logits of the plain projections up to bf16
    rounding; under matmul_impl "xla", and off Hopper, the table is not read."""
    from conftest import HF_FIXTURES, one_prompt_metadata

    from jpaged import LLM
    from jpaged.models import get_forward, llama

    llm = LLM(str(HF_FIXTURES / "llama-gqa4"), dtype="bfloat16", max_model_len=128, skip_tokenizer_init=True)
    runner, cfg = llm.engine.runner, llm.engine.model_config
    n = 24
    tokens = jax.random.randint(jax.random.key(0), (n,), 1, cfg.vocab_size, jnp.int32)
    args = (runner.params, tokens, jnp.arange(n, dtype=jnp.int32), runner.kv_pages, one_prompt_metadata(n, 16))
    calls = []
    split = llama.split_partials

    def counted(x, w, splits):
        calls.append((*x.shape, w.shape[1], splits))
        return split(x, w, splits)

    monkeypatch.setattr(llama, "split_partials", counted)

    def logits(matmul_impl: str, norm_impl: str) -> np.ndarray:
        calls.clear()
        with jax.set_mesh(runner.mesh):
            forward = get_forward(cfg, matmul_impl=matmul_impl, norm_impl=norm_impl)
            return np.asarray(forward(*args)[0], np.float32)

    plain = logits("auto", "xla")
    monkeypatch.setattr(llama, "H200_SPLIT_PARTIALS", {(cfg.num_heads * cfg.head_dim, cfg.hidden_size, n): 4,
                                                       (cfg.intermediate_size, cfg.hidden_size, n): 2})  # fmt: skip
    logits("auto", "xla")
    assert calls == []  # not on Hopper
    monkeypatch.setattr(llama, "on_hopper", lambda: True)
    for norm_impl in ("xla", "pallas"):
        got = logits("auto", norm_impl)
        assert calls == [(n, 64, 64, 4), (n, 128, 64, 2)] * cfg.num_layers
        err = np.linalg.norm(got - plain) / np.linalg.norm(plain)
        assert err < 1e-2, (norm_impl, err)
        assert (got.argmax(-1) == plain.argmax(-1)).mean() >= 0.9
    logits("xla", "xla")
    assert calls == []
