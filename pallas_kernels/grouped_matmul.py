"""Grouped matmul for mixture-of-experts layers: `jax.lax.ragged_dot`'s contract, with a kernel that reads only the
weights of groups that have rows.

M rows, K contraction, N output columns, E groups (experts), T tiles of rows.

Rows are consecutive groups: group e owns rows [ends[e-1], ends[e]) of lhs with ends = cumsum(group_sizes), and
out[r] = lhs[r] @ rhs[e]. Rows past sum(group_sizes) are padding (M is a padded bucket) and come back as zeros.
sum(group_sizes) must be <= M and every size >= 0 (traced values, so not checked; outside that the result is
unspecified, but the kernel never reads or writes out of bounds).

Three implementations of one contract:
- "xla": `jax.lax.ragged_dot`. The engine's CPU path (numerically what the model always used).
- "reference": plain jnp, loop-free: each row's group from a searchsorted over the cumulative sizes, then one einsum
  over (group, K) of the rows masked per group. It computes every group for every row (E times the work), so it is
  the tests' oracle, not a fast path.
- "pallas": a Triton-lowered Pallas kernel. The rows of each group are cut into tiles of at most `block_m` rows of
  one group (jnp builds a tile -> (group, first row, rows) table, like paged_attention's query blocks); the grid runs
  over (tile x N-block, K split). A program loads its tile's rows with a row mask (the dot still sees block_m >= 16
  rows: padding is in registers, nothing is copied), loops over its K range in block_k chunks accumulating in
  float32, and stores its valid rows. Tiles are only made for rows that exist: with M = 2 (batch-1 decode, top-2)
  there are at most 2 tiles, so only the 2 active experts' weights are read, each byte once per N-block program;
  unused tile slots (the table has a static size) return before loading anything.

Weight reuse across the tiles of one group (large M): the grid is ordered so that re-reads hit L2 rather than
iterating a group's row tiles inside one program. A program's weights are a [K, block_n] slice (1 MB for Mixtral's
gate at block_n = 128), and the ~260 programs an H200 runs at once would need far more than its 50 MB L2 for a
program to find its own slice still cached on its next row tile; looping inside the program would also serialise a
skewed group (one expert with all rows) onto N / block_n programs. Instead the flat program id is swizzled as in
Triton's matmul tutorial: `group_m` consecutive tiles sweep all N-blocks together, so the programs in flight share
a few weight slices and the group's rows, and both come from L2 after their first read.

Few tiles (decode) make few programs; `k_splits` > 1 splits K across more programs that write float32 partial sums,
added (and cast) by XLA afterwards.

GPU (Triton) constraints, checked by `grouped_matmul_unsupported_reason` (`impl="auto"` falls back to "xla" when one
fails, `impl="pallas"` raises): block sizes powers of two >= 16 (the dataclass enforces it); N a multiple of block_n
and K of block_k * k_splits (no masked columns: `default_tuning` picks blocks that divide, so only dimensions that
are not multiples of 16 fail, e.g. stories260K-moe's F = 172); lhs and rhs of one dtype among float32, bfloat16,
float16; every array under 2**31 elements. float32 products follow jax_default_matmul_precision (TF32 on GPUs unless
"highest"). Not yet measured on a GPU: `default_tuning` is a starting point from Triton's matmul configurations;
benchmarks/moe.py --sweep measures alternatives.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.kernels.paged_attention import count_le, pallas_out_struct
from jpaged.kernels.platform import is_power_of_two, on_gpu

IMPLS = ("auto", "xla", "reference", "pallas")
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MIN_BLOCK = 16  # Triton's dot needs every dimension >= 16
# Programs worth launching for a small-M matmul before splitting K: two per SM of an H200 (132 SMs). A guess.
_TARGET_PROGRAMS = 264
_MAX_K_SPLITS = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupedMatmulTuning:
    """Block sizes of the Pallas kernel; one kernel, many tunings."""

    block_m: int = 16  # rows per tile (of one group); a power of two >= 16
    block_n: int = 64  # output columns per program; a power of two >= 16 dividing N
    block_k: int = 128  # contraction chunk per loop iteration; a power of two >= 16 dividing K / k_splits
    group_m: int = 8  # tiles that sweep the N-blocks together (L2 reuse of their rows and weights); >= 1
    k_splits: int = 1  # programs sharing one tile's K range, a power of two; > 1 adds float32 partial sums after
    num_warps: int = 4  # Triton lowering only
    num_stages: int = 3  # Triton lowering only (software pipelining depth of the K loop)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or not is_power_of_two(value) or value < _MIN_BLOCK:
                raise ValueError(f"GroupedMatmulTuning.{name} must be a power of two >= {_MIN_BLOCK}, got {value!r}")
        for name in ("k_splits", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or not is_power_of_two(value):
                raise ValueError(f"GroupedMatmulTuning.{name} must be a power of two >= 1, got {value!r}")
        if self.num_warps > 32:
            raise ValueError(f"GroupedMatmulTuning.num_warps must be <= 32, got {self.num_warps}")
        for name in ("group_m", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupedMatmulTuning.{name} must be an int >= 1, got {value!r}")

    @property
    def name(self) -> str:
        return (
            f"bm{self.block_m}_bn{self.block_n}_bk{self.block_k}_g{self.group_m}_ks{self.k_splits}"
            f"_w{self.num_warps}_s{self.num_stages}"
        )


def _dividing_block(dim: int, preferred: int) -> int:
    """The largest power of two in [16, preferred] that divides dim; `preferred` when none does."""
    block = preferred
    while block >= _MIN_BLOCK:
        if dim % block == 0:
            return block
        block //= 2
    return preferred


def num_tiles(m: int, num_groups: int, block_m: int) -> int:
    """Static size of the tile table: enough for any group sizes summing to <= m.

    Sum over groups of ceil(size / block_m) <= m // block_m + (groups with rows), and every used tile holds a row,
    so min(m, m // block_m + E) tiles always suffice; unused ones get 0 rows.
    """
    return max(1, min(m, m // block_m + num_groups))


def default_tuning(m: int, k: int, n: int, num_groups: int) -> GroupedMatmulTuning:
    """The tuning for a shape family, from static shapes (a dense matmul is num_groups = 1).

    Tiles are sized to the rows a group gets when routing is even (m / num_groups). Decode-sized tiles (<= 64 rows)
    stream weights: 128-column N-blocks, with long K chunks for 16-32-row tiles and short deep-pipelined ones for
    64-row tiles, the winners of moe.py --sweep on the H200 (Mixtral-8x7B experts at 1, 16 and 128 tokens, 3.3-4.2
    TB/s; docs/benchmarks.md). When the tiles that rows would fill leave fewer than ~2 programs per SM, K is split
    (halving block_k down to 32 where K will not split further). Prefill-sized groups use the usual matmul tiles.
    """
    rows_per_group = max(1, m // max(1, num_groups))
    block_m = min(128, max(_MIN_BLOCK, 1 << (rows_per_group - 1).bit_length()))
    if block_m <= 32:
        block_n, block_k, num_warps, num_stages = 128, 256, 4, 3
    elif block_m == 64:
        block_n, block_k, num_warps, num_stages = 128, 32, 4, 4
    else:
        block_n, block_k, num_warps, num_stages = 128, 64, 8, 3
    block_n = _dividing_block(n, block_n)
    block_k = _dividing_block(k, block_k)
    # Programs that carry rows when every tile is full: the unused slots of the static table return at once.
    programs = max(1, -(-m // block_m)) * max(1, n // block_n)
    k_splits = 1

    def splits_further(block_k: int) -> bool:  # K divides into twice the splits, a few iterations each
        return k % (2 * k_splits * block_k) == 0 and k // (2 * k_splits * block_k) >= 4

    while programs * k_splits < _TARGET_PROGRAMS and k_splits < _MAX_K_SPLITS:
        smaller = block_k // 2
        while not splits_further(block_k) and smaller >= 32 and not splits_further(smaller):
            smaller //= 2  # look for the largest shorter chunk that lets K split again
        if splits_further(block_k):
            k_splits *= 2
        elif smaller >= 32:
            block_k = smaller
        else:
            break
    return GroupedMatmulTuning(block_m=block_m, block_n=block_n, block_k=block_k, k_splits=k_splits,
                               num_warps=num_warps, num_stages=num_stages)  # fmt: skip


def _validate(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    """Static shape/dtype checks only (the sizes are traced)."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be [E, K, N], got shape {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"K of lhs ({lhs.shape[1]}) and of rhs ({rhs.shape[1]}) differ")
    if rhs.shape[0] < 1:
        raise ValueError(f"rhs must have at least one group, got shape {rhs.shape}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"lhs and rhs dtypes differ: {lhs.dtype} vs {rhs.dtype}")
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise ValueError(f"lhs and rhs must be floating point, got {lhs.dtype}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must be [E={rhs.shape[0]}] like rhs' groups, got shape {group_sizes.shape}")
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32, got {group_sizes.dtype}")


def grouped_matmul_reference(
    lhs: jax.Array,  # [M, K]
    rhs: jax.Array,  # [E, K, N]
    group_sizes: jax.Array,  # [E] int32
) -> jax.Array:  # [M, N] in lhs.dtype
    """Plain jnp: every row's group, then one einsum over (group, K) of the rows masked per group (E x the work)."""
    _validate(lhs, rhs, group_sizes)
    num_rows, num_groups = lhs.shape[0], rhs.shape[0]
    ends = jnp.cumsum(group_sizes)  # [E] end (exclusive) row of each group
    group = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")  # [M]; E for padding rows
    member = group[None, :] == jnp.arange(num_groups)[:, None]  # [E, M]; padding rows are in no group
    lhs_per_group = jnp.where(member[:, :, None], lhs[None], 0)  # [E, M, K]
    out = jnp.einsum("emk,ekn->mn", lhs_per_group, rhs, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _row_tiles(group_sizes: jax.Array, *, num_rows: int, block_m: int):
    """Cuts every group's rows into tiles of <= block_m rows (jnp, traceable): per tile its group, first row and
    number of rows (0 for unused slots of the static-size table)."""
    num_groups = group_sizes.shape[0]
    count = num_tiles(num_rows, num_groups, block_m)
    sizes = jnp.maximum(group_sizes, 0)
    ends = jnp.cumsum(sizes)  # [E]
    tiles_per_group = (sizes + block_m - 1) // block_m  # [E]
    cu_tiles = jnp.cumsum(tiles_per_group)  # [E] end (exclusive) tile of each group
    tile = jnp.arange(count, dtype=jnp.int32)
    group = jnp.minimum(count_le(cu_tiles, tile), num_groups - 1)  # not searchsorted: a loop of kernels on GPUs
    offset = (tile - (cu_tiles[group] - tiles_per_group[group])) * block_m  # row offset inside the group
    start = ends[group] - sizes[group] + offset
    length = jnp.where(tile < cu_tiles[-1], jnp.clip(sizes[group] - offset, 0, block_m), 0)
    # Past M (sizes summing to more than M): never touch rows that do not exist.
    length = jnp.clip(jnp.minimum(length, num_rows - start), 0, block_m)
    return group, start.astype(jnp.int32), length.astype(jnp.int32)


def _swizzle(pid, *, group_m: int, num_tiles: int, num_n_blocks: int):
    """Program id -> (row tile, N-block), Triton's matmul-tutorial order: group_m consecutive tiles sweep every
    N-block before the next ones start (see the module docstring)."""
    per_sweep = group_m * num_n_blocks
    first_tile = (pid // per_sweep) * group_m
    tiles_in_sweep = jnp.minimum(num_tiles - first_tile, group_m)
    return first_tile + (pid % per_sweep) % tiles_in_sweep, (pid % per_sweep) // tiles_in_sweep


def _matmul_tile(lhs_ref, rhs_ref, out_ref, group, start, rows, n_block, split, *, block_m: int, block_n: int,
                 block_k: int, k_per_split: int):  # fmt: skip
    """One program's work: rows [start, start + rows) of lhs (rows <= block_m) times rhs[group]'s N-block, over the
    K range of `split`. Refs as in `_grouped_matmul_kernel`."""
    n0 = pl.multiple_of(n_block * block_n, block_n)
    row_valid = (jnp.arange(block_m) < rows)[:, None]  # [block_m, 1]
    lhs_mask = jnp.broadcast_to(row_valid, (block_m, block_k))
    out_mask = jnp.broadcast_to(row_valid, (block_m, block_n))

    def body(i, acc):  # acc [block_m, block_n] float32
        k0 = pl.multiple_of(split * k_per_split + i * block_k, block_k)
        x = plgpu.load(lhs_ref.at[pl.ds(start, block_m), pl.ds(k0, block_k)], mask=lhs_mask, other=0)
        w = rhs_ref[group, pl.ds(k0, block_k), pl.ds(n0, block_n)]  # [block_k, block_n]
        return acc + plgpu.dot(x, w)  # [block_m, block_k] @ [block_k, block_n]

    acc = jax.lax.fori_loop(0, k_per_split // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    out = out_ref.at[split, pl.ds(start, block_m), pl.ds(n0, block_n)]  # [block_m, block_n]
    plgpu.store(out, acc.astype(out_ref.dtype), mask=out_mask)


def _grouped_matmul_kernel(
    tile_group_ref,  # [T] int32 group (expert) of each tile
    tile_start_ref,  # [T] int32 first row of each tile
    tile_len_ref,  # [T] int32 rows of each tile; 0 = unused slot
    lhs_ref,  # [M, K]
    rhs_ref,  # [E, K, N]
    out_ref,  # [S, M, N] S = k_splits; float32 partial sums when S > 1, else lhs.dtype
    *,
    group_m: int,
    num_tiles: int,
    num_n_blocks: int,
    **blocks: int,
):
    pid = pl.program_id(0)
    split = pl.program_id(1)  # (read outside pl.when: the interpreter has no rule for it inside a branch)
    tile, n_block = _swizzle(pid, group_m=group_m, num_tiles=num_tiles, num_n_blocks=num_n_blocks)
    rows = tile_len_ref[tile]

    @pl.when(rows > 0)  # unused tile slots load nothing, so groups without rows cost no weight traffic
    def _():
        group, start = tile_group_ref[tile], tile_start_ref[tile]
        _matmul_tile(lhs_ref, rhs_ref, out_ref, group, start, rows, n_block, split, **blocks)


def _dense_matmul_kernel(
    lhs_ref,  # [M, K]
    rhs_ref,  # [1, K, N]
    out_ref,  # [S, M, N] as in _grouped_matmul_kernel
    *,
    group_m: int,
    num_tiles: int,
    num_n_blocks: int,
    **blocks: int,
):
    # One group holding every row: the tiles are static (tile t = rows [t * block_m, ...)), no table to read.
    tile, n_block = _swizzle(pl.program_id(0), group_m=group_m, num_tiles=num_tiles, num_n_blocks=num_n_blocks)
    block_m = blocks["block_m"]
    start = tile * block_m
    rows = jnp.minimum(lhs_ref.shape[0] - start, block_m)
    _matmul_tile(lhs_ref, rhs_ref, out_ref, 0, start, rows, n_block, pl.program_id(1), **blocks)


def _launch(kernel, tables, lhs, rhs, *, count: int, tuning: GroupedMatmulTuning, interpret: bool):
    """Runs `kernel` over (count tiles x N-blocks, K splits); returns the [S, M, N] partial products."""
    num_rows, n = lhs.shape[0], rhs.shape[2]
    num_n_blocks = n // tuning.block_n
    splits = tuning.k_splits
    kernel = functools.partial(kernel, block_m=tuning.block_m, block_n=tuning.block_n, block_k=tuning.block_k,
                               group_m=tuning.group_m, num_tiles=count, num_n_blocks=num_n_blocks,
                               k_per_split=lhs.shape[1] // splits)  # fmt: skip
    return pl.pallas_call(
        kernel,
        grid=(count * num_n_blocks, splits),
        out_shape=pallas_out_struct((splits, num_rows, n), jnp.float32 if splits > 1 else lhs.dtype, *tables, lhs, rhs),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=interpret,
        name=f"{'grouped' if tables else 'dense'}_matmul_{tuning.name}",
    )(*tables, lhs, rhs)


def _grouped_matmul_pallas(lhs, rhs, group_sizes, *, tuning: GroupedMatmulTuning, interpret: bool):
    num_rows = lhs.shape[0]
    tiles = _row_tiles(group_sizes, num_rows=num_rows, block_m=tuning.block_m)
    out = _launch(_grouped_matmul_kernel, tiles, lhs, rhs, count=tiles[0].shape[0], tuning=tuning,
                  interpret=interpret)  # fmt: skip
    out = out[0] if tuning.k_splits == 1 else out.sum(axis=0)
    # No program writes padding rows: zero them (their buffer contents are undefined).
    valid = jnp.arange(num_rows) < jnp.sum(jnp.maximum(group_sizes, 0))
    return jnp.where(valid[:, None], out, 0).astype(lhs.dtype)


def grouped_matmul_unsupported_reason(lhs: jax.Array, rhs: jax.Array, tuning: GroupedMatmulTuning) -> str | None:
    """Why the Triton lowering cannot run these shapes on a GPU, or None if it can."""
    _, k, n = rhs.shape
    if lhs.dtype not in _KERNEL_DTYPES or rhs.dtype not in _KERNEL_DTYPES:
        return f"dtype {lhs.dtype}/{rhs.dtype} is not one of float32, bfloat16, float16"
    if n % tuning.block_n:
        return f"N = {n} is not a multiple of block_n = {tuning.block_n}"
    if k % (tuning.block_k * tuning.k_splits):
        return f"K = {k} is not a multiple of block_k * k_splits = {tuning.block_k} * {tuning.k_splits}"
    for name, size in (("lhs", lhs.size), ("rhs", rhs.size), ("the output", lhs.shape[0] * n * tuning.k_splits)):
        if size >= 2**31:
            return f"{name} has {size} elements (>= 2**31: 32-bit offsets)"
    return None


@functools.partial(jax.jit, static_argnames=("tuning", "impl", "interpret"))
def grouped_matmul(
    lhs: jax.Array,  # [M, K]
    rhs: jax.Array,  # [E, K, N]
    group_sizes: jax.Array,  # [E] int32
    *,
    tuning: GroupedMatmulTuning | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:  # [M, N] in lhs.dtype
    """`jax.lax.ragged_dot(lhs, rhs, group_sizes)`: rows [ends[e-1], ends[e]) of lhs times rhs[e], with
    ends = cumsum(group_sizes); rows past sum(group_sizes) <= M come back as 0. Accumulates in float32.

    impl: "xla" (`jax.lax.ragged_dot`), "reference" (jnp, E x the work), "pallas" (the Triton-style kernel), or
    "auto": "pallas" on GPU when `grouped_matmul_unsupported_reason` finds nothing, else "xla".
    interpret (impl="pallas" only): None runs the kernel compiled on a GPU and in the Pallas interpreter elsewhere.
    tuning: None picks `default_tuning` for the shapes.
    """
    _validate(lhs, rhs, group_sizes)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    num_groups, k, n = rhs.shape
    if tuning is None:
        tuning = default_tuning(lhs.shape[0], k, n, num_groups)
    if impl == "auto":
        use_pallas = on_gpu() and grouped_matmul_unsupported_reason(lhs, rhs, tuning) is None
        impl = "pallas" if use_pallas else "xla"
    if impl == "xla":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)
    if impl == "reference":
        return grouped_matmul_reference(lhs, rhs, group_sizes)
    if interpret is None:
        interpret = not on_gpu()
    if not interpret and not on_gpu():
        backend = jax.default_backend()
        raise ValueError(f"impl='pallas' needs a GPU (backend is {backend!r}) or interpret=True")
    # The kernel has no masked columns: these hold in interpret mode too.
    reason = grouped_matmul_unsupported_reason(lhs, rhs, tuning)
    if reason is not None:
        raise ValueError(f"impl='pallas' cannot run these shapes: {reason}")
    if lhs.shape[0] == 0:
        return jnp.zeros((0, n), lhs.dtype)
    return _grouped_matmul_pallas(lhs, rhs, group_sizes, tuning=tuning, interpret=interpret)


def matmul_unsupported_reason(lhs: jax.Array, rhs: jax.Array, tuning: GroupedMatmulTuning) -> str | None:
    """Why the dense kernel cannot run x [M, K] @ w [K, N] on a GPU, or None if it can."""
    return grouped_matmul_unsupported_reason(lhs, rhs[None], tuning)


@functools.partial(jax.jit, static_argnames=("tuning", "impl", "interpret"))
def matmul(
    lhs: jax.Array,  # [M, K]
    rhs: jax.Array,  # [K, N]
    *,
    tuning: GroupedMatmulTuning | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:  # [M, N] in lhs.dtype
    """lhs @ rhs accumulated in float32: the grouped kernel's one-group case, with its tiles static.

    For decode-sized M, where a weight matmul streams the weights and XLA's GEMMs reach 2.5-3.5 TB/s on the H200
    (benchmarks/gemm.py). impl: "xla" (jnp.dot), "reference" (the same), "pallas", or "auto" ("pallas" on a GPU
    when `matmul_unsupported_reason` finds nothing, else "xla"). tuning: None picks `default_tuning(M, K, N, 1)`.
    """
    if lhs.ndim != 2 or rhs.ndim != 2:
        raise ValueError(f"matmul takes lhs [M, K] and rhs [K, N], got shapes {lhs.shape} and {rhs.shape}")
    _validate(lhs, rhs[None], jnp.zeros((1,), jnp.int32))
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if tuning is None:
        tuning = default_tuning(lhs.shape[0], rhs.shape[0], rhs.shape[1], 1)
    if impl == "auto":
        impl = "pallas" if on_gpu() and matmul_unsupported_reason(lhs, rhs, tuning) is None else "xla"
    if impl in ("xla", "reference"):
        return jnp.dot(lhs, rhs)  # XLA's GEMMs accumulate 16-bit inputs in float32 and round the result
    if interpret is None:
        interpret = not on_gpu()
    if not interpret and not on_gpu():
        raise ValueError(f"impl='pallas' needs a GPU (backend is {jax.default_backend()!r}) or interpret=True")
    reason = matmul_unsupported_reason(lhs, rhs, tuning)
    if reason is not None:
        raise ValueError(f"impl='pallas' cannot run these shapes: {reason}")
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[1]), lhs.dtype)
    count = -(-lhs.shape[0] // tuning.block_m)
    out = _launch(_dense_matmul_kernel, (), lhs, rhs[None], count=count, tuning=tuning, interpret=interpret)
    return out[0] if tuning.k_splits == 1 else out.sum(axis=0).astype(lhs.dtype)
