"""Decode-sized weight matmul for Hopper through Pallas' Mosaic GPU backend: the weights streamed by TMA.

M rows (a decode step's tokens, <= 256), K contraction, N output columns, S K-splits, R = M rounded up to a multiple
of 64 (wgmma's M).

Contract: out [M, N] = x [M, K] @ w [K, N], float32 accumulation, out in x's dtype.

Why. A decode step's weight matmuls are a stream of weight bytes: at M = 16 Llama-2-7B's layer reads 404 MB for
0.01 GFLOP. On the H200 XLA's GEMMs reach 2.9-3.5 TB/s of the 4.28 TB/s copy bandwidth, and the Triton-lowered
kernel (`grouped_matmul.matmul`) is slower still on 32-180 MB projections (docs/benchmarks.md, fourth session). The
decode-attention kernel (paged_decode_mgpu.py) reaches 3.9-4.2 TB/s with TMA copies into an SMEM ring; this applies
the same idea to a dense weight matrix.

Design.
- Grid (N / block_n, S): one program (one warpgroup) per column block and K-split. x is padded to R rows (64-row
  wgmma tiles; compute is free at decode, the bytes are the weights'). The [R, block_n] float32 accumulator lives in
  the warpgroup's registers, so R * block_n <= 128 * 128 (128 registers a thread): 128-column blocks up to 128 rows,
  64-column ones past that.
- `plgpu.emit_pipeline` streams, per step, x's [R, block_k] and w's [block_k, block_n] tiles by TMA through
  `num_stages` swizzled SMEM slots; the wgmma accumulates the [R, block_n] tile in float32 registers. In flight per
  program: num_stages - 1 weight tiles (16 KB each at block_k 64 x block_n 128 bf16).
- The tile leaves through SMEM with one TMA store: rows >= M are written too (zeros of the padding) and cut by the
  wrapper. With S > 1 every split writes float32 partial sums that XLA adds.

Status: checked in Pallas' Mosaic GPU interpreter on CPU and lowered for CUDA (tests/test_matmul_mgpu.py); the model
takes it with matmul_impl="mgpu" (models/llama.py `project`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jpaged.kernels.platform import H200_SMS

ROW_TILE = 64  # wgmma's M
MAX_ROWS = 256
_ACC_ELEMS = 128 * 128  # float32 accumulator elements a warpgroup holds in registers (128 a thread)
_SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block
_SWIZZLE = 128  # bytes
_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulTuning:
    """Tile sizes of the kernel; one kernel, many tunings."""

    block_n: int = 128  # output columns per program; a multiple of 64 dividing N, <= 256; R * block_n <= 16384
    block_k: int = 64  # contraction per pipeline step; 64 (one 128-byte swizzle row of bf16) or a multiple
    num_stages: int = 4  # SMEM slots of the pipeline; >= 2 (a slot is released one step late, after its wgmma)
    k_splits: int = 1  # programs sharing a column block's K range; > 1 adds float32 partial sums after

    def __post_init__(self) -> None:
        checks = {
            "block_n": self.block_n % 64 == 0 and 64 <= self.block_n <= 256,
            "block_k": self.block_k % 64 == 0 and 64 <= self.block_k <= 256,
            "num_stages": 2 <= self.num_stages <= 8,
            "k_splits": self.k_splits >= 1,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not ok:
                raise ValueError(f"MatmulTuning.{name}: bad value {value!r}")

    @property
    def name(self) -> str:
        return f"bn{self.block_n}_bk{self.block_k}_st{self.num_stages}_ks{self.k_splits}"


_MIN_PROGRAMS = H200_SMS  # fewer leave SMs without a weight stream


def padded_rows(m: int) -> int:
    """R: M rounded up to whole wgmma tiles."""
    return max(ROW_TILE, -(-m // ROW_TILE) * ROW_TILE)


def default_tuning(m: int, k: int, n: int) -> MatmulTuning:
    """128-column blocks (64 where N or the accumulator's registers need it: past 128 rows); K split in two until
    every SM has a program, keeping >= 8 pipeline steps per split (Llama-2-7B's output and down projections have 32
    column blocks: 8 and 4 splits, K = 11008 = 172 x 64 stopping at 4); 3 pipeline slots past 128 rows, where x's
    tiles fill the shared memory. A starting point: not yet measured on a GPU."""
    rows = padded_rows(m)
    block_n = 128 if n % 128 == 0 and rows * 128 <= _ACC_ELEMS else 64
    k_splits = 1
    while (n // block_n) * k_splits < _MIN_PROGRAMS and k % (64 * 2 * k_splits) == 0 and k // (64 * 2 * k_splits) >= 8:
        k_splits *= 2
    return MatmulTuning(block_n=block_n, k_splits=k_splits, num_stages=4 if rows <= 128 else 3)


# Where this kernel beat XLA's GEMM on the H200, each projection timed alone over copies of its weight
# (benchmarks/gemm.py --sweep --sweep-impl mgpu; docs/benchmarks.md, fifth session): (K, N, rows M) -> its best
# tuning there (a win of 10% or more). Elsewhere, at 1-256 rows, XLA's GEMMs were as fast or faster: its GEMV-like
# fusions stream 3.4-4.1 TB/s at 1-16 rows, where this kernel reads x padded to a 64-row wgmma tile, and past 128 rows
# the kernel's accumulator allows only 64-column blocks. Exact row counts (the engine's step buckets are powers of
# two): the kernel pads M and costs the same with fewer rows, but XLA gets faster (the down projection: 30.6 us at 64
# rows, 26.3 at 16), so a win at one count says nothing of smaller ones.
H200_FASTER_THAN_XLA: dict[tuple[int, int, int], MatmulTuning] = {
    (4096, 12288, 128): MatmulTuning(block_n=128, num_stages=6),  # Llama-2-7B's fused q/k/v: 30.5 us vs XLA's 42.1
    (11008, 4096, 64): MatmulTuning(block_n=128, k_splits=4),  # its down projection at 64 rows: 27.5 us vs 30.6
}


def measured_faster_tuning(m: int, k: int, n: int) -> MatmulTuning | None:
    """The tuning with which this kernel measured faster than XLA for x [m, k] @ w [k, n] on the H200, or None."""
    return H200_FASTER_THAN_XLA.get((k, n, m))


def _smem_bytes(rows: int, tuning: MatmulTuning, itemsize: int) -> int:
    ring = tuning.num_stages * (rows + tuning.block_n) * tuning.block_k * itemsize  # x's and w's tiles per slot
    out_itemsize = itemsize if tuning.k_splits == 1 else 4
    return ring + rows * tuning.block_n * out_itemsize


def matmul_mgpu_unsupported_reason(x: jax.Array, w: jax.Array, tuning: MatmulTuning) -> str | None:
    """Why the kernel cannot run these shapes, or None."""
    (m, k), (k2, n) = x.shape, w.shape
    if x.dtype != w.dtype or x.dtype not in _DTYPES:
        return f"x and w must share a dtype among bfloat16, float16, got {x.dtype} and {w.dtype}"
    if k != k2:
        return f"K of x ({k}) and of w ({k2}) differ"
    if m > MAX_ROWS:
        return f"M = {m} > {MAX_ROWS} rows"
    rows = padded_rows(m)
    if rows * tuning.block_n > _ACC_ELEMS:
        return f"{rows} padded rows x block_n = {tuning.block_n} overflow the accumulator's registers (<= {_ACC_ELEMS})"
    if (smem := _smem_bytes(rows, tuning, x.dtype.itemsize)) > _SMEM_BYTES:
        return f"{smem} bytes of shared memory for {rows} padded rows and {tuning.name} (> {_SMEM_BYTES})"
    if n % tuning.block_n:
        return f"N = {n} is not a multiple of block_n = {tuning.block_n}"
    if k % (tuning.block_k * tuning.k_splits):
        return f"K = {k} is not a multiple of block_k * k_splits = {tuning.block_k} * {tuning.k_splits}"
    return None


def _swizzled(dtype) -> tuple:
    """wgmma operand layout: (8, 64)-element tiles of bf16, 128-byte swizzle."""
    elems = _SWIZZLE // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(_SWIZZLE))  # type: ignore[abstract]


def _kernel(
    x_gmem,  # [R, K] zero rows past M
    w_gmem,  # [K, N]
    o_gmem,  # [S, R, N] x's dtype, or float32 when S > 1
    o_smem,  # [R, block_n] the output tile on its way out
    *,
    tuning: MatmulTuning,
    steps: int,  # pipeline steps per split: K / (block_k * S)
):
    n_block = lax.axis_index("n")
    split = lax.axis_index("s")
    rows, bk, bn = x_gmem.shape[0], tuning.block_k, tuning.block_n
    transforms = _swizzled(x_gmem.dtype)

    def accumulate(acc_ref):
        plgpu.emit_pipeline(
            lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem, w_smem),  # [R, bk] @ [bk, bn]
            grid=(steps,),
            in_specs=[
                plgpu.BlockSpec((rows, bk), lambda i: (0, split * steps + i), transforms=transforms, delay_release=1),
                plgpu.BlockSpec(
                    (bk, bn), lambda i: (split * steps + i, n_block), transforms=transforms, delay_release=1
                ),
            ],
            max_concurrent_steps=tuning.num_stages,
        )(x_gmem, w_gmem)
        return acc_ref[...]

    acc = pl.run_scoped(accumulate, plgpu.ACC((rows, bn), jnp.float32))
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[split, :, pl.ds(n_block * bn, bn)])
    plgpu.wait_smem_to_gmem(0)


def matmul_mgpu_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """Plain jnp: float32 products, out in x's dtype."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def interpret_params() -> plgpu.InterpretGPUParams:
    """The Mosaic GPU interpreter, with uninitialised memory NaN so reads of unwritten SMEM show in the output."""
    return plgpu.InterpretGPUParams(uninitialized_memory="nan")


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def matmul_mgpu(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N]
    *,
    tuning: MatmulTuning | None = None,
    interpret: bool = False,
) -> jax.Array:  # [M, N] in x's dtype
    """x @ w for M <= 256 rows on Hopper (Mosaic GPU); `interpret=True` runs Pallas' Mosaic GPU interpreter on CPU.
    tuning: None picks `default_tuning(M, K, N)`.

    Raises ValueError for shapes the kernel cannot run (`matmul_mgpu_unsupported_reason`).
    """
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"matmul_mgpu takes x [M, K] and w [K, N], got shapes {x.shape} and {w.shape}")
    tuning = tuning or default_tuning(x.shape[0], x.shape[1], w.shape[1])
    reason = matmul_mgpu_unsupported_reason(x, w, tuning)
    if reason is not None:
        raise ValueError(f"matmul_mgpu cannot run these shapes: {reason}")
    m, k = x.shape
    n = w.shape[1]
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    splits = tuning.k_splits
    out_dtype = x.dtype if splits == 1 else jnp.float32
    kernel = functools.partial(_kernel, tuning=tuning, steps=k // (tuning.block_k * splits))
    kernel.__name__ = f"matmul_mgpu_{tuning.name}"  # type: ignore[attr-defined]
    rows = padded_rows(m)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits, rows, n), out_dtype),
        scratch_types=(plgpu.SMEM((rows, tuning.block_n), out_dtype),),
        grid=(n // tuning.block_n, splits),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )(jnp.pad(x, ((0, rows - m), (0, 0))), w)
    out = out[0] if splits == 1 else out.sum(axis=0).astype(x.dtype)
    return out[:m]
