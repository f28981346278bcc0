"""Weight matmuls for Hopper through JAX's own persistent, warp-specialised Pallas Mosaic GPU matmul
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`, pinned with jax 0.11.2): this file is its validating wrapper,
a jnp reference and the table of shapes where it measured faster than XLA's GEMMs on the H200.

M rows, K contraction, N output columns. Contract: out [M, N] = x [M, K] @ w [K, N], float32 accumulation, out in x's
dtype.

Why. At 128-256 rows a decode step's weight matmuls sit at the ridge between bandwidth and compute (128 rows: 128
FLOP a weight byte against the H200's 154), so a GEMM has to keep the tensor cores and HBM both busy. XLA's Triton
GEMMs reach 3.2-3.6 TB/s there, and at 256 rows the o projection runs at 56% of its FLOP floor (docs/benchmarks.md,
thirteenth session). JAX's kernel is built for exactly that overlap: one program per SM looping over output tiles, a
producer warpgroup issuing TMA copies into an SMEM ring and two consumer warpgroups sharing one operand tile (the
weights' tile with the warpgroups stacked on M, x's on N), optionally with a 2-CTA cluster multicasting a shared
tile. It has no split-K, so it suits shapes with enough output tiles for the 132 SMs.

Tuning: JAX's `TuningConfig` (frozen): per consumer warpgroup a [tile_m, tile_n] float32 accumulator in registers,
tile_k per pipeline step, max_concurrent_steps SMEM slots, wg_dimension where the two warpgroups stack, and the
cluster's. It runs in Pallas' Mosaic GPU interpreter on CPU (tests/test_matmul_hopper.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as _jax_kernel

from jpaged.kernels.platform import H200_SMS

HopperTuning = _jax_kernel.TuningConfig
MatmulDimension = _jax_kernel.MatmulDimension

_ACC_ELEMS = 128 * 128  # float32 accumulator elements a consumer warpgroup holds in registers
_SMEM_BYTES = 227 * 1024
_DTYPES = (jnp.bfloat16, jnp.float16)
_INTERPRET_PROGRAMS = 4  # the interpreter runs every program as a thread: a few suffice to cover the persistent loop


def cta_tile(tuning: HopperTuning) -> tuple[int, int]:
    """A program's output tile: the two consumer warpgroups' tiles stacked on wg_dimension, times the cluster's."""
    m = tuning.tile_m * (1 + (tuning.wg_dimension == MatmulDimension.M))
    n = tuning.tile_n * (1 + (tuning.wg_dimension == MatmulDimension.N))
    m *= 1 + (tuning.cluster_dimension == MatmulDimension.M)
    n *= 1 + (tuning.cluster_dimension == MatmulDimension.N)
    return m, n


def tuning_name(tuning: HopperTuning) -> str:
    def dim(d: int) -> str:  # a MatmulDimension, or its int (the sweeps' grids hold ints)
        return MatmulDimension(d).name

    cluster = "" if tuning.cluster_dimension is None else f"_cl{dim(tuning.cluster_dimension)}"
    tiles = f"tm{tuning.tile_m}_tn{tuning.tile_n}_tk{tuning.tile_k}_st{tuning.max_concurrent_steps}"
    return f"{tiles}_wg{dim(tuning.wg_dimension)}{cluster}_g{dim(tuning.grid_minor_dim)}{tuning.grid_tile_width}"


def _smem_bytes(tuning: HopperTuning, itemsize: int) -> int:
    m, n = cta_tile(tuning)
    if tuning.cluster_dimension == MatmulDimension.M:
        m //= 2
    elif tuning.cluster_dimension == MatmulDimension.N:
        n //= 2
    ring = tuning.max_concurrent_steps * (m + n) * tuning.tile_k * itemsize
    epi_m, epi_n = tuning.epi_tile_m or tuning.tile_m, tuning.epi_tile_n or tuning.tile_n
    return ring + 2 * 2 * epi_m * epi_n * itemsize  # two warpgroups, two output slots each


# Where this kernel beat XLA's GEMM on the H200, each projection timed alone over copies of its weight past the L2
# (benchmarks/gemm.py --sweep --sweep-impl hopper; docs/benchmarks.md, sixteenth session): (K, N, rows M) -> its
# best tuning there. Elsewhere at 128 and 256 rows it lost or tied: with no split-K, the 32 column blocks of the down
# and o projections at 128 rows leave SMs idle, and XLA's GEMMs run q/k/v and gate/up at 256 rows at the FLOP floor.
H200_FASTER_THAN_XLA: dict[tuple[int, int, int], HopperTuning] = {
    # Llama-2-7B's o projection at a 256-row step: 17.9 us against XLA's 22.6 (FLOP floor 13.0), 128 output tiles
    (4096, 4096, 256): HopperTuning(
        tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=6, grid_tile_width=4, wg_dimension=MatmulDimension.N
    ),
}


def measured_faster_tuning(m: int, k: int, n: int) -> HopperTuning | None:
    """The tuning with which this kernel measured faster than XLA for x [m, k] @ w [k, n] on the H200, or None."""
    return H200_FASTER_THAN_XLA.get((k, n, m))


def matmul_hopper_unsupported_reason(x: jax.Array, w: jax.Array, tuning: HopperTuning) -> str | None:
    """Why the kernel cannot run these shapes with this tuning, or None."""
    (m, k), (k2, n) = x.shape, w.shape
    if x.dtype != w.dtype or x.dtype not in _DTYPES:
        return f"x and w must share a dtype among bfloat16, float16, got {x.dtype} and {w.dtype}"
    if k != k2:
        return f"K of x ({k}) and of w ({k2}) differ"
    if tuning.tile_m * tuning.tile_n > _ACC_ELEMS:
        return f"tile_m x tile_n = {tuning.tile_m} x {tuning.tile_n} overflows a warpgroup's registers"
    cm, cn = cta_tile(tuning)
    if m % cm or n % cn:
        return f"[{m}, {n}] is not a whole number of {cm} x {cn} output tiles"
    if k % tuning.tile_k:
        return f"K = {k} is not a multiple of tile_k = {tuning.tile_k}"
    for name in ("epi_tile_m", "epi_tile_n"):
        epi, tile = getattr(tuning, name), getattr(tuning, name.replace("epi_", ""))
        if epi is not None and tile % epi:
            return f"{name} = {epi} does not divide {tile}"
    if (smem := _smem_bytes(tuning, x.dtype.itemsize)) > _SMEM_BYTES:
        return f"{smem} bytes of shared memory (> {_SMEM_BYTES})"
    return None


def matmul_hopper_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """Plain jnp: float32 products, out in x's dtype."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def matmul_hopper(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N]
    *,
    tuning: HopperTuning,
    interpret: bool = False,
) -> jax.Array:  # [M, N] in x's dtype
    """x @ w on Hopper with JAX's persistent matmul; `interpret=True` runs Pallas' Mosaic GPU interpreter on CPU.

    Raises ValueError for shapes the kernel cannot run (`matmul_hopper_unsupported_reason`).
    """
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"matmul_hopper takes x [M, K] and w [K, N], got shapes {x.shape} and {w.shape}")
    if (reason := matmul_hopper_unsupported_reason(x, w, tuning)) is not None:
        raise ValueError(f"matmul_hopper cannot run these shapes: {reason}")
    cluster = 1 + (tuning.cluster_dimension is not None)
    programs = _INTERPRET_PROGRAMS if interpret else H200_SMS
    body = functools.partial(_jax_kernel.kernel, config=tuning)
    body.__name__ = f"matmul_hopper_{tuning_name(tuning)}"  # type: ignore[attr-defined]
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype),
        grid=(programs // cluster,),
        grid_names=("cluster_grid",),
        cluster=(cluster,),
        cluster_names=("cluster",),
        num_threads=3,  # the producer warpgroup and two consumers
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams(uninitialized_memory="nan") if interpret else None,
    )
    return kernel(x, w, None)


def default_tuning(m: int, k: int, n: int) -> HopperTuning:
    """A starting point: 128 x 128 output tiles (64 x 128 at 64 rows), the consumer warpgroups side by side on N so
    they share x's tile, four pipeline slots."""
    del k, n
    return HopperTuning(
        tile_m=min(128, max(64, m)), tile_n=64, tile_k=64, max_concurrent_steps=4, wg_dimension=MatmulDimension.N
    )
