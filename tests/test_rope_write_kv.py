"""RoPE + KV write fused: q comes back rotated as XLA's rope rotates it, the written slots hold the rotated keys and the
values, every other slot is untouched, over page size x GQA ratio x token counts and randomly permuted pages.

T tokens, K kv-heads, G q-heads per kv-head, H head dim, P pages, S page size.
"""

from __future__ import annotations

import functools
import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_h200

from jpaged.kernels.rope_write_kv import (
    RopeWriteTuning,
    apply_rope,
    default_tuning,
    pallas_unsupported_reason,
    rope_write_kv,
    rope_write_kv_reference,
)

# jax 0.11.2 warns on every Triton lowering of a Pallas kernel; that backend is what this kernel is written for.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

ON_GPU = jax.default_backend() == "gpu"
# The package re-exports the function under the module's name, so fetch the module itself.
module = importlib.import_module("jpaged.kernels.rope_write_kv")


def inv_freq(head_dim: int) -> jax.Array:
    return 1.0 / (10000.0 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def make_step(rng, *, num_kv_heads, group, head_dim, page_size, num_tokens, num_pad=2, num_pages=None,
              dtype=jnp.bfloat16):  # fmt: skip
    """A step's fused q/k/v: num_tokens real tokens at distinct slots of randomly permuted pages (positions up to
    8k, so rope's angles are large), then num_pad padding tokens aimed at page 0 (the null page)."""
    num_pages = num_pages or 2 + -(-num_tokens // page_size) * 2
    real = rng.choice(np.arange(page_size, num_pages * page_size), num_tokens, replace=False)
    slots = np.concatenate([real, rng.integers(0, page_size, num_pad)]).astype(np.int32)
    t = num_tokens + num_pad
    qkv = rng.standard_normal((t, num_kv_heads, group + 2, head_dim))
    pages = rng.standard_normal((2, num_kv_heads, num_pages, page_size, head_dim))
    positions = rng.integers(0, 8192, t).astype(np.int32)
    return (jnp.asarray(qkv, dtype), jnp.asarray(positions), inv_freq(head_dim), jnp.asarray(pages[0], dtype),
            jnp.asarray(pages[1], dtype), jnp.asarray(slots))  # fmt: skip


def check(got, want, num_real, page_size, *, mismatched: float = 0.01) -> None:
    """q of the real tokens equal; pages equal outside page 0, which holds whatever a padding token wrote. On a GPU,
    at most one ulp apart in at most a `mismatched` fraction of elements."""
    (q, k_pages, v_pages), (q_want, k_want, v_want) = got, want
    assert q.shape == q_want.shape and q.dtype == q_want.dtype
    pairs = [(q[:num_real], q_want[:num_real]), (k_pages[:, 1:], k_want[:, 1:]), (v_pages[:, 1:], v_want[:, 1:])]
    for got_part, want_part in pairs:
        got_part, want_part = np.asarray(got_part, np.float32), np.asarray(want_part, np.float32)
        if not ON_GPU and q.dtype != jnp.float32:  # interpreted, it rounds where the reference does: equal
            np.testing.assert_array_equal(got_part, want_part)
            continue
        if q.dtype == jnp.float32:  # float32's products and sums: as many roundings, maybe fused differently
            np.testing.assert_allclose(got_part, want_part, rtol=1e-5, atol=1e-6)
            continue
        # Compiled, cos/sin from Triton's libm and XLA's may differ in float32's last bit; rounded to the dtype they
        # agree but for a rare tie, which moves an element by one ulp (of bf16: 2^-7 relative; the difference of two
        # such products is as far off in absolute terms).
        np.testing.assert_allclose(got_part, want_part, rtol=2**-7, atol=2**-7 * np.abs(want_part).max())
        assert np.mean(got_part != want_part) <= mismatched


@pytest.mark.parametrize("page_size", [8, 16])
@pytest.mark.parametrize(("num_kv_heads", "group"), [(2, 1), (2, 4), (1, 8)])
@pytest.mark.parametrize("length", ["1", "page-1", "page+1", "long"])
def test_kernel_matches_reference(page_size, num_kv_heads, group, length):
    """One decode token, a page +- 1, and 300 tokens (where `default_tuning` gives a program all its token's heads)."""
    num_tokens = {"1": 1, "page-1": page_size - 1, "page+1": page_size + 1, "long": 300}[length]
    rng = np.random.default_rng(page_size * 10_000 + num_kv_heads * 1000 + group * 100 + num_tokens)
    step = make_step(rng, num_kv_heads=num_kv_heads, group=group, head_dim=32, page_size=page_size,
                     num_tokens=num_tokens)  # fmt: skip
    got = rope_write_kv(*step, impl="pallas", interpret=not ON_GPU)
    check(got, rope_write_kv_reference(*step), num_tokens, page_size)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_implementation_agrees_at_llama_shapes(dtype):
    """Llama-2-7B's head dim and eight KV heads of four queries (Llama-3-8B's grouping); xla and the kernel."""
    step = make_step(np.random.default_rng(1), num_kv_heads=8, group=4, head_dim=128, page_size=16, num_tokens=5,
                     dtype=dtype)  # fmt: skip
    want = rope_write_kv_reference(*step)
    check(rope_write_kv(*step, impl="xla"), want, 5, 16)
    check(rope_write_kv(*step, impl="pallas", interpret=not ON_GPU), want, 5, 16)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_every_tuning_writes_the_same_pages(heads):
    """A program's KV heads (the grid's second axis) change who writes what, not what is written."""
    step = make_step(np.random.default_rng(heads), num_kv_heads=4, group=2, head_dim=16, page_size=8, num_tokens=6)
    tuning = RopeWriteTuning(kv_heads_per_program=heads, num_warps=2)
    check(rope_write_kv(*step, impl="pallas", tuning=tuning, interpret=not ON_GPU), rope_write_kv_reference(*step),
          6, 8)  # fmt: skip


def test_default_tuning_splits_heads_only_while_the_programs_are_few():
    assert default_tuning(1, 32).kv_heads_per_program == 1  # a decode token of Llama-2-7B: 32 programs
    assert default_tuning(16, 32).kv_heads_per_program == 2  # 256 programs
    assert default_tuning(128, 32).kv_heads_per_program == 16  # 256 programs: 128 would leave 4 of 132 SMs idle
    assert default_tuning(256, 32).kv_heads_per_program == 32  # a token a program
    assert default_tuning(4, 8).kv_heads_per_program == 1
    with pytest.raises(ValueError, match=r"kv_heads_per_program must be a power of two, got 3"):
        RopeWriteTuning(kv_heads_per_program=3)
    with pytest.raises(ValueError, match=r"num_warps must be a power of two in \[1, 32\], got 64"):
        RopeWriteTuning(kv_heads_per_program=1, num_warps=64)
    step = make_step(np.random.default_rng(9), num_kv_heads=2, group=1, head_dim=8, page_size=8, num_tokens=1)
    with pytest.raises(ValueError, match="kv_heads_per_program = 4 does not divide K = 2"):
        rope_write_kv(*step, impl="pallas", tuning=RopeWriteTuning(kv_heads_per_program=4), interpret=True)


def test_rope_is_hf_rotate_half():
    """apply_rope against the rotation spelled out in numpy: pair i with i + H/2, angle position * inv_freq[i]."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    positions = np.array([0, 5, 1000], np.int32)
    angle = positions[:, None].astype(np.float64) * np.asarray(inv_freq(8), np.float64)[None]  # [T, H/2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    lo, hi = x[..., :4], x[..., 4:]
    want = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq(8))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(got[0]), x[0])  # position 0 does not rotate


def test_auto_is_the_kernel_only_on_gpus_and_shapes_it_can_take(monkeypatch):
    calls = []
    kernel = module._rope_write_pallas
    monkeypatch.setattr(module, "_rope_write_pallas", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    step = make_step(np.random.default_rng(3), num_kv_heads=2, group=2, head_dim=16, page_size=8, num_tokens=3)
    rope_write_kv(*step)  # "auto" off GPU: XLA's rope and write_kv's own "auto"
    assert [c["interpret"] for c in calls] == ([False] if ON_GPU else [])
    monkeypatch.setattr(module, "on_gpu", lambda: True)
    calls.clear()
    got = rope_write_kv(*step, interpret=True)
    assert calls == [{"interpret": True, "tuning": default_tuning(5, 2)}]
    # Interpreted on a GPU, XLA fuses the kernel's ops its own way: one ulp off in 42% of elements (H200, measured).
    check(got, rope_write_kv_reference(*step), 3, 8, mismatched=1.0)
    qkv = jax.ShapeDtypeStruct((4, 40, 3, 128), jnp.bfloat16)  # Llama-2-13B: 40 KV heads
    assert pallas_unsupported_reason(qkv) == "K (kv heads) = 40 is not a power of two"
    assert pallas_unsupported_reason(jax.ShapeDtypeStruct((4, 8, 5, 128), jnp.bfloat16)) == (
        "G (q heads per kv head) = 3 is not a power of two"
    )
    assert pallas_unsupported_reason(jax.ShapeDtypeStruct((4, 8, 6, 128), jnp.bfloat16)) is None
    calls.clear()
    odd_group = make_step(np.random.default_rng(6), num_kv_heads=2, group=3, head_dim=16, page_size=8, num_tokens=3)
    check(rope_write_kv(*odd_group), rope_write_kv_reference(*odd_group), 3, 8)  # "auto" on a "GPU": unfused
    assert calls == []


def test_bad_inputs_are_refused_with_the_reason():
    qkv, positions, freqs, k_pages, v_pages, slots = make_step(np.random.default_rng(4), num_kv_heads=2, group=1,
                                                               head_dim=16, page_size=8, num_tokens=3)  # fmt: skip
    cases = [
        ((qkv[:, :, :2], positions, freqs, k_pages, v_pages, slots), r"qkv must be \[T, K, G \+ 2, H\]"),
        ((qkv, positions[:2], freqs, k_pages, v_pages, slots), r"positions must be \[T=5\] int32"),
        ((qkv, positions, freqs[:4], k_pages, v_pages, slots), r"inv_freq must be \[H/2=8\] float32"),
        ((qkv, positions, freqs, k_pages[:1], v_pages, slots), r"k_pages must be \[K=2, P, S, H=16\]"),
        ((qkv, positions, freqs, k_pages, v_pages[:, :3], slots), "v_pages"),
        ((qkv, positions, freqs, k_pages, v_pages, slots[:2]), r"slot_mapping must be \[T=5\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            rope_write_kv(*args)
    with pytest.raises(ValueError, match="impl must be one of"):
        rope_write_kv(qkv, positions, freqs, k_pages, v_pages, slots, impl="triton")
    if not ON_GPU:
        with pytest.raises(ValueError, match="needs a GPU"):
            rope_write_kv(qkv, positions, freqs, k_pages, v_pages, slots, impl="pallas")


@pytest.mark.parametrize(("num_tokens", "num_kv_heads", "group"), [(128, 32, 1), (1, 32, 1), (128, 8, 4), (128, 1, 8)])
def test_kernel_lowers_to_triton_for_an_h200(num_tokens, num_kv_heads, group):
    """The compiled kernel lowers for CUDA at Llama-2-7B's shapes (128 tokens, and one token: a head a program) and
    Llama-3-8B's, and at one KV head a device (Llama-3-8B at tp=8), over a pool that is no power of two, from any
    machine (an abstract H200 answers Triton's question of which GPU; the compile to PTX needs the GPU)."""
    qkv = jax.ShapeDtypeStruct((num_tokens, num_kv_heads, group + 2, 128), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
    freqs = jax.ShapeDtypeStruct((64,), jnp.float32)
    pages = jax.ShapeDtypeStruct((num_kv_heads, 3001, 16, 128), jnp.bfloat16)
    kernel = functools.partial(module._rope_write_pallas, tuning=default_tuning(num_tokens, num_kv_heads),
                               interpret=False)  # fmt: skip
    text = lower_for_h200(kernel, qkv, ints, freqs, pages, pages, ints)
    assert "rope_write_kv" in text and "triton" in text


@pytest.mark.parametrize(("attn_impl", "write_impl"), [("reference", "xla"), ("auto", "auto"), ("pallas", "auto")])
def test_the_model_writes_through_xla_only_on_the_reference_path(monkeypatch, attn_impl, write_impl):
    from jpaged.models import llama

    seen = []
    fused = llama.rope_write_kv
    monkeypatch.setattr(llama, "rope_write_kv", lambda *a, impl: seen.append(impl) or fused(*a, impl="xla"))
    monkeypatch.setattr(llama, "paged_attention", lambda q, *a, **k: q)
    qkv, positions, _, k_pages, v_pages, slots = make_step(np.random.default_rng(5), num_kv_heads=2, group=1,
                                                           head_dim=8, page_size=8, num_tokens=3)  # fmt: skip
    meta = types.SimpleNamespace(slot_mapping=slots, page_tables=None, seq_lens=None, cu_q_lens=None, num_seqs=None,
                                 decode_only=False)  # fmt: skip
    from jpaged.models.config import RopeConfig

    cfg = types.SimpleNamespace(sm_scale=1.0, sliding_window=None, head_dim=8, rope=RopeConfig())
    llama._write_and_attend(qkv, positions, k_pages, v_pages, meta, cfg=cfg, impl=attn_impl)
    assert seen == [write_impl]
