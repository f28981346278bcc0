"""Writes this step's new K/V into the paged cache.

T tokens, K kv-heads, H head dim, P pages, S page size. Token t goes to slot
slot_mapping[t] = page * S + offset. Padding tokens carry slots inside page 0, the null page, which nothing
valid is read from; several of them may hit the same slot, and whichever lands last does not matter. Slots
must lie in [0, P * S): the caller validates page tables on the host (an out-of-range slot is dropped by
"xla" and undefined behaviour for "pallas").

The caller donates the pages, so both implementations update them in place: "xla" scatters into a
[K, P*S, H] view (reshapes of a donated buffer are free), "pallas" aliases the pages to its outputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.kernels.paged_attention import pallas_out_struct
from jpaged.kernels.platform import is_power_of_two, on_gpu

IMPLS = ("auto", "xla", "pallas")


def validate_write_args(k_pages, v_pages, k_new, v_new, slot_mapping) -> None:
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [K, P, S, H], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages {v_pages.shape} {v_pages.dtype} must match k_pages {k_pages.shape} {k_pages.dtype}")
    num_kv_heads, _, _, head_dim = k_pages.shape
    if k_new.ndim != 3 or k_new.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k_new must be [T, K={num_kv_heads}, H={head_dim}], got shape {k_new.shape}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new must have k_new's shape {k_new.shape}, got {v_new.shape}")
    if slot_mapping.shape != (k_new.shape[0],):
        raise ValueError(f"slot_mapping must be [T={k_new.shape[0]}], got shape {slot_mapping.shape}")
    if slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be int32, got {slot_mapping.dtype}")


def write_kv_reference(
    k_pages: jax.Array,  # [K, P, S, H]
    v_pages: jax.Array,  # [K, P, S, H]
    k_new: jax.Array,  # [T, K, H]
    v_new: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # [T] int32
) -> tuple[jax.Array, jax.Array]:
    """Plain jnp: one token at a time, page and offset spelled out (slow; the tests' oracle)."""
    validate_write_args(k_pages, v_pages, k_new, v_new, slot_mapping)
    page_size = k_pages.shape[2]

    def write_one(t, pages):
        k_pages, v_pages = pages
        page, offset = slot_mapping[t] // page_size, slot_mapping[t] % page_size
        return k_pages.at[:, page, offset].set(k_new[t]), v_pages.at[:, page, offset].set(v_new[t])

    return jax.lax.fori_loop(0, k_new.shape[0], write_one, (k_pages, v_pages))


def _write_xla(k_pages, v_pages, k_new, v_new, slot_mapping):
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape

    def write(pages, new):
        flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)  # [K, P*S, H]
        flat = flat.at[:, slot_mapping].set(new.swapaxes(0, 1).astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return write(k_pages, k_new), write(v_pages, v_new)


def _write_kernel(
    slot_ref,  # [T] int32
    k_new_ref,  # [K, H] token t, every kv head
    v_new_ref,  # [K, H]
    k_pages_in_ref,  # [K, P, S, H] aliased to k_pages_ref
    v_pages_in_ref,  # [K, P, S, H] aliased to v_pages_ref
    k_pages_ref,  # [K, P, S, H]
    v_pages_ref,  # [K, P, S, H]
):
    # One program a token, K and V of every head: a step's write is one launch of T programs, each storing its
    # 2 x K rows of H (the scatter XLA emits takes one launch for K and one for V).
    del k_pages_in_ref, v_pages_in_ref  # same buffers as the outputs
    slot = slot_ref[pl.program_id(0)]
    page_size = k_pages_ref.shape[2]
    page, offset = slot // page_size, slot % page_size
    k_pages_ref[:, page, offset, :] = k_new_ref[...].astype(k_pages_ref.dtype)
    v_pages_ref[:, page, offset, :] = v_new_ref[...].astype(v_pages_ref.dtype)


def _write_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, *, interpret: bool):
    num_tokens, num_kv_heads, head_dim = k_new.shape
    new_spec = pl.BlockSpec((None, num_kv_heads, head_dim), lambda t: (t, 0, 0))
    pages_spec = pl.BlockSpec(k_pages.shape, lambda t: (0, 0, 0, 0))
    return pl.pallas_call(
        _write_kernel,
        grid=(num_tokens,),
        in_specs=[pl.BlockSpec(), new_spec, new_spec, pages_spec, pages_spec],
        out_specs=[pages_spec, pages_spec],
        out_shape=[pallas_out_struct(k_pages.shape, k_pages.dtype, k_pages, v_pages, k_new, v_new)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(slot_mapping, k_new, v_new, k_pages, v_pages)


def pallas_unsupported_reason(k_new: jax.Array) -> str | None:
    """Why the compiled kernel cannot write new K/V of this shape ([T, K, H]), or None: a program stores one [K, H]
    block, and Triton's blocks have power-of-two sides (Llama-2-13B's 40 KV heads do not)."""
    _, num_kv_heads, head_dim = k_new.shape
    for name, size in (("K (kv heads)", num_kv_heads), ("H (head dim)", head_dim)):
        if not is_power_of_two(size):
            return f"{name} = {size} is not a power of two"
    return None


def resolve_impl(impl: str, k_new: jax.Array) -> str:
    """The implementation "auto" means for new K/V of this shape on the default backend: the Pallas kernel on a GPU
    where it can write the shape, else XLA's scatter. On the H200 (benchmarks/kv_write.py, writes chained in one
    call) the kernel took 3.8 us against the scatter's 13.1 us at 128 tokens of Llama-2-7B, 21 us against 134 us at
    2048: XLA emits one scatter for K and one for V, each well under a tenth of the bandwidth."""
    if impl != "auto":
        return impl
    return "pallas" if on_gpu() and pallas_unsupported_reason(k_new) is None else "xla"


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def write_kv(
    k_pages: jax.Array,  # [K, P, S, H]
    v_pages: jax.Array,  # [K, P, S, H]
    k_new: jax.Array,  # [T, K, H]
    v_new: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # [T] int32 page_id * S + offset_in_page; padding -> a slot of page 0
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # updated (k_pages, v_pages)
    """Writes k_new/v_new[t] into slot slot_mapping[t] of every kv head; returns the updated pages.

    impl: "xla" (a scatter; any backend), "pallas" (Triton-style kernel, one program a token, pages aliased to its
    outputs; on a GPU K and H must be powers of two; off GPU it needs interpret=True) or "auto" (`resolve_impl`).
    """
    validate_write_args(k_pages, v_pages, k_new, v_new, slot_mapping)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    impl = resolve_impl(impl, k_new)
    if impl == "xla":
        return _write_xla(k_pages, v_pages, k_new, v_new, slot_mapping)
    if not interpret and not on_gpu():
        raise ValueError(f"impl='pallas' needs a GPU (backend is {jax.default_backend()!r}) or interpret=True")
    if not interpret and (reason := pallas_unsupported_reason(k_new)) is not None:
        raise ValueError(f"impl='pallas' cannot write these shapes: {reason}")
    return _write_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, interpret=interpret)
