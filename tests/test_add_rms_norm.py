"""The fused residual add + RMSNorm: the kernel gives the reference's residual and normed rows (the residual exactly),
whatever the row count, width and dtype, and the model's layers give the same logits through it.

T tokens, D model width.
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
