"""Weight GEMV for single-stream decode: x [M, K] @ w [K, N] for M <= 4 rows, on the GPU's CUDA cores.

M rows, K contraction, N output columns, S K-splits, BK x BN a program's weight tile per loop step.

Contract: `gemv_partials` gives the S split-K partial sums [S, M, N] in float32 (products and sums in float32);
`gemv` adds them and rounds to x's dtype, as XLA's dot with float32 accumulation does (summation order aside).

Why. At one decode row a weight matmul is a stream of weight bytes with 2 FLOP per 2-byte element. On the H200 XLA
streams Llama-2-7B's q/k/v and gate/up GEMVs at 4.1-4.25 TB/s but its output (o) and down projections at 3.29 TB/s
(docs/benchmarks.md, ninth session's profile): 0.26 ms of a 4.2 ms step over the 4.28 TB/s copy rate, plus XLA's
split-K reductions (64 launches, 0.08 ms). The tensor-core kernels (`matmul_mgpu`, the Triton-lowered
`grouped_matmul.matmul`) pad a row to a 16- or 64-row tile and lost to XLA here (fifth session). A GEMV needs no
tile: a program multiplies its [BK, BN] weight tile by x's [BK] slice elementwise into a [BK, BN] float32
accumulator in registers and reduces over BK once, after its loop, so the loop is loads and FMAs only.

Design. Grid (N / BN, S): program (n, s) owns output columns n * BN + [0, BN) and the s-th of S equal slices of K.
Each row of a weight tile is BN contiguous elements (BN * 2 bytes: 128 at BN 64, a full cache line), so the loads
coalesce; Triton's software pipelining (`num_stages`) keeps the next tiles' loads in flight. S is chosen so that
(N / BN) * S programs cover the 132 SMs several times over (Llama-2-7B's o and down projections have N / BN = 32 to
64 column blocks). The partials leave in float32: `gemv` sums them (one small XLA reduction); a consumer that adds
them itself (the residual add) saves that launch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.kernels.paged_attention import pallas_out_struct
from jpaged.kernels.platform import H200_SMS, is_power_of_two, on_gpu

MAX_ROWS = 4  # one [BK, BN] float32 accumulator per row lives in registers
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemvTuning:
    """One kernel, many tunings: tile, K-splits, warps and Triton's pipeline depth."""

    block_k: int = 32  # contraction rows per loop step (a power of two)
    block_n: int = 128  # output columns per program (a power of two, >= 16)
    k_splits: int = 4  # programs sharing a column block's K (each writes a float32 partial sum)
    num_warps: int = 4
    num_stages: int = 4  # Triton's software pipelining of the loop's loads

    def __post_init__(self) -> None:
        checks = {
            "block_k": is_power_of_two(self.block_k) and self.block_k <= 512,
            "block_n": is_power_of_two(self.block_n) and 16 <= self.block_n <= 1024,
            "k_splits": self.k_splits >= 1,
            "num_warps": is_power_of_two(self.num_warps) and self.num_warps <= 32,
            "num_stages": 1 <= self.num_stages <= 8,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not ok:
                raise ValueError(f"GemvTuning.{name}: bad value {value!r}")

    @property
    def name(self) -> str:
        return f"bk{self.block_k}_bn{self.block_n}_ks{self.k_splits}_w{self.num_warps}_st{self.num_stages}"


# Programs per SM the default tuning aims for: enough loads in flight to hide DRAM latency (an estimate, to be
# replaced by the measured table below where it exists).
_PROGRAMS_PER_SM = 4


def default_tuning(k: int, n: int) -> GemvTuning:
    """128-column blocks (fewer where N needs it); K split in two until ~4 programs per SM, keeping >= 8 loop steps a
    split. Not the measured optimum: `H200_TUNINGS` holds those."""
    block_n = 128
    while n % block_n and block_n > 16:
        block_n //= 2
    block_k = 32
    splits = 1
    while ((n // block_n) * splits < _PROGRAMS_PER_SM * H200_SMS and k % (block_k * splits * 2) == 0
           and k // (block_k * splits * 2) >= 8):  # fmt: skip
        splits *= 2
    return GemvTuning(block_k=block_k, block_n=block_n, k_splits=splits)


# Where the kernel beat XLA's GEMM on the H200, each projection timed alone over copies of its weight
# (benchmarks/gemm.py --sweep --sweep-impl gemv): (M, K, N) -> its fastest tuning there. The model takes the kernel
# only for these shapes (`measured_gemv_tuning`).
H200_FASTER_THAN_XLA: dict[tuple[int, int, int], GemvTuning] = {}


def measured_gemv_tuning(m: int, k: int, n: int) -> GemvTuning | None:
    """The tuning with which the kernel measured faster than XLA for x [m, k] @ w [k, n] on the H200, or None."""
    return H200_FASTER_THAN_XLA.get((m, k, n))


def tuning_for(m: int, k: int, n: int) -> GemvTuning:
    """The measured tuning where there is one, else `default_tuning`."""
    return measured_gemv_tuning(m, k, n) or default_tuning(k, n)


def gemv_unsupported_reason(x: jax.Array, w: jax.Array, tuning: GemvTuning) -> str | None:
    """Why the kernel cannot take these shapes, or None."""
    (m, k), (k2, n) = x.shape, w.shape
    if x.dtype != w.dtype or x.dtype not in _DTYPES:
        return f"x and w must share a dtype among bfloat16, float16, float32, got {x.dtype} and {w.dtype}"
    if k != k2:
        return f"K of x ({k}) and of w ({k2}) differ"
    if not 1 <= m <= MAX_ROWS:
        return f"M = {m} rows, not 1-{MAX_ROWS}"
    if n % tuning.block_n:
        return f"N = {n} is not a multiple of block_n = {tuning.block_n}"
    if k % (tuning.block_k * tuning.k_splits):
        return f"K = {k} is not a multiple of block_k * k_splits = {tuning.block_k} * {tuning.k_splits}"
    return None


def _kernel(
    x_ref,  # [M, K / S] this split's slice of x
    w_ref,  # [K / S, BN] this split's rows of this program's column block
    o_ref,  # [M, BN] float32: this split's partial sums
    *,
    block_k: int,
    steps: int,
):
    rows = x_ref.shape[0]
    f32 = jnp.float32

    def body(i, accs):
        ks = pl.ds(i * block_k, block_k)
        w = w_ref[ks, :].astype(f32)  # [BK, BN]
        # Row by row: Triton has no indexing into a register tensor.
        return tuple(acc + x_ref[r, ks].astype(f32)[:, None] * w for r, acc in enumerate(accs))  # x_ref[r, ks] [BK]

    # Elementwise FMAs into [BK, BN] per row and one reduction over BK at the end: a reduction inside the loop would
    # cross warps (through shared memory) every step.
    zeros = jnp.zeros((block_k, w_ref.shape[1]), f32)
    accs = lax.fori_loop(0, steps, body, (zeros,) * rows)
    for r, acc in enumerate(accs):
        o_ref[r, :] = acc.sum(axis=0)


def _gemv_pallas(x, w, *, tuning: GemvTuning, interpret: bool):
    (m, k), n = x.shape, w.shape[1]
    splits, bn = tuning.k_splits, tuning.block_n
    k_split = k // splits
    return pl.pallas_call(
        functools.partial(_kernel, block_k=tuning.block_k, steps=k_split // tuning.block_k),
        grid=(n // bn, splits),
        in_specs=[
            pl.BlockSpec((m, k_split), lambda j, s: (0, s)),
            pl.BlockSpec((k_split, bn), lambda j, s: (s, j)),
        ],
        out_specs=pl.BlockSpec((None, m, bn), lambda j, s: (s, 0, j)),
        out_shape=pallas_out_struct((splits, m, n), jnp.float32, x, w),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=interpret,
        name=f"gemv_{tuning.name}",
    )(x, w)


def gemv_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """Plain jnp: float32 products and sums, out in x's dtype."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _checked(x: jax.Array, w: jax.Array, tuning: GemvTuning | None, interpret: bool) -> GemvTuning:
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"gemv takes x [M, K] and w [K, N], got shapes {x.shape} and {w.shape}")
    tuning = tuning or tuning_for(x.shape[0], x.shape[1], w.shape[1])
    if (reason := gemv_unsupported_reason(x, w, tuning)) is not None:
        raise ValueError(f"gemv cannot run these shapes: {reason}")
    if not interpret and not on_gpu():
        raise ValueError(f"gemv needs a GPU (backend is {jax.default_backend()!r}) or interpret=True")
    return tuning


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def gemv_partials(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N]
    *,
    tuning: GemvTuning | None = None,
    interpret: bool = False,
) -> jax.Array:  # [S, M, N] float32
    """The S = tuning.k_splits partial sums of x @ w over equal slices of K, in float32; their sum is x @ w.
    tuning: None picks `tuning_for(M, K, N)`. Raises ValueError for shapes the kernel cannot run."""
    tuning = _checked(x, w, tuning, interpret)
    return _gemv_pallas(x, w, tuning=tuning, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def gemv(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N]
    *,
    tuning: GemvTuning | None = None,
    interpret: bool = False,
) -> jax.Array:  # [M, N] in x's dtype
    """x @ w for 1-4 rows (float32 accumulation), the split-K partials summed by XLA."""
    tuning = _checked(x, w, tuning, interpret)
    return _gemv_pallas(x, w, tuning=tuning, interpret=interpret).sum(axis=0).astype(x.dtype)
