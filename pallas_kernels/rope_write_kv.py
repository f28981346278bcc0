"""Rotary embedding of a step's fused q/k/v, and the write of its K/V into the paged cache, in one kernel.

T tokens, K kv-heads, G = q-heads per kv-head, H head dim, P pages, S page size.

Contract: qkv [T, K, G + 2, H] is the fused projection (per KV head: its G queries, its key, its value; see
models/llama.py). Returns q = rope(qkv[:, :, :G]) [T, K, G, H] and the pages with token t's rope(key) and value in
slot slot_mapping[t] (= page * S + offset) of every KV head, as `write_kv` does (padding tokens aim at page 0, the
null page). `apply_rope` is HF's rotate-half RoPE, rounded as XLA rounds it (each product, then the sum, in the
input's dtype).

Why. Unfused, a layer takes four launches for this: XLA's slice of v, a rope fusion for q and one for k (each a
concatenate of the rotated halves), and the write kernel. At one token each moves a few KB and costs a launch's
~1.5-3 us; on the H200 the four took 0.28 ms of a 16.6 ms Llama-2-7B decode step at batch 128. One program a token
(or a group of its KV heads) reads its row of qkv once and writes q and the two page rows.

Measured (H200, Llama-2-7B, docs/benchmarks.md, ninth session): 2.5 us a call at batch 1 (32 programs of one head;
4.8 us as one program of 32), 5.6 us at 128; single-stream decode 245.1 tok/s against 239.5 with one program a token
and 238.1 against 235.5 for that against the unfused path, each pair in one call.

Design. Grid (T, K / B) for B KV heads a program (`RopeWriteTuning`): few tokens (decode of a small batch) split their
heads over programs so that the GPU's SMs share the work; many tokens take all heads in one program each. The q, k
and v parts of a program's rows are three blocks of qkv ([B, G, H], [B, H], [B, H]), each a power of two a side
(Triton's blocks), so K, G and H must be: Llama-2-7B (32, 1, 128), Llama-3-8B and Mistral/Mixtral (8, 4, 128); not
Llama-2-13B's 40 KV heads, which keep the unfused path. The halves of H are loaded and stored separately (Triton has
no concatenate). The pages are aliased to the outputs, so the write is in place when the caller donates them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.kernels.kv_write import validate_write_args, write_kv, write_kv_reference
from jpaged.kernels.paged_attention import pallas_out_struct
from jpaged.kernels.platform import H200_SMS, is_power_of_two, on_gpu

IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeWriteTuning:
    """The kernel's knobs: KV heads a program rotates and writes (a power of two dividing K), and its warps."""

    kv_heads_per_program: int
    num_warps: int = 4

    def __post_init__(self) -> None:
        def ok(n: object) -> bool:
            return isinstance(n, int) and not isinstance(n, bool) and is_power_of_two(n)

        if not ok(self.kv_heads_per_program):
            raise ValueError(f"RopeWriteTuning.kv_heads_per_program must be a power of two, got "
                             f"{self.kv_heads_per_program!r}")  # fmt: skip
        if not ok(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"RopeWriteTuning.num_warps must be a power of two in [1, 32], got {self.num_warps!r}")


def default_tuning(num_tokens: int, num_kv_heads: int) -> RopeWriteTuning:
    """All of a token's heads in one program, halved while the programs would not fill the SMs (one token of
    Llama-2-7B: 32 programs of one head; 128 tokens: 256 of 16; 256 tokens: 256 of 32). Measured against one program
    a token on the H200 (module docstring), not swept."""
    heads = num_kv_heads
    while heads > 1 and num_tokens * (num_kv_heads // heads) < H200_SMS:
        heads //= 2
    return RopeWriteTuning(kv_heads_per_program=heads)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [T, ..., H] rotated by positions [T] at frequencies inv_freq [H/2]; HF's rotate-half layout (the first and
    second halves of H form the pairs). cos and sin are rounded to x's dtype first, as HF does."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    extra = (None,) * (x.ndim - 2)  # broadcast over the head dims
    cos = jnp.cos(jnp.concatenate([freqs, freqs], axis=-1))[:, *extra, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([freqs, freqs], axis=-1))[:, *extra, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _split_and_rotate(qkv, positions, inv_freq):
    group = qkv.shape[2] - 2
    q = apply_rope(qkv[:, :, :group], positions, inv_freq)  # [T, K, G, H]
    k = apply_rope(qkv[:, :, group], positions, inv_freq)  # [T, K, H]
    return q, k, qkv[:, :, group + 1]


def rope_write_kv_reference(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping):
    """Plain jnp: rotate, then `write_kv_reference` (a token at a time; the tests' oracle)."""
    _validate(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping)
    q, k, v = _split_and_rotate(qkv, positions, inv_freq)
    return (q, *write_kv_reference(k_pages, v_pages, k, v, slot_mapping))


def _validate(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping) -> None:
    if qkv.ndim != 4 or qkv.shape[2] < 3:
        raise ValueError(f"qkv must be [T, K, G + 2, H] with G >= 1, got shape {qkv.shape}")
    num_tokens, num_kv_heads, _, head_dim = qkv.shape
    if head_dim % 2:
        raise ValueError(f"the head dim H must be even for rotate-half RoPE, got {head_dim}")
    if positions.shape != (num_tokens,) or positions.dtype != jnp.int32:
        raise ValueError(f"positions must be [T={num_tokens}] int32, got {positions.shape} {positions.dtype}")
    if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != jnp.float32:
        raise ValueError(f"inv_freq must be [H/2={head_dim // 2}] float32, got {inv_freq.shape} {inv_freq.dtype}")
    if k_pages.ndim != 4 or (k_pages.shape[0], k_pages.shape[3]) != (num_kv_heads, head_dim):
        raise ValueError(f"k_pages must be [K={num_kv_heads}, P, S, H={head_dim}], got shape {k_pages.shape}")
    # write_kv's own checks cover v_pages and slot_mapping against k_pages and the new K/V.
    new = jax.ShapeDtypeStruct((num_tokens, num_kv_heads, head_dim), qkv.dtype)
    validate_write_args(k_pages, v_pages, new, new, slot_mapping)


def pallas_unsupported_reason(qkv: jax.Array) -> str | None:
    """Why the compiled kernel cannot take a fused q/k/v of this shape, or None: its q, k and v blocks must have
    power-of-two sides."""
    _, num_kv_heads, group_plus_2, head_dim = qkv.shape
    for name, size in (("K (kv heads)", num_kv_heads), ("G (q heads per kv head)", group_plus_2 - 2),
                       ("H / 2 (half the head dim)", head_dim // 2)):  # fmt: skip
        if not is_power_of_two(size):
            return f"{name} = {size} is not a power of two"
    return None


def _kernel(
    slot_ref,  # [T] int32
    pos_ref,  # [T] int32
    inv_freq_ref,  # [H/2] float32
    q_in_ref,  # [B, G, H] token t's queries of this program's B KV heads
    k_in_ref,  # [B, H] their keys
    v_in_ref,  # [B, H] their values
    k_pages_in_ref,  # [K, P, S, H] aliased to k_pages_ref
    v_pages_in_ref,  # [K, P, S, H] aliased to v_pages_ref
    q_ref,  # [B, G, H] out: rotated queries
    k_pages_ref,  # [K, P, S, H]
    v_pages_ref,  # [K, P, S, H]
):
    del k_pages_in_ref, v_pages_in_ref  # same buffers as the outputs
    t = pl.program_id(0)
    heads = pl.ds(pl.program_id(1) * q_ref.shape[0], q_ref.shape[0])
    dtype = q_ref.dtype
    half = q_ref.shape[-1] // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    f32 = jnp.float32
    freqs = pos_ref[t].astype(f32) * inv_freq_ref[...]  # [H/2]
    cos = jnp.cos(freqs).astype(dtype).astype(f32)
    sin = jnp.sin(freqs).astype(dtype).astype(f32)

    def rounded(x):  # an XLA bf16 op's result: computed in float32, rounded once
        return x.astype(dtype).astype(f32)

    def rotate(x_lo, x_hi):  # [..., H/2] each -> the rotated halves, as `apply_rope`
        x_lo, x_hi = x_lo.astype(f32), x_hi.astype(f32)
        return ((rounded(x_lo * cos) - rounded(x_hi * sin)).astype(dtype),
                (rounded(x_hi * cos) + rounded(x_lo * sin)).astype(dtype))  # fmt: skip

    q_ref[:, :, lo], q_ref[:, :, hi] = rotate(q_in_ref[:, :, lo], q_in_ref[:, :, hi])
    slot = slot_ref[t]
    page_size = k_pages_ref.shape[2]
    page, offset = slot // page_size, slot % page_size
    k_lo, k_hi = rotate(k_in_ref[:, lo], k_in_ref[:, hi])
    k_pages_ref[heads, page, offset, lo] = k_lo.astype(k_pages_ref.dtype)
    k_pages_ref[heads, page, offset, hi] = k_hi.astype(k_pages_ref.dtype)
    v_pages_ref[heads, page, offset, :] = v_in_ref[...].astype(v_pages_ref.dtype)


def _rope_write_pallas(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping, *, tuning: RopeWriteTuning,
                       interpret: bool):  # fmt: skip
    num_tokens, num_kv_heads, group_plus_2, head_dim = qkv.shape
    group, heads = group_plus_2 - 2, tuning.kv_heads_per_program
    if num_kv_heads % heads:
        raise ValueError(f"kv_heads_per_program = {heads} does not divide K = {num_kv_heads}")
    q_spec = pl.BlockSpec((None, heads, group, head_dim), lambda t, h: (t, h, 0, 0))
    k_spec = pl.BlockSpec((None, heads, None, head_dim), lambda t, h: (t, h, group, 0))
    v_spec = pl.BlockSpec((None, heads, None, head_dim), lambda t, h: (t, h, group + 1, 0))
    pages_spec = pl.BlockSpec(k_pages.shape, lambda t, h: (0, 0, 0, 0))
    inputs = (slot_mapping, positions, inv_freq, qkv, qkv, qkv, k_pages, v_pages)
    q_shape = (num_tokens, num_kv_heads, group, head_dim)
    return pl.pallas_call(
        _kernel,
        grid=(num_tokens, num_kv_heads // heads),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec(), q_spec, k_spec, v_spec, pages_spec, pages_spec],
        out_specs=[q_spec, pages_spec, pages_spec],
        out_shape=[
            pallas_out_struct(q_shape, qkv.dtype, *inputs),
            pallas_out_struct(k_pages.shape, k_pages.dtype, *inputs),
            pallas_out_struct(v_pages.shape, v_pages.dtype, *inputs),
        ],
        input_output_aliases={6: 1, 7: 2},
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=1),
        interpret=interpret,
        name="rope_write_kv",
    )(*inputs)


def resolve_impl(impl: str, qkv: jax.Array) -> str:
    """What "auto" means for a fused q/k/v of this shape on the default backend: "pallas" on a GPU where the kernel's
    blocks can be Triton's, else "xla" (XLA's rope; the write then takes `write_kv`'s own "auto")."""
    if impl != "auto":
        return impl
    return "pallas" if on_gpu() and pallas_unsupported_reason(qkv) is None else "xla"


@functools.partial(jax.jit, static_argnames=("impl", "tuning", "interpret"))
def rope_write_kv(
    qkv: jax.Array,  # [T, K, G + 2, H]
    positions: jax.Array,  # [T] int32
    inv_freq: jax.Array,  # [H/2] float32
    k_pages: jax.Array,  # [K, P, S, H]
    v_pages: jax.Array,  # [K, P, S, H]
    slot_mapping: jax.Array,  # [T] int32 page_id * S + offset_in_page; padding -> a slot of page 0
    *,
    impl: str = "auto",
    tuning: RopeWriteTuning | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # q [T, K, G, H] rotated, updated (k_pages, v_pages)
    """Rotates q and k of a fused q/k/v by RoPE and writes k and v into the pages; returns q and the pages.

    impl: "xla" (XLA's rope and scatter; any backend), "pallas" (one Triton-style program a token; on a GPU K, G and
    H/2 must be powers of two; off GPU it needs interpret=True) or "auto" (`resolve_impl`: the kernel on GPUs where it
    can run, else XLA's rope and `write_kv(impl="auto")`). tuning: the kernel's; None picks `default_tuning`.
    """
    _validate(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if resolve_impl(impl, qkv) == "xla":
        q, k, v = _split_and_rotate(qkv, positions, inv_freq)
        # impl is "xla" (all XLA) or "auto" (fallen back: the write may still take its own kernel).
        return (q, *write_kv(k_pages, v_pages, k, v, slot_mapping, impl=impl))
    if not interpret and not on_gpu():
        raise ValueError(f"impl='pallas' needs a GPU (backend is {jax.default_backend()!r}) or interpret=True")
    if not interpret and (reason := pallas_unsupported_reason(qkv)) is not None:
        raise ValueError(f"impl='pallas' cannot take these shapes: {reason}")
    tuning = tuning or default_tuning(qkv.shape[0], qkv.shape[1])
    return _rope_write_pallas(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping, tuning=tuning,
                              interpret=interpret)  # fmt: skip
