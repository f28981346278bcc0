"""Reads the start of a weight matrix into the GPU's L2 cache while other kernels run, so the matmul that needs it
next finds those bytes there instead of in HBM.

Why. A one-token decode step is a chain of kernels, and only the weight GEMVs stream HBM at full speed. Between two
GEMVs the attention, its combine, the rope + KV write and the residual add + norm run for ~20 us a layer (Llama-2-7B,
H200, docs/benchmarks.md) with the memory system nearly idle. A kernel launched beside them, on a branch of the step's
CUDA graph that nothing waits for, can use that time to pull the next projection's weights into the 50 MB L2.

Contract. `l2_prefetch(w, after)` returns [B] float32 (one value a program): the number of NaNs in the block that
program read, so zeros for a finite weight. The caller must make that value reach the step's output (XLA drops a
result nobody reads, and the kernel with it); `nan_if_any` turns the values into a scalar that is 0 or NaN, which a
model adds to its logits: a weight holding a NaN makes the logits NaN anyway. `after` is not read: it only orders
the kernel after that array's producer. The reads run in parallel with the chain only where XLA schedules the step's
command buffer by data dependence (`--xla_gpu_command_buffer_scheduling_mode=CONCURRENT`, see jpaged/runner.py);
under XLA's default they run in line and only add their time.

Design. The weight, viewed as [R, C] (C a power of two dividing its size), is read in blocks of [block_rows, C], one
program a block, over its first `max_bytes`. The loads carry an evict-last hint, so the GEMV's own streaming evicts
them last.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.kernels.paged_attention import pallas_out_struct
from jpaged.kernels.platform import is_power_of_two, on_gpu

EVICTION_POLICIES = ("evict_normal", "evict_first", "evict_last")
MAX_COLUMNS = 1024  # the [R, C] view's C at most: a program's block is block_rows rows of it


@dataclasses.dataclass(frozen=True, kw_only=True)
class L2PrefetchTuning:
    """block_rows: rows of the [R, C] view a program reads (a power of two); num_warps: the warps that share them
    (a power of two, 1-32); eviction_policy: the loads' L2 hint, one of EVICTION_POLICIES."""

    block_rows: int = 16
    num_warps: int = 4
    eviction_policy: str = "evict_last"

    def __post_init__(self) -> None:
        if not isinstance(self.block_rows, int) or not is_power_of_two(self.block_rows):
            raise ValueError(f"L2PrefetchTuning.block_rows must be a power of two, got {self.block_rows!r}")
        if not isinstance(self.num_warps, int) or self.num_warps > 32 or not is_power_of_two(self.num_warps):
            raise ValueError(f"L2PrefetchTuning.num_warps must be a power of two in [1, 32], got {self.num_warps!r}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"L2PrefetchTuning.eviction_policy must be one of {EVICTION_POLICIES}, got {self.eviction_policy!r}"
            )


def columns(size: int) -> int:
    """C of the [R, C] view: the largest power of two <= MAX_COLUMNS that divides `size` elements."""
    return math.gcd(size, MAX_COLUMNS)


def default_tuning(w: jax.Array) -> L2PrefetchTuning:
    """16 rows of the [R, C] view a program (32 KB of a bf16 weight 1024 wide); fewer where w has fewer rows."""
    rows = w.size // columns(w.size)
    return L2PrefetchTuning(block_rows=min(16, 1 << (rows.bit_length() - 1)))


def prefetch_blocks(w: jax.Array, max_bytes: int | None, tuning: L2PrefetchTuning) -> int:
    """Programs (blocks of the [R, C] view) the kernel runs: the whole blocks in w's first max_bytes (None: all of
    w). A weight smaller than one block gets none."""
    cols = columns(w.size)
    rows = w.size // cols
    if max_bytes is not None:
        rows = min(rows, max_bytes // (cols * w.dtype.itemsize))
    return rows // tuning.block_rows


def _kernel(
    w_ref,  # [block_rows, C] this program's block of the weight
    after_ref,  # [...] not read: orders the kernel after its producer
    o_ref,  # [1] out: NaNs in the block (0.0 for a finite weight)
    *,
    eviction_policy: str,
):
    del after_ref
    x = plgpu.load(w_ref, eviction_policy=eviction_policy)
    # A value that depends on every element keeps the loads; counting NaNs (not summing) cannot overflow.
    nans = jnp.sum(jnp.sum((x != x).astype(jnp.float32), axis=1), axis=0, keepdims=True)
    o_ref[...] = nans


def l2_prefetch_reference(w: jax.Array, after: jax.Array, *, max_bytes: int | None = None,
                          tuning: L2PrefetchTuning | None = None) -> jax.Array:  # fmt: skip
    """Plain jnp: what the kernel returns, a block's NaN count per program (nothing is cached)."""
    del after
    tuning = tuning or default_tuning(w)
    rows = prefetch_blocks(w, max_bytes, tuning) * tuning.block_rows
    view = w.reshape(-1, columns(w.size))[:rows].reshape(-1, tuning.block_rows * columns(w.size))
    return jnp.sum(jnp.isnan(view), axis=1, dtype=jnp.float32)


def _validate(w: jax.Array, max_bytes: int | None) -> None:
    if w.size == 0:
        raise ValueError(f"w must have elements, got shape {w.shape}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be None or an int >= 0, got {max_bytes!r}")


def _l2_prefetch_pallas(w, after, *, max_bytes: int | None, tuning: L2PrefetchTuning, interpret: bool):
    blocks = prefetch_blocks(w, max_bytes, tuning)
    view = w.reshape(-1, columns(w.size))
    block = pl.BlockSpec((tuning.block_rows, view.shape[1]), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eviction_policy=tuning.eviction_policy),
        grid=(blocks,),
        in_specs=[block, pl.no_block_spec],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),
        out_shape=pallas_out_struct((blocks,), jnp.float32, w, after),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=1),
        interpret=interpret,
        name="l2_prefetch",
    )(view, after)


@functools.partial(jax.jit, static_argnames=("max_bytes", "tuning", "interpret"))
def l2_prefetch(
    w: jax.Array,  # [...] any weight, read as [R, C]
    after: jax.Array,  # [...] any array; the kernel runs after its producer
    *,
    max_bytes: int | None = None,
    tuning: L2PrefetchTuning | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B] float32: the NaNs each program saw
    """Reads w's first max_bytes (None: all of it; whole blocks) so they sit in L2 for the next
    kernel that reads them. Returns one NaN count a block; see the module docstring for why it must be used."""
    _validate(w, max_bytes)
    tuning = tuning or default_tuning(w)
    if not interpret and not on_gpu():
        raise ValueError(f"l2_prefetch needs a GPU (backend is {jax.default_backend()!r}) or interpret=True")
    if prefetch_blocks(w, max_bytes, tuning) == 0:
        return jnp.zeros((0,), jnp.float32)
    return _l2_prefetch_pallas(w, after, max_bytes=max_bytes, tuning=tuning, interpret=interpret)


def nan_if_any(counts: list[jax.Array]) -> jax.Array:
    """[] float32: NaN if any count is non-zero, else 0. Added to a step's logits it keeps every prefetch alive."""
    total = sum((jnp.sum(c) for c in counts), start=jnp.zeros((), jnp.float32))
    return jnp.where(total > 0, jnp.float32(jnp.nan), jnp.float32(0))
