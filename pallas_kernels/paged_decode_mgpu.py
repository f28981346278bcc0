"""Decode paged attention for Hopper through Pallas' Mosaic GPU backend: TMA page streaming into an SMEM ring.

B sequences, N q-heads, K kv-heads, G = N // K q-heads per kv-head, H head dim, P pages, S page size,
R = 64 rows of a wgmma tile.

Contract: `paged_attention`'s decode case (exactly one query token per sequence): q [B, N, H] holds sequence b's
query in row b, which sits at kv position seq_lens[b] - 1 and sees kv positions 0 .. seq_lens[b] - 1 of the pages
page_tables[b]. Rows b >= num_seqs[0] are padding and come back as zeros. Softmax in float32, output in q's dtype.
`paged_attention_reference` (jpaged.kernels.paged_attention) with cu_q_lens = arange(B + 1) is the oracle.

Why a second kernel. Decode attention is memory-bound: each (sequence, kv head) reads its K and V once and does
4 * G * H FLOP per kv position. The Triton-lowered kernel gathers pages with pointer loads and 2 software pipeline
stages and reaches 2.0-2.7 TB/s of the H200's 4.28 TB/s copy bandwidth. By Little's law, 4.28 TB/s at ~1 us of
loaded DRAM latency needs ~4.3 MB in flight over 132 SMs, i.e. >= ~32 KB per SM at all times. Here every page is
a TMA bulk-tensor copy (issued by one thread, completing on an mbarrier) into a ring of `num_stages` SMEM slots,
each slot holding `pages_per_block` pages of K and of V (32 KB per slot for 4 pages of 16 x 128 bf16), so that
num_stages - 1 slots (and, while a CTA waits, all of them) are in flight while one is being computed on.

Design.
- Grid (B, K, num_splits): one program (a single warpgroup, 128 threads) per (sequence, kv head, split). The G query
  heads that share a kv head are computed together, so each page is read from HBM once per (sequence, kv head).
- q tile: the wgmma's M is fixed at 64 rows; a program TMA-copies its G rows of q viewed as [B * N, H] (from row
  b * N + h * G) into the first G rows of an unswizzled staging buffer, and from there into a swizzled tile (a TMA
  into a swizzled tile needs an 8-row aligned start, which b * N + h * G is not for G < 8). The other 64 - G rows
  hold whatever SMEM held: they only waste tensor-core work and never reach the output (their log2-sum-exps are
  stored with the 64-entry row, and the combine reads only the first G). (q is not padded to 64 rows: at
  B * N < 64 that pad was a launch a layer.)
- Math: both products on the tensor cores (wgmma), as JAX's FlashAttention-3 Mosaic GPU kernel does:
  scores [64, block_kv] = q_tile @ K_block^T, an online softmax in registers (exp2 with log2(e) * sm_scale folded
  in, positions >= seq_len masked), P is stored to a swizzled SMEM tile and acc [64, H] += P @ V_block.
  With G <= 8 of 64 rows useful, the tensor cores do 8-64x the useful work, which decode can afford. Budget: per SM
  4.28 TB/s / 132 = 32 GB/s, i.e. a 64-position block (32 KB of K+V at H 128 bf16) every ~1.0 us = ~1850 cycles
  at 1.83 GHz. The two 64 x 64 x 128 wgmmas are 2 x 524K FMA = 2 x 256 cycles at an SM's 2048 dense bf16
  FMA/cycle (989 TFLOP/s; ~320 at the 788 TFLOP/s measured on random data), ~30% of the budget; the softmax on
  64 x 64 scores (~10 ops an element over 128 lanes) ~300 cycles; the acc rescale and add ~130; the 8 KB P store
  and the fences and barrier waits the rest: ~1100 cycles serial in one warpgroup, ~60% of the budget, and two
  CTAs per SM overlap one's softmax with the other's wgmmas. Register math (no MMA) would cost G * 16K FMA per
  block on the CUDA cores (128 FMA/cycle/SM: 1024 cycles at G = 8) plus bf16 conversions and cross-lane
  reductions: no better at G = 8 and far more code. The transposed formulation (next) cuts the MMA work 8x.
- Positions on M (`DecodeTuning.positions_on_m`; `default_tuning` takes it at G = 1): the same math transposed,
  scores^T [block_kv, Q] = K_block @ q^T and acc^T [H, Q] += V_block^T @ P^T with Q = G rounded up to 8 (wgmma's
  smallest N), so at G <= 8 the tensor cores do 1/8 of the padded work above, the softmax handles block_kv x Q
  scores (its per-query max and sum reduce across the warpgroup's four warps, through Mosaic's SMEM scratch) and
  the accumulator is [H, Q]. q's Q rows from the program's first are TMA-copied straight into the swizzled tile
  (whole tiles, so no staging), pulled back to end at q's last row for the last programs, whose queries then sit
  at tile columns > 0; P^T is stored through a transposed view of a [Q, block_kv] tile; the output is stored
  transposed into a [Q, H] staging buffer and its G rows copied out (split-K: the float32 [H, Q] tile goes out as
  it is, Mosaic GPU not storing float32 transposed, and the combine picks the program's columns). It lowers with the
  lane semantics only: the warpgroup lowering's layout inference rejects the q copy from an unaligned row.
- Paging: the program first TMA-copies its window of the page table (the pages its split can touch) into SMEM with
  one contiguous bulk copy, then issues, per ring slot, one [S, H] TMA per page for K and one for V into the slot's
  tile rows; K and V of a slot have one barrier each (pages_per_block copies arrive on it). K/V pages are addressed
  through the [K * P * S, H] view of the cache, row (h * P + page) * S: a multiple of 8, as the swizzled tile needs.
  Block j's slot is refilled with block j + num_stages as soon as it is consumed: K's half after the QK wgmma
  (while the softmax and PV run), V's after the PV wgmma.
- Split-K (flash-decoding, num_splits > 1): split s of a sequence walks the s-th of num_splits equal contiguous shares
  of its ceil(seq_len / block_kv) blocks (sized from the actual length, so a short sequence leaves later splits
  empty); each writes its normalised float32 output rows and their log2-sum-exp, and a combine weighs them (one
  Triton-lowered launch, a program per query head). An empty split writes zeros and a log2-sum-exp of MASK_VALUE
  (weight 0). The float32 output staging shares the ring's SMEM (a RefUnion: it is written only after the last
  block), so splitting costs no occupancy.
- SMEM per program (`smem_bytes`), q rows on M, H 128, S 16: 2 x 32 KB ring + 16 KB q staging + 16 KB q tile +
  8 KB P tile + the page-table window (4 bytes a page) + ~2 KB = ~111 KB at 1024 pages: two CTAs per SM (228 KB),
  four ring slots and up to 128 KB of K/V loads in flight per SM. num_stages 3 or pages_per_block 8 give one CTA
  per SM with as many slots: measured on an H200, 10-25% slower than the default (3.88-4.16 TB/s on the four anchor
  decode shapes), so two CTAs per SM, not a deeper ring, is what hides the latency.
- Padding rows (b >= num_seqs) and empty sequences run zero blocks and write zeros: no masking pass after the kernel.

Constraints (`paged_decode_mgpu_unsupported_reason`): q/k/v bfloat16 or float16 (the wgmma operand types), one
dtype; H 64 or 128 (at 256 the two float32 accumulators, 2 x 64 x 256 over 128 threads, would spill); S a multiple
of 8; pages_per_block * S a multiple of 64 (the swizzle-128 wgmma K granularity) and <= 256; G <= 64; the SMEM
ring, q tiles and page-table window within 227 KB. With positions on M also B * N a multiple of 8 (the q copy's
source must tile by the swizzled tile's 8 rows) and the lane lowering (DecodeTuning refuses the other).

Tests (tests/test_paged_decode_mgpu.py): on CPU, Pallas' Mosaic GPU interpreter (InterpretGPUParams, uninitialised
memory NaN) runs this kernel's TMA copies, barriers and wgmmas against the reference over page sizes 8/16/32 x
G 1/4/8 x lengths 1, S - 1, S, S + 1, long, padding rows, split-K, 1-4 stages, H 64, float16, and positions on M
at G 1/4/8/12 with the last programs' q copies pulled back (live rows), and the CUDA lowering succeeds for the
anchor shapes under both lowerings (positions on M: the lane one); the interpreter does not model wgmma's
asynchrony or check that an SMEM read waited for its TMA, and cannot take P from registers, so the same sweeps and
that tuning run compiled on the H200 (marked gpu), where the kernel's figures come from (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton

from jpaged.kernels.paged_attention import MASK_VALUE, paged_attention_reference, pallas_out_struct
from jpaged.kernels.paged_attention import _validate as validate_ragged
from jpaged.kernels.platform import is_power_of_two

ROWS = 64  # wgmma's fixed M: the q tile's rows (G of them are this program's heads)
_SWIZZLE = 128  # bytes: the widest wgmma swizzle; a tile row of 64 16-bit elements
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
_SMEM_LIMIT = 227 * 1024  # H100/H200 max dynamic SMEM per block
_SM_SMEM = 228 * 1024  # SMEM per SM
_LOG2E = math.log2(math.e)
SEMANTICS = ("warpgroup", "lane")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeTuning:
    """Block sizes of the Mosaic GPU decode kernel; one kernel, many tunings."""

    pages_per_block: int = 4  # pages per pipeline step: block_kv = pages_per_block * S positions (a multiple of 64)
    num_stages: int = 2  # SMEM ring slots (K and V of one block each); num_stages - 1 blocks load while one computes
    # Split-K (flash-decoding): programs per (sequence, kv head), each over a contiguous share of the sequence's blocks;
    # > 1 (a power of two) adds float32 partial outputs and a log-sum-exp combine after the kernel.
    num_splits: int = 1
    # Mosaic GPU's lowering: "warpgroup" (jax 0.11's default: MLIR dialect + layout inference) or "lane" (explicit
    # per-thread layouts). Both lower on CPU; one may compile where the other does not.
    semantics: str = "warpgroup"
    # The PV wgmma takes P from registers (wgmma's register A operand, as JAX's FlashAttention-3 kernel does) instead
    # of a swizzled SMEM tile: no P store and proxy fence a block, 8 KB less SMEM a program. Off by default: on the
    # H200 it gained 1-3.6% alone at G = 1 and 7% for long unsplit sequences but lost 2.6% at Llama-3-8B B 64, and
    # 0.5% of the attention's time in the engine's batch-128 step (docs/benchmarks.md, eleventh session); the
    # interpreter cannot run it.
    p_in_registers: bool = False
    # The transposed formulation: scores^T [block_kv, Q] = K_block q^T and acc^T [H, Q] += V_block^T P^T, the kv
    # positions on wgmma's M and the G queries on its N, Q = `q_columns(G)` (8 for G <= 8), so the tensor cores do
    # Q / 64 of the q-rows-on-M formulation's padded work (1/8 at G <= 8), the softmax runs on block_kv x Q scores
    # (its reductions across the warpgroup's warps, through SMEM) and a program holds ~35 KB less SMEM and an eighth
    # of the accumulator registers. Needs B * N a multiple of 8 (the q copy's source must tile by the swizzled tile's
    # 8 rows) and semantics="lane". Split-K writes each program's whole float32 [H, Q] tile (Q / G times the partial
    # outputs of q rows on M: 8x at G 1) for the combine to pick its columns from.
    # On the H200 alone: Llama-2-7B (G 1) 4.19 / 4.30 TB/s against the q-rows-on-M formulation's 4.08 / 4.12 (B 128
    # at 640 tokens, B 64 at 2048), Llama-3-8B (G 4) 3.52 against 3.82: `default_tuning` takes it at G = 1 only.
    positions_on_m: bool = False

    def __post_init__(self) -> None:
        for name in ("pages_per_block", "num_stages", "num_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecodeTuning.{name} must be an int >= 1, got {value!r}")
        for name in ("pages_per_block", "num_splits"):  # num_splits: the combine's Triton block is [num_splits, H]
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(f"DecodeTuning.{name} must be a power of two, got {getattr(self, name)}")
        if self.num_stages > 8:
            raise ValueError(f"DecodeTuning.num_stages must be <= 8, got {self.num_stages}")
        for name in ("p_in_registers", "positions_on_m"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DecodeTuning.{name} must be a bool, got {getattr(self, name)!r}")
        if self.positions_on_m and self.semantics != "lane":
            raise ValueError("DecodeTuning: positions_on_m lowers with semantics='lane' only (the warpgroup "
                             "lowering's layout inference rejects its q copy from an unaligned row)")  # fmt: skip
        if self.p_in_registers and self.positions_on_m:
            raise ValueError("DecodeTuning: P is wgmma's B operand with positions on M, which must be in SMEM: "
                             "p_in_registers and positions_on_m exclude one another")  # fmt: skip
        if self.semantics not in SEMANTICS:
            raise ValueError(f"DecodeTuning.semantics must be one of {SEMANTICS}, got {self.semantics!r}")

    @property
    def name(self) -> str:
        name = f"ppb{self.pages_per_block}_st{self.num_stages}"
        if self.num_splits > 1:
            name += f"_split{self.num_splits}"
        if self.p_in_registers:
            name += "_preg"
        if self.positions_on_m:
            name += "_posm"
        return name + ("_lane" if self.semantics == "lane" else "")


# Programs an H200 (132 SMs) runs at once at two CTAs per SM: one wave.
_WAVE_PROGRAMS = 264
_MAX_SPLITS = 16


def default_tuning(num_seqs: int, num_heads: int, num_kv_heads: int) -> DecodeTuning:
    """The tuning when none is given: positions on M where every q head has its own kv head (G = 1) and the q rows
    tile by 8, and split-K only when B * K programs would leave SMs idle, with the most splits (a power of two,
    <= 16) that keep B * K * splits within one wave of ~264 programs.

    Positions on M at G = 1 only: on the H200 (docs/benchmarks.md, thirteenth session) Llama-2-7B fixed:128 ran
    6,468 output tok/s with it against 6,046 without in the same call, and single-stream latency tied (257.1 against
    256.4 tok/s at a 128-token prompt); alone it lost at G = 4 (Llama-3-8B B 64, 3.52 TB/s against 3.82), and G = 2
    is unmeasured.

    One wave, not more: programs are launched for the page table's width (max_model_len), not for the batch's actual
    lengths, so at short contexts most splits are empty, and a second wave of them costs its launch latency. Measured
    on the H200 (docs/benchmarks.md, tenth session): Llama-2-7B single stream (B 1 x K 32) at a 128-token prompt,
    254.4 tok/s with 8 splits (256 programs) and 256.6 with 4, against 235.0-247.2 with 16 (512, two waves); at
    B 16 x K 8 = 128 programs 2 splits 3.97-4.00 TB/s, 4 splits 3.97-4.03, 16 splits 3.78-3.80 (two runs). Between
    133 and 264 programs it runs no split: B 8 x K 32 at 4096 tokens 3.77 TB/s (2 splits 3.75-3.77, 4 splits 3.66);
    B 24 x K 8 at 8192, 3.64-3.72 against 3.33 with the 2 splits the previous rule took, but 3.94 with 4 (768
    programs, ~3 waves, which balance the SMs where 192 programs leave 72 of them one CTA). That gain is a long
    context's alone (eleventh session, tables 2048 tokens wide): B 24 x K 8 at 2048 tokens 3.43 TB/s unsplit
    against 3.22 with 4 splits, at 640 tokens 2.77 against 2.20; B 6 x K 32 within 7.3% for 1, 2 and 4 splits. The
    split count is static and the context is not, so the rule stays one wave.
    """
    programs = num_seqs * num_kv_heads
    splits = 1
    while programs * splits * 2 <= _WAVE_PROGRAMS and splits < _MAX_SPLITS:
        splits *= 2
    if num_heads == num_kv_heads and (num_seqs * num_heads) % 8 == 0:
        return DecodeTuning(num_splits=splits, positions_on_m=True, semantics="lane")
    return DecodeTuning(num_splits=splits)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# Page-table copies move multiples of 32 int32 entries: 128 bytes, as the lane lowering wants copies of a multiple of
# the warpgroup's 128 threads in bytes (and TMA wants 16-byte multiples).
_TABLE_QUANTUM = 32


def _table_width(max_pages: int, pages_per_block: int) -> int:
    """Page-table columns the kernel reads: whole blocks and whole copy quanta."""
    return _round_up(max_pages, math.lcm(pages_per_block, _TABLE_QUANTUM))


def _window(max_pages: int, pages_per_block: int, num_splits: int) -> int:
    """Page-table entries one program copies to SMEM: its split's pages plus up to 3 of alignment slack."""
    width = _table_width(max_pages, pages_per_block)
    if num_splits == 1:
        return width
    blocks = width // pages_per_block
    return min(width, _round_up(-(-blocks // num_splits) * pages_per_block + 3, _TABLE_QUANTUM))


def q_columns(group: int) -> int:
    """Q: the query tile's rows with positions on M (wgmma's N, a multiple of 8)."""
    return _round_up(group, 8)


def _q_tile_rows(group: int, tuning: DecodeTuning) -> int:
    """The q tile's rows: wgmma's 64-row M with q rows on M, Q with positions on M (what both the kernel's scratch
    and `smem_bytes` size by)."""
    return q_columns(group) if tuning.positions_on_m else ROWS


def smem_bytes(q_dtype, head_dim: int, page_size: int, max_pages: int, tuning: DecodeTuning, *, group: int) -> int:
    """SMEM one program allocates: its buffers, each rounded to 1 KB, and 3 KB for barriers and Mosaic's reduction
    scratch (an upper bound: 112,688 bytes lowered vs 113,664 estimated for the default tuning at 1024 pages)."""
    itemsize = jnp.dtype(q_dtype).itemsize
    block_kv = tuning.pages_per_block * page_size
    ring = 2 * tuning.num_stages * block_kv * head_dim * itemsize
    rows = _q_tile_rows(group, tuning)
    split_out = (rows * head_dim + 256) * 4 if tuning.num_splits > 1 else 0  # float32 output, log-sum-exp
    buffers = [
        rows * head_dim * itemsize,  # q staging (q rows on M), output staging (positions on M)
        rows * head_dim * itemsize,  # q tile
        max(ring, split_out),  # K and V ring slots; split-K's output staging shares their SMEM
        0 if tuning.p_in_registers else rows * block_kv * itemsize,  # P tile
        4 * _window(max_pages, tuning.pages_per_block, tuning.num_splits),  # page-table window
    ]
    return sum(_round_up(b, 1024) for b in buffers) + 3 * 1024


def ctas_per_sm(smem: int, tuning: DecodeTuning) -> int:
    """Programs that fit an H100/H200 SM by SMEM (228 KB, 1 KB reserved per CTA); with q rows on M, registers
    allow 2 at 128 threads (two [64, H] float32 accumulators and the scores); with positions on M, an estimate from
    SMEM alone (the accumulators are an eighth the size)."""
    by_smem = _SM_SMEM // (smem + 1024)
    return by_smem if tuning.positions_on_m else min(2, by_smem)


def paged_decode_mgpu_unsupported_reason(
    q: jax.Array, k_pages: jax.Array, page_tables: jax.Array, tuning: DecodeTuning
) -> str | None:
    """Why the Mosaic GPU kernel cannot run these shapes (on a Hopper GPU), or None if it can."""
    head_dim = q.shape[-1]
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = q.shape[1] // num_kv_heads
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype} is not bfloat16 or float16 (wgmma operands)"
    if k_pages.dtype != q.dtype:
        return f"k/v pages dtype {k_pages.dtype} differs from q's {q.dtype}"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} is not 64 or 128"
    if page_size % 8:
        return f"page_size {page_size} is not a multiple of 8 (the swizzled tile's row group)"
    block_kv = tuning.pages_per_block * page_size
    if block_kv % 64 or block_kv > 256:
        return f"block_kv = pages_per_block * page_size = {block_kv} is not a multiple of 64 <= 256"
    if group > ROWS:
        return f"G = {group} q heads per kv head > {ROWS}"
    if tuning.positions_on_m and (q.shape[0] * q.shape[1]) % 8:
        return f"positions_on_m: B * N = {q.shape[0] * q.shape[1]} q rows, not a multiple of the q tile's 8-row tiling"
    smem = smem_bytes(q.dtype, head_dim, page_size, page_tables.shape[1], tuning, group=group)
    if smem > _SMEM_LIMIT:
        return f"needs {smem} bytes of SMEM > {_SMEM_LIMIT} (fewer stages or pages per block, or more splits)"
    return None


def decode_unsupported_reason(
    q: jax.Array, k_pages: jax.Array, page_tables: jax.Array, sliding_window: int | None
) -> str | None:
    """Why `paged_decode_attention_mgpu` with its default tuning cannot run this batch (on a Hopper GPU), or None."""
    if sliding_window is not None:
        return "sliding_window is not supported yet"
    tuning = default_tuning(q.shape[0], q.shape[1], k_pages.shape[0])
    return paged_decode_mgpu_unsupported_reason(q, k_pages, page_tables, tuning)


def _validate(q, k_pages, v_pages, page_tables, seq_lens, num_seqs, sliding_window) -> None:
    """Static shape/dtype checks (values are traced): paged_attention's, for a batch of one query per sequence."""
    if q.ndim != 3:
        raise ValueError(f"q must be [B, N, H] (one decode query per sequence), got shape {q.shape}")
    if page_tables.ndim == 2 and page_tables.shape[0] != q.shape[0]:
        raise ValueError(f"page_tables must have one row per q row (B = {q.shape[0]}), got shape {page_tables.shape}")
    cu_q_lens = jax.ShapeDtypeStruct((q.shape[0] + 1,), jnp.int32)  # arange(B + 1): one token per sequence
    validate_ragged(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, sliding_window)
    if page_tables.shape[1] == 0:
        raise ValueError("page_tables must have at least one column")
    if sliding_window is not None:
        raise NotImplementedError("paged_decode_attention_mgpu does not support sliding_window yet")


def _decode_kernel(
    seq_lens_ref,  # [B] int32 GMEM
    num_seqs_ref,  # [1] int32 GMEM
    page_tables_ref,  # [B, W_table] int32 GMEM, W_table a multiple of 32 and of pages_per_block
    q_ref,  # [B * N, H] GMEM: q rows (sequence-major, then head)
    k_ref,  # [K * P * S, H] GMEM: k_pages viewed as rows; page p of kv head h is rows (h * P + p) * S + [0, S)
    v_ref,  # [K * P * S, H] GMEM
    *refs,
    num_heads: int,
    group: int,
    num_pages: int,
    page_size: int,
    max_len: int,
    window: int,
    sm_scale: float,
    tuning: DecodeTuning,
):
    splits = tuning.num_splits
    transposed = tuning.positions_on_m
    if splits == 1:
        o_ref, *scratch = refs  # o_ref [B * N, H] q.dtype
    else:
        # o_ref [splits, B * N, H] f32 (q rows on M) or [splits, B, K, H, Q] f32 (positions on M: each program's
        # tile); lse_ref [splits, B, K, L] f32, L = 64 (q rows on M: entries >= G are the garbage rows') or Q
        # (positions on M: entry c is the tile's column c)
        o_ref, lse_ref, *scratch = refs
    # Scratch, by formulation (as `_decode_mgpu` builds it); R = 64 rows of q on M, or Q = `q_columns(G)` on N:
    # q_stage [64, H] q.dtype unswizzled (q rows on M): q rows as TMA brings them, and the output rows on the way out;
    # o_stage [Q, H] q.dtype unswizzled (positions on M): the output rows on the way out;
    # q_tile [R or Q, H] swizzled (a wgmma operand); p_tile [64, block_kv] (q rows on M) or [Q, block_kv] (positions
    # on M) swizzled, absent with P in registers; table [window] int32: page ids;
    # kv_smem: (k_ring, v_ring), each [num_stages, block_kv, H] swizzled; for split-K a union of that with
    # (o32 [64, H] or [H, Q] f32, lse [64 or Q] f32), the output staging, used only once the ring is idle
    if transposed:
        (q_tile, o_stage, kv_smem, p_tile, table, q_bar, table_bar, k_bars, v_bars) = scratch
    elif tuning.p_in_registers:
        (q_stage, q_tile, kv_smem, table, q_bar, table_bar, k_bars, v_bars) = scratch
        p_tile = None
    else:
        (q_stage, q_tile, kv_smem, p_tile, table, q_bar, table_bar, k_bars, v_bars) = scratch
    if splits == 1:
        k_ring, v_ring = kv_smem
    else:
        (k_ring, v_ring), out_stage = kv_smem
    ppb = tuning.pages_per_block
    stages = tuning.num_stages
    block_kv = ppb * page_size
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    split = lax.axis_index("s") if splits > 1 else 0

    first_row = b * num_heads + h * group  # this program's first q (and output) row in the [B * N, H] views
    if transposed:
        # Q whole rows straight into the swizzled tile (a tile-aligned copy), from a start clamped so they stay
        # inside q: this program's G queries are the tile's columns `col` .. col + G - 1 (col > 0 only near the
        # end of q); the other columns are other heads' queries, whose scores and outputs are never stored.
        q_cols = q_tile.shape[0]
        q_start = jnp.minimum(first_row, q_ref.shape[0] - q_cols)
        col = first_row - q_start
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_start, q_cols)], q_tile, q_bar)
    else:
        # Only its G rows: q_stage's other rows hold whatever SMEM held, and so do the q tile's, the scores' and the
        # output's rows past G, which are never stored but in the lse row (each wgmma output row depends on its own A
        # row alone; the combine reads lse entries < G).
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(first_row, group)], q_stage.at[pl.ds(0, group)], q_bar)

    live = b < num_seqs_ref[0]
    kv_len = jnp.where(live, jnp.minimum(seq_lens_ref[b], max_len), 0)
    kv_len = jnp.maximum(kv_len, 0)
    total_blocks = lax.div(kv_len + (block_kv - 1), block_kv)
    lo: jax.Array | int = 0  # the split's first block
    num_blocks = total_blocks  # the split's blocks
    table_start: jax.Array | int = 0  # first page-table column copied to SMEM (a multiple of 4)
    table_offset: jax.Array | int = 0  # column of the split's first page inside that window
    if splits > 1:
        per_split = lax.div(total_blocks + (splits - 1), splits)
        lo = split * per_split
        num_blocks = jnp.maximum(jnp.minimum(per_split, total_blocks - lo), 0)
        first_page = lo * ppb
        # A 16-byte aligned window start that keeps the window inside the table.
        table_start = jnp.minimum(first_page - lax.rem(first_page, 4), page_tables_ref.shape[1] - window)
        table_offset = first_page - table_start
    # In bounds by construction; saying so makes it one contiguous bulk copy (no tensor map, no 256-entry box limit).
    plgpu.copy_gmem_to_smem(page_tables_ref.at[b, pl.ds(table_start, window)], table, table_bar,
                            oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)  # fmt: skip

    def issue(block, slot, src_ref, ring, bars):
        """TMA-copies the K (or V) pages of the split's `block`-th block into ring slot `slot`."""
        for p in range(ppb):
            page = table[table_offset + block * ppb + p]
            rows = pl.ds((h * num_pages + page) * page_size, page_size)
            plgpu.copy_gmem_to_smem(src_ref.at[rows], ring.at[slot, pl.ds(p * page_size, page_size)], bars.at[slot])

    issue_k = functools.partial(issue, src_ref=k_ref, ring=k_ring, bars=k_bars)
    issue_v = functools.partial(issue, src_ref=v_ref, ring=v_ring, bars=v_bars)
    plgpu.barrier_wait(table_bar)
    for i in range(stages):

        @pl.when(i < num_blocks)
        def _(i=i):
            issue_k(i, i)
            issue_v(i, i)

    plgpu.barrier_wait(q_bar)
    if not transposed:
        # Once per program: bank conflicts do not matter (optimized=False lets the lane lowering accept the copy).
        q_tile[...] = plgpu.load(q_stage, layout=plgpu.Layout.WGMMA, optimized=False)
        plgpu.commit_smem()  # q_tile's generic-proxy writes before the wgmma reads them

    # The softmax runs along the kv positions: wgmma's N (axis 1) with q rows on M, its M (axis 0) transposed.
    # Scores are [64, block_kv] or [block_kv, Q]; acc is [64, H] or [H, Q]; m_i and l_i have one entry per query.
    pos_axis, q_axis = (0, 1) if transposed else (1, 0)
    scale = sm_scale * _LOG2E  # scores in log2 units: exp2 instead of exp
    per_query = plgpu.Layout.WGMMA.reduce(pos_axis)
    num_queries = q_tile.shape[0]
    head_dim = q_tile.shape[1]
    acc_shape = (head_dim, num_queries) if transposed else (num_queries, head_dim)
    scores_shape = (block_kv, num_queries) if transposed else (num_queries, block_kv)
    acc = plgpu.layout_cast(jnp.zeros(acc_shape, jnp.float32), plgpu.Layout.WGMMA)
    m_i = plgpu.layout_cast(jnp.full((num_queries,), MASK_VALUE, jnp.float32), per_query)
    l_i = plgpu.layout_cast(jnp.zeros((num_queries,), jnp.float32), per_query)

    def per_query_bcast(x, shape):
        return lax.broadcast_in_dim(x, shape, [q_axis])

    def body(j, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_bars.at[slot])

        def compute_qk(acc_ref):
            if transposed:  # K_block [block_kv, H] @ q^T [H, Q]
                plgpu.wgmma(acc_ref, k_ring.at[slot], q_tile.transpose((1, 0)))
            else:  # q [64, H] @ K_block^T [H, block_kv]
                plgpu.wgmma(acc_ref, q_tile, k_ring.at[slot].transpose((1, 0)))
            return acc_ref[...]

        scores = pl.run_scoped(compute_qk, plgpu.ACC(scores_shape, jnp.float32))
        refill = j + stages < num_blocks
        # Reading the scores waited for the wgmma: K's slot is free, refill it while the softmax and PV run.
        pl.when(refill)(lambda: issue_k(j + stages, slot))
        kv_pos = (lo + j) * block_kv + plgpu.broadcasted_iota(jnp.int32, scores_shape, pos_axis,
                                                              layout=plgpu.Layout.WGMMA)  # fmt: skip
        scores = jnp.where(kv_pos < kv_len, scores * scale, MASK_VALUE)
        # Every block this loop visits holds a visible position, so m_next is a real score for every query.
        m_next = jnp.maximum(m_i, scores.max(axis=pos_axis))
        alpha = jnp.exp2(m_i - m_next)  # 0 on the first block (m_i = MASK_VALUE)
        probs = jnp.exp2(scores - per_query_bcast(m_next, scores_shape))
        l_next = l_i * alpha + probs.sum(axis=pos_axis)
        p_operand: Any
        if p_tile is None:
            p_operand = probs.astype(q_tile.dtype)
        else:
            p_view = p_tile.transpose((1, 0)) if transposed else p_tile  # P^T [block_kv, Q] or P [64, block_kv]
            p_view[...] = probs.astype(p_tile.dtype)
            plgpu.commit_smem()
            p_operand = p_view
        plgpu.barrier_wait(v_bars.at[slot])

        def compute_pv(acc_ref):
            if transposed:  # V_block^T [H, block_kv] @ P^T [block_kv, Q]
                plgpu.wgmma(acc_ref, v_ring.at[slot].transpose((1, 0)), p_operand)
            else:  # P [64, block_kv] @ V_block [block_kv, H]
                plgpu.wgmma(acc_ref, p_operand, v_ring.at[slot])
            return acc_ref[...]

        # A fresh accumulator, added to the rescaled running one: the interpreter has no rule for a pre-initialised
        # one (pl.run_state), and the extra adds are cheap. Reading it waits for the wgmma, so K and V of `slot` are
        # free afterwards.
        pv = pl.run_scoped(compute_pv, plgpu.ACC(acc_shape, jnp.float32))
        acc = acc * per_query_bcast(alpha, acc_shape) + pv

        pl.when(refill)(lambda: issue_v(j + stages, slot))
        return acc, m_next, l_next

    acc, m_i, l_i = lax.fori_loop(0, num_blocks, body, (acc, m_i, l_i))
    seen = l_i > 0  # False only for queries of a program with no blocks (padding, empty split)
    out = acc / per_query_bcast(jnp.where(seen, l_i, 1.0), acc_shape)  # 0 where nothing was seen
    # Output rows: the G rows from row 0 (q rows on M) or from column `col`, stored transposed (positions on M).
    rows = pl.ds(col, group) if transposed else pl.ds(0, group)
    if splits == 1:
        stage = o_stage if transposed else q_stage
        out_view = stage.transpose((1, 0)) if transposed else stage  # out^T [H, Q] into [Q, H], or out [64, H]
        out_view[...] = out.astype(stage.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage.at[rows], o_ref.at[pl.ds(first_row, group)])
    else:
        o32, lse = out_stage
        o32[...] = out
        lse[...] = jnp.where(seen, m_i + jnp.log2(jnp.where(seen, l_i, 1.0)), MASK_VALUE)
        plgpu.commit_smem()
        if transposed:  # o_ref [splits, B, K, H, Q]: the program's whole [H, Q] tile
            plgpu.copy_smem_to_gmem(o32, o_ref.at[split, b, h])
        else:
            plgpu.copy_smem_to_gmem(o32.at[rows], o_ref.at[split, pl.ds(first_row, group)])
        plgpu.copy_smem_to_gmem(lse, lse_ref.at[split, b, h])
    plgpu.wait_smem_to_gmem(0)


def _merge(o_part, lse_part):
    """o_part [splits, ..., H] float32 (each normalised over its split), lse_part [splits, ...] float32 (log2-sum-exp
    of the split's scores; MASK_VALUE: the split saw nothing) -> [..., H] float32 over every split's positions."""
    seen = lse_part > 0.5 * MASK_VALUE
    top = jnp.max(lse_part, axis=0)
    weight = jnp.where(seen, jnp.exp2(lse_part - top), 0.0)
    total = jnp.sum(weight, axis=0)
    out = jnp.sum(weight[..., None] * o_part, axis=0)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def _combine_kernel(
    o_part_ref,  # [splits, H] float32: one query head's output from each split
    lse_ref,  # [splits] float32: their log2-sum-exps
    out_ref,  # [H] q's dtype
):
    out_ref[...] = _merge(o_part_ref[...], lse_ref[...]).astype(out_ref.dtype)


def _combine_splits(o_part, lse_part, *, num_heads: int, group: int, dtype, interpret: bool, positions_on_m: bool):
    """The split-K merge as one Triton-style launch, a program per (sequence, query head) -> [B * N, H] in dtype.
    (XLA made three launches of it, ~1.3 us each at batch 1.) The decode kernel's outputs, float32:
    - q rows on M: o_part [splits, B * N, H] and lse_part [splits, B, K, 64], query g of (b, kv head h) at lse entry g;
    - positions on M: o_part [splits, B, K, H, Q] and lse_part [splits, B, K, Q], each program's tile columns as they
      are, query g at column g plus how far that program's q copy was pulled back from q's end."""
    splits, batch, _, q_cols = lse_part.shape
    head_dim = o_part.shape[-2] if positions_on_m else o_part.shape[-1]
    rows = batch * num_heads

    def column(b, n):
        first_row = b * num_heads + (n // group) * group
        return first_row - jnp.minimum(first_row, rows - q_cols) + n % group

    if not positions_on_m:
        o_spec = pl.BlockSpec((splits, None, head_dim), lambda b, n: (0, b * num_heads + n, 0))
        lse_spec = pl.BlockSpec((splits, None, None, None), lambda b, n: (0, b, n // group, n % group))
    else:
        o_spec = pl.BlockSpec((splits, None, None, head_dim, None), lambda b, n: (0, b, n // group, 0, column(b, n)))
        lse_spec = pl.BlockSpec((splits, None, None, None), lambda b, n: (0, b, n // group, column(b, n)))
    return pl.pallas_call(
        _combine_kernel,
        grid=(batch, num_heads),
        in_specs=[o_spec, lse_spec],
        out_specs=pl.BlockSpec((None, head_dim), lambda b, n: (b * num_heads + n, 0)),
        out_shape=pallas_out_struct((rows, head_dim), dtype, o_part, lse_part),
        compiler_params=triton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="paged_decode_combine",
    )(o_part, lse_part)


def _swizzled(shape, dtype):
    """An SMEM tile in wgmma's operand layout: (8, 64)-element tiles, 128-byte swizzle."""
    elems = _SWIZZLE // jnp.dtype(dtype).itemsize
    tiling = plgpu.TilingTransform((8, elems))  # type: ignore[abstract]
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(_SWIZZLE)))  # type: ignore[abstract]


def _decode_mgpu(q, k_pages, v_pages, page_tables, seq_lens, num_seqs, *, sm_scale, tuning, interpret):
    num_seqs_max, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    ppb = tuning.pages_per_block
    block_kv = ppb * page_size
    splits = tuning.num_splits
    max_len = page_tables.shape[1] * page_size
    width = _table_width(page_tables.shape[1], ppb)
    if width != page_tables.shape[1]:  # a copy of the table per call; engines size it to whole blocks
        page_tables = jnp.pad(page_tables, ((0, 0), (0, width - page_tables.shape[1])))  # null page 0
    window = _window(page_tables.shape[1], ppb, splits)
    q_rows = q.reshape(num_seqs_max * num_heads, head_dim)
    k_rows = k_pages.reshape(num_kv_heads * num_pages * page_size, head_dim)
    v_rows = v_pages.reshape(num_kv_heads * num_pages * page_size, head_dim)

    dtype = q.dtype
    ring = (
        _swizzled((tuning.num_stages, block_kv, head_dim), dtype),  # K
        _swizzled((tuning.num_stages, block_kv, head_dim), dtype),  # V
    )
    kv_smem: Any = ring
    rows = _q_tile_rows(group, tuning)
    out_rows = num_seqs_max * num_heads
    out_type: Any
    if splits == 1:
        out_type = jax.ShapeDtypeStruct((out_rows, head_dim), dtype)
    else:
        # Positions on M: the float32 output leaves as the accumulator holds it, [H, Q] a program (Mosaic GPU does
        # not store it transposed), and the combine picks the program's columns.
        o_stage_shape = (head_dim, rows) if tuning.positions_on_m else (rows, head_dim)
        out_stage = (plgpu.SMEM(o_stage_shape, jnp.float32), plgpu.SMEM((rows,), jnp.float32))
        kv_smem = plgpu.RefUnion(ring, out_stage)  # keeps split-K at the SMEM (and CTAs per SM) of no split
        o_part_shape = (num_seqs_max, num_kv_heads, head_dim, rows) if tuning.positions_on_m else (out_rows, head_dim)
        out_type = (
            jax.ShapeDtypeStruct((splits, *o_part_shape), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_seqs_max, num_kv_heads, rows), jnp.float32),
        )
    if tuning.positions_on_m:  # (q_tile, o_stage); the q tile is copied straight from q
        q_buffers: tuple[Any, ...] = (_swizzled((rows, head_dim), dtype), plgpu.SMEM((rows, head_dim), dtype))
    else:  # (q_stage, q_tile)
        q_buffers = (plgpu.SMEM((rows, head_dim), dtype), _swizzled((rows, head_dim), dtype))
    scratch = (
        *q_buffers,
        kv_smem,
        *(() if tuning.p_in_registers else (_swizzled((rows, block_kv), dtype),)),  # p_tile
        plgpu.SMEM((window,), jnp.int32),  # table
        plgpu.Barrier(),  # q
        plgpu.Barrier(),  # table
        plgpu.Barrier(num_arrivals=ppb, num_barriers=tuning.num_stages),  # K slots: one arrival per page copy
        plgpu.Barrier(num_arrivals=ppb, num_barriers=tuning.num_stages),  # V slots
    )
    semantics = plgpu.LoweringSemantics.Lane if tuning.semantics == "lane" else plgpu.LoweringSemantics.Warpgroup
    kernel = functools.partial(
        _decode_kernel,
        num_heads=num_heads,
        group=group,
        num_pages=num_pages,
        page_size=page_size,
        max_len=max_len,
        window=window,
        sm_scale=sm_scale,
        tuning=tuning,
    )
    kernel.__name__ = f"paged_decode_mgpu_{tuning.name}"  # type: ignore[attr-defined]
    grid = (num_seqs_max, num_kv_heads, splits)
    outs = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=semantics),
        interpret=interpret,
    )(seq_lens, num_seqs, page_tables, q_rows, k_rows, v_rows)
    if splits == 1:
        return outs.reshape(num_seqs_max, num_heads, head_dim)
    out = _combine_splits(*outs, num_heads=num_heads, group=group, dtype=dtype, interpret=interpret is not None,
                          positions_on_m=tuning.positions_on_m)  # fmt: skip
    return out.reshape(num_seqs_max, num_heads, head_dim)


def interpret_params() -> plgpu.InterpretGPUParams:
    """Pallas' Mosaic GPU interpreter (runs the kernel's TMA copies, barriers and wgmmas on CPU), with
    uninitialised memory filled with NaN so that reads of never-written SMEM show up in the output."""
    return plgpu.InterpretGPUParams(uninitialized_memory="nan")


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "tuning", "interpret"))
def paged_decode_attention_mgpu(
    q: jax.Array,  # [B, N, H]
    k_pages: jax.Array,  # [K, P, S, H]
    v_pages: jax.Array,  # [K, P, S, H]
    page_tables: jax.Array,  # [B, max_pages] int32
    seq_lens: jax.Array,  # [B] int32
    num_seqs: jax.Array,  # [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    tuning: DecodeTuning | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, N, H] in q.dtype
    """Decode paged attention (one query per sequence) with the Mosaic GPU kernel; see the module docstring.

    q: [B, N, H], row b the query of sequence b at kv position seq_lens[b] - 1. k_pages/v_pages: [K, P, S, H],
    N % K == 0. page_tables: [B, max_pages] int32 (unused entries -> page 0). seq_lens: [B] int32 kv length
    including the current token. num_seqs: [1] int32; rows b >= num_seqs[0] are padding and come back as 0.
    tuning: the kernel's block sizes; None picks `default_tuning` (positions on M at G = 1; split-K when B * K programs
    underfill the GPU).
    interpret=True runs Pallas' Mosaic GPU interpreter (CPU; slow, for tests) instead of compiling for a GPU.
    """
    _validate(q, k_pages, v_pages, page_tables, seq_lens, num_seqs, sliding_window)
    tuning = default_tuning(q.shape[0], q.shape[1], k_pages.shape[0]) if tuning is None else tuning
    reason = paged_decode_mgpu_unsupported_reason(q, k_pages, page_tables, tuning)
    if reason is not None:
        raise ValueError(f"paged_decode_attention_mgpu cannot run these shapes: {reason}")
    if interpret and tuning.p_in_registers:
        raise ValueError("the Mosaic GPU interpreter takes wgmma operands from SMEM only: p_in_registers=False")
    return _decode_mgpu(q, k_pages, v_pages, page_tables, seq_lens, num_seqs, sm_scale=sm_scale, tuning=tuning,
                        interpret=interpret_params() if interpret else None)  # fmt: skip


def paged_decode_reference(q, k_pages, v_pages, page_tables, seq_lens, num_seqs, *, sm_scale: float) -> jax.Array:
    """The oracle: `paged_attention_reference` with one query per sequence (cu_q_lens = arange(B + 1))."""
    cu_q_lens = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return paged_attention_reference(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, sm_scale=sm_scale)
