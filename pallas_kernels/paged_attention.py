"""Ragged paged attention: one flat batch of query tokens mixing prefill chunks and decode tokens.

T tokens, N q-heads, K kv-heads, G = N // K q-heads per kv-head, H head dim, B sequences, P pages,
S page size, L = max_pages * S kv positions a page table can address.

Sequence b owns query rows cu_q_lens[b]:cu_q_lens[b+1]. Its K/V (this step's tokens included, already
written) live in the pages page_tables[b]; query i of the sequence sits at kv position
seq_lens[b] - q_len_b + i and attends causally (and within the sliding window when one is set). Rows past
cu_q_lens[num_seqs] are padding and come back as zeros.

Two implementations of one contract:
- `paged_attention_reference`: plain jnp over the same query blocks as the kernel, under `vmap`, chunked so
  that the gathered K/V stay bounded. It is the engine's CPU path and the oracle of the tests.
- the Pallas kernel (Triton lowering, like vLLM's "unified attention"): the grid runs over (query blocks,
  kv heads). Each query block holds at most `block_q` tokens of exactly one sequence, so the wrapper turns
  cu_q_lens into a block -> (sequence, first row, rows, first position) table with jnp. A program loads its
  block's queries for the G heads sharing one kv head as a [block_q * G, H] matrix, walks the sequence's
  pages up to the last one its queries can see (from the first one inside the window) with an online
  softmax, and stores its valid rows with a mask. A sequence's K/V are read once per query block and kv
  head: for decode (one block per sequence) that is the minimum.
  Split-K (flash-decoding, `AttentionTuning.num_splits` > 1): few decode sequences make too few programs to
  fill a GPU, so the grid gains a third axis of num_splits programs per (query block, kv head). Program s
  walks the s-th contiguous share of the KV blocks its queries see (split from the sequence's actual length;
  a split left with nothing writes "saw no key" and exits) and writes its unnormalised float32 output, running
  max and sum; a jnp log-sum-exp combine merges them. num_splits = 1 runs the kernel without any of this.

GPU (Triton) constraints of the kernel, checked by `pallas_gpu_unsupported_reason`; `impl="auto"` falls
back to the reference when one fails, `impl="pallas"` raises: H a power of two >= 16; S a power of two;
block_q * G and pages_per_block * S >= 16; dtypes float32, bfloat16 or float16. G need not be a power of
two (q is padded to the next one: a copy of q, never of the pages). float32 products follow
jax_default_matmul_precision (TF32 on GPUs unless it says "highest"). Compiling on GPU warns that jax 0.11.2 deprecates
the Pallas Triton backend; nothing in jax replaces it for paged attention yet.

Decode-only batches (`decode_only=True`) go to the Mosaic GPU kernel on Hopper (jpaged.kernels.paged_decode_mgpu), and
so do the leading one-token sequences (the running decodes) of other batches.
Measured on one H200 (bf16, S = 16, decode at full context, K/V bytes read once / time, 2026-11-29), this kernel's
best tuning / the Mosaic kernel's default / JAX's own kernel: Llama-3-8B heads (32/8, H 128) B 64 ctx 2048:
2.67 / 3.88 / 2.12 TB/s; B 256 ctx 1024: 2.76 / 3.89 / 2.18; B 16 ctx 16k: 2.42 / 3.92 / 2.31; Llama-2-7B heads
(32/32) B 64 ctx 2048: 2.50 / 4.16 / 2.31 (benchmarks/kernels.py, benchmarks/mgpu_decode.py; docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import ManualAxisType

from jpaged.kernels.platform import is_power_of_two, on_gpu, on_hopper

IMPLS = ("auto", "reference", "pallas", "mgpu")
# Finite, so fully masked rows never compute inf - inf = nan; exp(MASK_VALUE - a real score) underflows to 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Most gathered K (or score) elements the reference materialises per chunk of query blocks (64 MiB in float32).
_REFERENCE_GATHER_BUDGET = 1 << 24


def pallas_out_struct(shape, dtype, *inputs: jax.Array) -> jax.ShapeDtypeStruct:
    """A pallas_call output type that varies over the mesh axes its inputs vary over.

    Inside `jax.shard_map` with check_vma=True (the default), pallas_call must be told how outputs vary.
    """
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=varying))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionTuning:
    """Block sizes of the Pallas kernel; one kernel, many tunings. All but target_programs are powers of two."""

    block_q: int = 16  # query tokens per program; the dot has block_q * G rows (Triton wants >= 16 of them)
    pages_per_block: int = 4  # KV pages per inner-loop iteration: block_k = pages_per_block * S kv positions
    num_warps: int = 4  # Triton lowering only
    num_stages: int = 2  # Triton lowering only (software pipelining depth of the KV loop)
    # Split-K (flash-decoding): programs per (query block, kv head), each over a contiguous share of the KV blocks
    # the queries see; > 1 adds float32 partial outputs and a log-sum-exp combine after the kernel.
    num_splits: int = 1
    # 0: every query block uses all num_splits splits. > 0: at run time use the fewest splits (a power of two
    # <= num_splits) with which live query blocks * kv heads * splits reaches this many programs; the other
    # splits exit at once. It lets one compiled bucket serve 1 live sequence (split) and a full batch (unsplit).
    target_programs: int = 0

    def __post_init__(self) -> None:
        for name in ("block_q", "pages_per_block", "num_warps", "num_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or not is_power_of_two(value):
                raise ValueError(f"AttentionTuning.{name} must be a power of two >= 1, got {value!r}")
        if self.num_warps > 32:
            raise ValueError(f"AttentionTuning.num_warps must be <= 32, got {self.num_warps}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"AttentionTuning.num_stages must be an int >= 1, got {self.num_stages!r}")
        if not isinstance(self.target_programs, int) or self.target_programs < 0:
            raise ValueError(f"AttentionTuning.target_programs must be an int >= 0, got {self.target_programs!r}")
        if self.target_programs and self.num_splits == 1:
            raise ValueError("AttentionTuning.target_programs needs num_splits > 1 (it picks how many are used)")

    @property
    def name(self) -> str:
        name = f"bq{self.block_q}_ppb{self.pages_per_block}_w{self.num_warps}_s{self.num_stages}"
        if self.num_splits > 1:
            name += f"_split{self.num_splits}" + (f"_t{self.target_programs}" if self.target_programs else "")
        return name


# Programs that fill an H200 (132 SMs) for decode: two per SM (the rule below is measured on one shape only).
_TARGET_PROGRAMS = 264
_MAX_SPLITS = 16
# jpaged's runner pads the sequence axis to powers of two from 16 (runner.MIN_TOKEN_BUCKET): a bucket of B > 16
# sequences holds more than B / 2 live ones, the smallest one anything from 1 (single-stream decode) to 16.
_SMALLEST_SEQ_BUCKET = 16


def default_tuning(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int) -> AttentionTuning:
    """The tuning for a shape family, chosen from static shapes (measured on an H200, docs/benchmarks.md, except
    the split rule).

    Decode-shaped batches (no more tokens than sequences: one query per sequence) put just enough queries in a
    block to fill the 16 rows a Triton dot needs with the G heads that share a KV head. Prefill-shaped batches
    use 64 rows (block_q * G), so each KV page is reused across enough queries: with MHA, 16 rows ran 4x slower
    than 64 (3.2 vs 0.8 ms for 4 x 2048 tokens).

    Decode also splits each sequence's KV blocks (split-K) when too few programs would run: one program per
    (sequence, kv head) left 100 of the H200's 132 SMs idle for single-stream Llama-2-7B (32 programs, 0.65 TB/s)
    and Llama-3-8B at B=16 reached 1.6-2.0 TB/s with 128 programs where JAX's kernel split 4 ways reached 2.31.
    Measured on one shape only (Llama-3-8B heads, B=16, ctx 16k: 2.42 TB/s, ahead of the quick grid's fixed splits
    of 2.15; 2026-11-29), since on Hopper decode runs the Mosaic GPU kernel. The rule, chosen from that profile and
    flash-decoding's practice: num_splits = the next power of two of
    ceil(264 / (fewest live sequences * K)), capped at 16, i.e. 2-4 programs per SM; and target_programs = 264, so
    that at run time only as many splits work as the live sequences need (the rest exit at once). The static
    num_seqs is a padded bucket, so the grid is sized for its fewest live sequences (see _SMALLEST_SEQ_BUCKET):
    1 in the smallest bucket, B // 2 + 1 above it. Prefill never splits: its query blocks already fill the GPU.
    """
    group_padded = 1 << (num_heads // num_kv_heads - 1).bit_length()
    if num_tokens <= num_seqs:
        fewest_live = 1 if num_seqs <= _SMALLEST_SEQ_BUCKET else num_seqs // 2 + 1
        wanted = -(-_TARGET_PROGRAMS // (fewest_live * num_kv_heads))
        num_splits = min(_MAX_SPLITS, 1 << (wanted - 1).bit_length())
        return AttentionTuning(
            block_q=max(1, 16 // group_padded),
            pages_per_block=4,
            num_splits=num_splits,
            target_programs=_TARGET_PROGRAMS if num_splits > 1 else 0,
        )
    return AttentionTuning(block_q=max(16, 64 // group_padded), pages_per_block=4)


def _validate(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, sliding_window) -> None:
    """Static shape/dtype checks only (values are traced)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [K, P, S, H], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages must have k_pages' shape {k_pages.shape}, got {v_pages.shape}")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages dtypes differ: {k_pages.dtype} vs {v_pages.dtype}")
    _, num_heads, head_dim = q.shape
    num_kv_heads, _, _, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of k/v pages ({kv_head_dim}) differ")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    for name, arr, rank in (("page_tables", page_tables, 2), ("seq_lens", seq_lens, 1),
                            ("cu_q_lens", cu_q_lens, 1), ("num_seqs", num_seqs, 1)):  # fmt: skip
        if arr.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {arr.shape}")
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {arr.dtype}")
    num_seqs_max = page_tables.shape[0]
    if seq_lens.shape != (num_seqs_max,):
        raise ValueError(f"seq_lens must be [B={num_seqs_max}] like page_tables' rows, got {seq_lens.shape}")
    if cu_q_lens.shape != (num_seqs_max + 1,):
        raise ValueError(f"cu_q_lens must be [B+1={num_seqs_max + 1}], got {cu_q_lens.shape}")
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be [1], got {num_seqs.shape}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


def count_le(sorted_edges: jax.Array, x: jax.Array) -> jax.Array:
    """searchsorted(sorted_edges, x, side="right") as one fused compare-and-sum.

    jnp.searchsorted's default bisection is a loop of tiny kernels; on a GPU it cost ~0.25 ms per attention call,
    more than the whole decode kernel at small batch (B=32, ctx 1024). Edges are at most B + 1 long, so the
    [len(x), len(edges)] comparison is cheap.
    """
    return jnp.sum(sorted_edges[None, :] <= x[:, None], axis=1, dtype=jnp.int32)


def paged_attention_reference(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, S, H]
    v_pages: jax.Array,  # [K, P, S, H]
    page_tables: jax.Array,  # [B, max_pages] int32
    seq_lens: jax.Array,  # [B] int32
    cu_q_lens: jax.Array,  # [B+1] int32
    num_seqs: jax.Array,  # [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
) -> jax.Array:  # [T, N, H]
    """Plain jnp ragged paged attention, in query blocks of one sequence each (as the kernel splits them).

    Each block gathers its sequence's pages once and runs a masked softmax over all L positions. The block size
    follows the average query length T // B (1 for pure decode, up to 64 for long prefill chunks), so decode
    rows waste no work and a prefill chunk gathers its pages T / 64 times rather than once per token.
    """
    _validate(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    kv_len = page_tables.shape[1] * page_size  # L
    group = num_heads // num_kv_heads
    block_q = min(64, 1 << (max(1, num_tokens // page_tables.shape[0]) - 1).bit_length())
    seq, start, length, first_pos = _query_blocks(
        seq_lens, cu_q_lens, num_seqs, num_tokens=num_tokens, block_q=block_q
    )  # [num_blocks] each
    rows = start[:, None] + jnp.arange(block_q)  # [num_blocks, block_q]
    rows = jnp.where(jnp.arange(block_q) < length[:, None], rows, num_tokens)  # unused rows -> out of range
    q_blocks = q.at[rows].get(mode="fill", fill_value=0)  # [num_blocks, block_q, N, H]

    def attend_block(q_b, seq_b, first_pos_b):  # q_b [block_q, N, H]; scalars
        pages = page_tables[seq_b]  # [max_pages]
        k = k_pages[:, pages].reshape(num_kv_heads, kv_len, head_dim)  # [K, L, H]
        v = v_pages[:, pages].reshape(num_kv_heads, kv_len, head_dim)  # [K, L, H]
        qg = q_b.reshape(block_q, num_kv_heads, group, head_dim)  # [block_q, K, G, H]
        scores = jnp.einsum("qkgh,klh->kgql", qg, k, preferred_element_type=jnp.float32) * sm_scale
        q_pos = first_pos_b + jnp.arange(block_q)  # [block_q]
        kv_pos = jnp.arange(kv_len)  # [L]
        visible = kv_pos[None, :] <= q_pos[:, None]  # [block_q, L]
        if sliding_window is not None:
            visible &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        scores = jnp.where(visible, scores, MASK_VALUE)  # [K, G, block_q, L]
        probs = jnp.where(visible, jnp.exp(scores - scores.max(axis=-1, keepdims=True)), 0.0)
        probs = probs / jnp.maximum(probs.sum(axis=-1, keepdims=True), 1e-30)  # unused rows see nothing
        out = jnp.einsum("kgql,klh->qkgh", probs, v.astype(jnp.float32), preferred_element_type=jnp.float32)
        return out.reshape(block_q, num_heads, head_dim).astype(q.dtype)

    chunk = max(1, _REFERENCE_GATHER_BUDGET // (num_kv_heads * kv_len * max(head_dim, block_q * group)))
    if chunk >= seq.shape[0]:
        out_blocks = jax.vmap(attend_block)(q_blocks, seq, first_pos)
    else:
        out_blocks = jax.lax.map(lambda xs: attend_block(*xs), (q_blocks, seq, first_pos), batch_size=chunk)
    # Every real row lies in exactly one block; padding rows are in none and stay 0.
    out = jnp.zeros_like(q)
    return out.at[rows.reshape(-1)].set(out_blocks.reshape(-1, num_heads, head_dim), mode="drop")


def _kv_blocks(first_pos, q_len, *, block_k: int, sliding_window: int | None):
    """The KV blocks [first, end) a query block's rows can see: from the first one inside the window (0 without
    one) to the one holding its last query's position."""
    last_pos = first_pos + q_len - 1
    end = pl.cdiv(last_pos + 1, block_k)
    if sliding_window is None:
        return 0, end
    return jnp.maximum(first_pos - sliding_window + 1, 0) // block_k, end


def _load_queries(q_ref, q_start, q_len, *, block_q: int):
    """q [block_q * Gp, H] (row r is token r // Gp, head r % Gp; rows past q_len are 0) and the row mask."""
    _, group_padded, head_dim = q_ref.shape
    token_valid = jnp.arange(block_q) < q_len  # [block_q]
    q_mask = jnp.broadcast_to(token_valid[:, None, None], (block_q, group_padded, head_dim))
    q = plgpu.load(q_ref.at[pl.ds(q_start, block_q)], mask=q_mask, other=0)  # [block_q, Gp, H]
    return q.reshape(block_q * group_padded, head_dim), q_mask


def _online_softmax(q, q_pos, seq, kv_lo, kv_hi, page_tables_ref, k_pages_ref, v_pages_ref, *,
                    pages_per_block: int, sm_scale: float, sliding_window: int | None):  # fmt: skip
    """Walks KV blocks [kv_lo, kv_hi) of sequence seq for q [rows, H] at positions q_pos [rows].

    Returns the unnormalised float32 accumulator [rows, H], the running max m [rows] and the sum l [rows]; a row
    that saw no key keeps acc = 0, m = MASK_VALUE, l = 0.
    """
    rows, head_dim = q.shape
    block_k = pages_per_block * k_pages_ref.shape[1]

    def body(kv_block, carry):
        acc, m_prev, l_prev = carry  # [rows, H], [rows], [rows]
        page_ids = page_tables_ref[seq, pl.ds(kv_block * pages_per_block, pages_per_block)]  # [ppb]
        k = k_pages_ref[page_ids].reshape(block_k, head_dim)  # [block_k, H]
        v = v_pages_ref[page_ids].reshape(block_k, head_dim)  # [block_k, H]
        scores = plgpu.dot(q, k, trans_b=True) * sm_scale  # [rows, block_k] float32
        kv_pos = kv_block * block_k + jnp.arange(block_k)  # [block_k]
        visible = kv_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        scores = jnp.where(visible, scores, MASK_VALUE)
        m_next = jnp.maximum(m_prev, scores.max(axis=-1))  # [rows]
        correction = jnp.exp(m_prev - m_next)  # [rows]
        probs = jnp.where(visible, jnp.exp(scores - m_next[:, None]), 0.0)  # [rows, block_k]
        l_next = correction * l_prev + probs.sum(axis=-1)
        acc = correction[:, None] * acc + plgpu.dot(probs.astype(v.dtype), v)
        return acc, m_next, l_next

    acc = jnp.zeros((rows, head_dim), jnp.float32)
    m_i = jnp.full((rows,), MASK_VALUE, jnp.float32)
    l_i = jnp.zeros((rows,), jnp.float32)
    return jax.lax.fori_loop(kv_lo, kv_hi, body, (acc, m_i, l_i))


def _paged_attention_kernel(
    block_seq_ref,  # [num_blocks] int32 sequence that owns the query block
    block_start_ref,  # [num_blocks] int32 first query row of the block
    block_len_ref,  # [num_blocks] int32 valid query rows of the block; 0 = unused block
    block_pos_ref,  # [num_blocks] int32 kv position of the block's first query
    page_tables_ref,  # [B, max_pages_padded] int32, max_pages_padded % pages_per_block == 0
    q_ref,  # [T, Gp, H] queries of this program's kv head (Gp = G rounded up to a power of two)
    k_pages_ref,  # [P, S, H] this program's kv head
    v_pages_ref,  # [P, S, H] this program's kv head
    o_ref,  # [T, Gp, H]
    *,
    block_q: int,
    pages_per_block: int,
    sm_scale: float,
    sliding_window: int | None,
):
    """num_splits == 1: one program per (query block, kv head) walks every KV block its queries see."""
    blk = pl.program_id(0)
    q_len = block_len_ref[blk]

    @pl.when(q_len > 0)
    def _():
        seq = block_seq_ref[blk]
        q_start = block_start_ref[blk]
        first_pos = block_pos_ref[blk]
        group_padded = q_ref.shape[1]
        block_k = pages_per_block * k_pages_ref.shape[1]
        q, q_mask = _load_queries(q_ref, q_start, q_len, block_q=block_q)  # [rows, H]
        q_pos = first_pos + jnp.arange(q.shape[0]) // group_padded  # [rows]
        kv_lo, kv_hi = _kv_blocks(first_pos, q_len, block_k=block_k, sliding_window=sliding_window)
        acc, _, l_i = _online_softmax(q, q_pos, seq, kv_lo, kv_hi, page_tables_ref, k_pages_ref, v_pages_ref,
                                      pages_per_block=pages_per_block, sm_scale=sm_scale,
                                      sliding_window=sliding_window)  # fmt: skip
        # Every valid row sees at least its own position, so l_i > 0 there; invalid rows are not stored.
        out = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
        out = out.reshape(block_q, group_padded, q.shape[1]).astype(o_ref.dtype)
        plgpu.store(o_ref.at[pl.ds(q_start, block_q)], out, mask=q_mask)


def _paged_attention_split_kernel(
    block_seq_ref,  # [num_blocks] int32 sequence that owns the query block
    block_start_ref,  # [num_blocks] int32 first query row of the block
    block_len_ref,  # [num_blocks] int32 valid query rows of the block; 0 = unused block
    block_pos_ref,  # [num_blocks] int32 kv position of the block's first query
    page_tables_ref,  # [B, max_pages_padded] int32, max_pages_padded % pages_per_block == 0
    splits_ref,  # [1] int32 splits in use this call, <= num_splits (the grid's third axis)
    q_ref,  # [T, Gp, H] queries of this program's kv head
    k_pages_ref,  # [P, S, H] this program's kv head
    v_pages_ref,  # [P, S, H] this program's kv head
    acc_ref,  # [T, Gp, H] float32 this split's unnormalised output (rows of an empty split stay unwritten)
    m_ref,  # [T, Gp] float32 this split's running max (MASK_VALUE: saw no key)
    l_ref,  # [T, Gp] float32 this split's softmax denominator (0: saw no key)
    *,
    block_q: int,
    pages_per_block: int,
    sm_scale: float,
    sliding_window: int | None,
):
    """num_splits > 1: program (blk, h, s) walks the s-th of `splits` equal contiguous shares of the KV blocks its
    queries see, sized from the sequence's actual length, so a short sequence leaves its last splits empty."""
    blk = pl.program_id(0)
    split = pl.program_id(2)  # (read outside pl.when: the interpreter has no rule for it inside a branch)
    q_len = block_len_ref[blk]
    q_start = block_start_ref[blk]
    first_pos = block_pos_ref[blk]
    group_padded = q_ref.shape[1]
    block_k = pages_per_block * k_pages_ref.shape[1]
    kv_lo, kv_hi = _kv_blocks(first_pos, q_len, block_k=block_k, sliding_window=sliding_window)
    per_split = pl.cdiv(kv_hi - kv_lo, splits_ref[0])
    lo = kv_lo + split * per_split
    hi = jnp.minimum(lo + per_split, kv_hi)
    row_mask = jnp.broadcast_to((jnp.arange(block_q) < q_len)[:, None], (block_q, group_padded))

    @pl.when((q_len > 0) & (lo < hi))
    def _():
        q, q_mask = _load_queries(q_ref, q_start, q_len, block_q=block_q)  # [rows, H]
        q_pos = first_pos + jnp.arange(q.shape[0]) // group_padded  # [rows]
        acc, m_i, l_i = _online_softmax(q, q_pos, block_seq_ref[blk], lo, hi, page_tables_ref, k_pages_ref,
                                        v_pages_ref, pages_per_block=pages_per_block, sm_scale=sm_scale,
                                        sliding_window=sliding_window)  # fmt: skip
        rows = pl.ds(q_start, block_q)
        plgpu.store(acc_ref.at[rows], acc.reshape(block_q, group_padded, q.shape[1]), mask=q_mask)
        plgpu.store(m_ref.at[rows], m_i.reshape(block_q, group_padded), mask=row_mask)
        plgpu.store(l_ref.at[rows], l_i.reshape(block_q, group_padded), mask=row_mask)

    @pl.when((q_len > 0) & (lo >= hi))
    def _():  # an empty split: mark its rows as having seen nothing (acc stays unwritten) and leave
        rows = pl.ds(q_start, block_q)
        plgpu.store(m_ref.at[rows], jnp.full((block_q, group_padded), MASK_VALUE, jnp.float32), mask=row_mask)
        plgpu.store(l_ref.at[rows], jnp.zeros((block_q, group_padded), jnp.float32), mask=row_mask)


def _combine_splits(acc, maxes, sums):
    """Merges the splits' partial softmaxes (log-sum-exp): acc [num_splits, T, K, Gp, H], maxes (m) and sums (l)
    [num_splits, T, K, Gp], all float32 -> [T, K, Gp, H] float32. A split whose l is 0 for a row saw none of its
    keys (and may never have written its acc): it gets weight 0."""
    seen = sums > 0
    m_max = jnp.max(jnp.where(seen, maxes, MASK_VALUE), axis=0)  # [T, K, Gp]
    weight = jnp.where(seen, jnp.exp(maxes - m_max), 0.0)  # [num_splits, T, K, Gp]
    denom = jnp.sum(jnp.where(seen, weight * sums, 0.0), axis=0)  # [T, K, Gp]
    numer = jnp.sum(jnp.where(seen[..., None], weight[..., None] * acc, 0.0), axis=0)  # [T, K, Gp, H]
    return numer / jnp.where(denom > 0, denom, 1.0)[..., None]


def _splits_in_use(block_len, num_kv_heads: int, tuning: AttentionTuning):
    """[1] int32: all num_splits, or with target_programs the fewest (a power of two) that reach it given the
    live query blocks (block_len [num_blocks] > 0)."""
    if not tuning.target_programs:
        return jnp.full((1,), tuning.num_splits, jnp.int32)
    programs = jnp.sum(block_len > 0, dtype=jnp.int32) * num_kv_heads
    smaller = jnp.array([1 << i for i in range(tuning.num_splits.bit_length() - 1)], jnp.int32)  # < num_splits
    too_few = jnp.sum(smaller * programs < tuning.target_programs, dtype=jnp.int32)
    return jnp.left_shift(1, too_few)[None]


def _query_blocks(seq_lens, cu_q_lens, num_seqs, *, num_tokens: int, block_q: int):
    """Splits every live sequence's query rows into blocks of <= block_q rows (jnp, traceable).

    Sum over b of ceil(q_len_b / block_q) <= T // block_q + B, and every used block holds a row, so
    min(T, T // block_q + B) blocks always suffice; unused blocks get length 0.
    """
    num_seqs_max = seq_lens.shape[0]
    num_blocks = max(1, min(num_tokens, num_tokens // block_q + num_seqs_max))
    live = jnp.arange(num_seqs_max) < num_seqs[0]
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [B]
    blocks_per_seq = (q_lens + block_q - 1) // block_q  # [B]
    cu_blocks = jnp.cumsum(blocks_per_seq)  # [B] end (exclusive) block of each sequence
    blk = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(count_le(cu_blocks, blk), num_seqs_max - 1)
    first_block = cu_blocks[seq] - blocks_per_seq[seq]
    offset = (blk - first_block) * block_q  # row offset of the block inside its sequence
    length = jnp.where(blk < cu_blocks[-1], jnp.clip(q_lens[seq] - offset, 0, block_q), 0)
    start = cu_q_lens[seq] + offset
    first_pos = seq_lens[seq] - q_lens[seq] + offset
    return seq, start.astype(jnp.int32), length.astype(jnp.int32), first_pos.astype(jnp.int32)


def _paged_attention_pallas(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, *,
                            sm_scale, sliding_window, tuning: AttentionTuning, interpret: bool):  # fmt: skip
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    group = num_heads // num_kv_heads
    group_padded = 1 << (group - 1).bit_length()
    q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if group_padded != group:
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, group_padded - group), (0, 0)))
    ppb = tuning.pages_per_block
    if page_tables.shape[1] % ppb:  # a copy of the table per call; max_model_len / page_size is usually a multiple
        page_tables = jnp.pad(page_tables, ((0, 0), (0, -page_tables.shape[1] % ppb)))  # null page 0
    blocks = _query_blocks(seq_lens, cu_q_lens, num_seqs, num_tokens=num_tokens, block_q=tuning.block_q)
    num_blocks = blocks[0].shape[0]

    params = dict(block_q=tuning.block_q, pages_per_block=ppb, sm_scale=sm_scale, sliding_window=sliding_window)
    whole = pl.BlockSpec()  # the whole array: block metadata and page tables are indexed by value
    head_spec = pl.BlockSpec((num_tokens, None, group_padded, head_dim), lambda b, h, *_: (0, h, 0, 0))
    pages_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda b, h, *_: (h, 0, 0, 0))
    compiler_params = plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages)
    name = f"ragged_paged_attention_{tuning.name}"
    if tuning.num_splits == 1:
        out = pl.pallas_call(
            functools.partial(_paged_attention_kernel, **params),
            grid=(num_blocks, num_kv_heads),
            in_specs=[whole] * 5 + [head_spec, pages_spec, pages_spec],
            out_specs=head_spec,
            out_shape=pallas_out_struct(q4.shape, q.dtype, q4, k_pages, v_pages),
            compiler_params=compiler_params,
            interpret=interpret,
            name=name,
        )(*blocks, page_tables, q4, k_pages, v_pages)
    else:
        splits = tuning.num_splits
        split_shape = (splits, num_tokens, num_kv_heads, group_padded)  # [num_splits, T, K, Gp]
        acc, maxes, sums = pl.pallas_call(
            functools.partial(_paged_attention_split_kernel, **params),
            grid=(num_blocks, num_kv_heads, splits),
            in_specs=[whole] * 6 + [head_spec, pages_spec, pages_spec],
            out_specs=[
                pl.BlockSpec((None, num_tokens, None, group_padded, head_dim), lambda b, h, s: (s, 0, h, 0, 0)),
                pl.BlockSpec((None, num_tokens, None, group_padded), lambda b, h, s: (s, 0, h, 0)),
                pl.BlockSpec((None, num_tokens, None, group_padded), lambda b, h, s: (s, 0, h, 0)),
            ],
            out_shape=[
                pallas_out_struct((*split_shape, head_dim), jnp.float32, q4, k_pages, v_pages),
                pallas_out_struct(split_shape, jnp.float32, q4, k_pages, v_pages),
                pallas_out_struct(split_shape, jnp.float32, q4, k_pages, v_pages),
            ],
            compiler_params=compiler_params,
            interpret=interpret,
            name=name,
        )(*blocks, page_tables, _splits_in_use(blocks[2], num_kv_heads, tuning), q4, k_pages, v_pages)
        out = _combine_splits(acc, maxes, sums)  # [T, K, Gp, H] float32
    out = out[:, :, :group].reshape(num_tokens, num_heads, head_dim)
    # No program writes padding rows: zero them (their buffer contents are undefined).
    valid = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]  # [T]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def pallas_gpu_unsupported_reason(q: jax.Array, k_pages: jax.Array, tuning: AttentionTuning) -> str | None:
    """Why the Triton lowering cannot run these shapes on a GPU, or None if it can."""
    head_dim = q.shape[-1]
    page_size = k_pages.shape[2]
    if not is_power_of_two(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if not is_power_of_two(page_size):
        return f"page_size {page_size} is not a power of two"
    if tuning.pages_per_block * page_size < 16:
        return f"block_k = pages_per_block * page_size = {tuning.pages_per_block * page_size} < 16"
    group = q.shape[1] // k_pages.shape[0]
    if tuning.block_q * (1 << (group - 1).bit_length()) < 16:
        return f"block_q * G = {tuning.block_q} * {group} rows < 16"
    for arr in (q, k_pages):
        if arr.dtype not in _KERNEL_DTYPES:
            return f"dtype {arr.dtype} is not one of float32, bfloat16, float16"
    return None


def impl_unavailable_reason(impl: str, option: str = "attn_impl") -> str | None:
    """Why `impl` cannot run compiled on this machine's default backend (so an engine can refuse it at start-up
    rather than fail inside its first step), or None. `option` names the setting in the message: the weight-matmul
    kernels of the same names (matmul_impl) need the same hardware."""
    if impl not in IMPLS:
        return f"attention implementation must be one of {IMPLS}, got {impl!r}"
    if impl == "pallas" and not on_gpu():
        return f"{option}='pallas' needs an NVIDIA GPU (the backend is {jax.default_backend()!r})"
    if impl == "mgpu" and not on_hopper():
        return f"{option}='mgpu' needs a Hopper GPU, sm_90 (the backend is {jax.default_backend()!r})"
    return None


def has_decode_kernel(impl: str, q, k_pages, page_tables, sliding_window: int | None = None) -> bool:
    """Whether `paged_attention(..., decode_only=True)` runs a kernel of its own under `impl` for arrays shaped like
    these (jax.ShapeDtypeStruct will do; q [B, N, H], k_pages [K, P, S, H], page_tables [B, max_pages]), so that a
    caller who knows a batch is decode-only gains by saying so (and compiling that case separately). Always for
    "mgpu", which raises on shapes it cannot run rather than falling back."""
    if impl == "mgpu":
        return True
    if impl != "auto" or not on_hopper():
        return False
    from jpaged.kernels.paged_decode_mgpu import decode_unsupported_reason

    return decode_unsupported_reason(q, k_pages, page_tables, sliding_window) is None


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "impl", "tuning", "interpret", "decode_only")
)
def paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, S, H]
    v_pages: jax.Array,  # [K, P, S, H]
    page_tables: jax.Array,  # [B, max_pages] int32
    seq_lens: jax.Array,  # [B] int32
    cu_q_lens: jax.Array,  # [B+1] int32
    num_seqs: jax.Array,  # [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    impl: str = "auto",
    tuning: AttentionTuning | None = None,
    interpret: bool = False,
    decode_only: bool = False,
) -> jax.Array:  # [T, N, H] in q.dtype
    """Ragged paged attention over a flat token batch mixing prefill chunks and decode tokens.

    q: [T, N, H]; sequence b owns rows cu_q_lens[b]:cu_q_lens[b+1]. k_pages/v_pages: [K, P, S, H] with
    N % K == 0; query head n reads kv head n // (N // K). page_tables: [B, max_pages] int32 (unused entries
    -> page 0). seq_lens: [B] int32 kv length including this step's tokens. cu_q_lens: [B+1] int32.
    num_seqs: [1] int32; sequences b >= num_seqs[0] are padding. Query i of sequence b sits at position
    seq_lens[b] - q_len_b + i and attends to kv positions <= its own (and > pos - sliding_window when set).
    Padding rows come back as 0. Scores and the softmax accumulate in float32.

    decode_only: the caller's promise that every live sequence has exactly one query, in row b (cu_q_lens is
    arange(B + 1) over the live sequences, T >= B). It lets "auto" and "mgpu" run the Mosaic GPU decode kernel
    (jpaged.kernels.paged_decode_mgpu), which streams pages by TMA at ~4 TB/s on an H200 where the ragged kernel
    gets ~2.5; a broken promise gives wrong results, not an error (the values are traced).
    impl: "reference" (jnp), "pallas" (Triton-style Pallas kernel; off GPU only with interpret=True), "mgpu"
    (the Mosaic GPU kernel for decode_only batches, raising where it cannot run them; "pallas" for other batches,
    with the split below), or
    "auto": on a Hopper GPU "mgpu" for decode_only batches it supports, else "pallas" on GPU where
    `pallas_gpu_unsupported_reason` finds nothing, else "reference". In other batches "mgpu" (on Hopper or
    interpreted) and "auto" (on Hopper) run the leading one-token sequences, a mixed step's running decodes, on the
    Mosaic GPU kernel and the rest on the ragged path (`_leading_decode_rows`; where the decode kernel cannot run the
    shapes, e.g. a sliding window or float32, every row stays on the ragged path).
    tuning: the ragged kernel's; None picks `default_tuning` for the static shapes (split-K for decode of few
    sequences). The decode kernel picks its own (`paged_decode_mgpu.default_tuning`).
    """
    _validate(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, sliding_window)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if decode_only and q.shape[0] < page_tables.shape[0]:
        raise ValueError(f"decode_only needs a q row per sequence: T = {q.shape[0]} < B = {page_tables.shape[0]}")
    if decode_only and impl in ("auto", "mgpu"):
        # Imported here: the Mosaic GPU module builds on this one's checks and reference.
        from jpaged.kernels import paged_decode_mgpu as mgpu

        num_rows = page_tables.shape[0]
        reason = mgpu.decode_unsupported_reason(q[:num_rows], k_pages, page_tables, sliding_window)
        if impl == "mgpu" and reason is not None:
            raise ValueError(f"impl='mgpu' cannot run this decode batch: {reason}")
        if impl == "mgpu" and not (interpret or on_hopper()):
            backend = jax.default_backend()
            raise ValueError(f"impl='mgpu' needs a Hopper GPU (sm_90) or interpret=True (backend is {backend!r})")
        # "auto" picks the kernel on Hopper only, as it picks the Triton kernel on GPUs only, interpret or not.
        if impl == "mgpu" or (reason is None and on_hopper()):
            out = _on_decode_kernel(q, k_pages, v_pages, page_tables, seq_lens, num_seqs, sm_scale=sm_scale,
                                    interpret=interpret)  # fmt: skip
            return jnp.pad(out, ((0, q.shape[0] - out.shape[0]), (0, 0), (0, 0)))  # rows past B: zero
    leading = None
    if impl in ("auto", "mgpu") and (on_hopper() or (impl == "mgpu" and interpret)):
        batch = (q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs)
        leading = _leading_decode_rows(*batch, sm_scale=sm_scale, sliding_window=sliding_window, interpret=interpret)
    if leading is not None:  # those sequences leave the ragged kernel: zero rows each
        num_leading, leading_out = leading
        cu_q_lens = jnp.maximum(cu_q_lens, num_leading)
    if impl == "mgpu":
        impl = "pallas"
    out = _ragged(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, sm_scale=sm_scale,
                  sliding_window=sliding_window, impl=impl, tuning=tuning, interpret=interpret)  # fmt: skip
    if leading is None:
        return out
    # Only the first min(T, B) rows can hold leading decodes: merged there and written back in place, not by a
    # select over all T rows (~200 MB a layer at 8,192 tokens; in the engine the two measured the same,
    # docs/benchmarks.md, seventeenth session).
    n = leading_out.shape[0]
    head = jnp.where((jnp.arange(n) < num_leading)[:, None, None], leading_out, out[:n])
    return jax.lax.dynamic_update_slice_in_dim(out, head, 0, axis=0)


def _leading_decode_rows(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, *, sm_scale,
                         sliding_window, interpret):  # fmt: skip
    """A mixed batch's leading run of one-token sequences (the scheduler puts running decodes first) through the
    Mosaic GPU decode kernel: sequence b < D has one query, in row b, at its last position, exactly the decode
    kernel's contract, given cu_q_lens[0] = 0 (as the runner packs every step). Returns (D [] int32, the decode
    kernel's [min(T, B), N, H] output: rows >= D zero), or None where the kernel cannot run the shapes (the ragged
    path then takes every row). In a Llama-2-7B fixed:512 run the prefill/mixed steps carry up to 252 such rows,
    which the ragged kernel streamed at ~2 TB/s (docs/benchmarks.md, sixteenth session). A step with none still
    launches the decode kernel, whose programs find no blocks and write zeros."""
    from jpaged.kernels import paged_decode_mgpu as mgpu

    num_rows = min(q.shape[0], page_tables.shape[0])
    tables = page_tables[:num_rows]
    if mgpu.decode_unsupported_reason(q[:num_rows], k_pages, tables, sliding_window) is not None:
        return None
    live = jnp.arange(num_rows) < num_seqs[0]
    one_token = live & (cu_q_lens[1 : num_rows + 1] - cu_q_lens[:num_rows] == 1)
    num_leading = jnp.sum(jnp.cumprod(one_token.astype(jnp.int32)), dtype=jnp.int32)
    out = _on_decode_kernel(q, k_pages, v_pages, page_tables, seq_lens, num_leading.reshape(1), sm_scale=sm_scale,
                            interpret=interpret)  # fmt: skip
    return num_leading, out


def _on_decode_kernel(q, k_pages, v_pages, page_tables, seq_lens, num_seqs, *, sm_scale, interpret) -> jax.Array:
    """Sequences b < num_seqs[0], one query each in row b, through the Mosaic GPU decode kernel over the first
    min(T, B) rows: out [min(T, B), N, H] (rows >= num_seqs[0] zero)."""
    from jpaged.kernels import paged_decode_mgpu as mgpu

    num_rows = min(q.shape[0], page_tables.shape[0])
    return mgpu.paged_decode_attention_mgpu(q[:num_rows], k_pages, v_pages, page_tables[:num_rows],
                                            seq_lens[:num_rows], num_seqs, sm_scale=sm_scale,
                                            interpret=interpret)  # fmt: skip


def _ragged(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, *, sm_scale, sliding_window, impl,
            tuning, interpret):  # fmt: skip
    """The ragged path: the Triton-lowered kernel or the jnp reference, as `impl` ("auto", "pallas", "reference")
    says."""
    if tuning is None:
        tuning = default_tuning(q.shape[0], page_tables.shape[0], q.shape[1], k_pages.shape[0])
    if impl == "auto":
        use_pallas = on_gpu() and pallas_gpu_unsupported_reason(q, k_pages, tuning) is None
        impl = "pallas" if use_pallas else "reference"
    if impl == "reference":
        return paged_attention_reference(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs,
                                         sm_scale=sm_scale, sliding_window=sliding_window)  # fmt: skip
    if not interpret:
        if not on_gpu():
            backend = jax.default_backend()
            raise ValueError(f"impl='pallas' needs a GPU (backend is {backend!r}) or interpret=True")
        reason = pallas_gpu_unsupported_reason(q, k_pages, tuning)
        if reason is not None:
            raise ValueError(f"impl='pallas' cannot run on GPU: {reason}")
    return _paged_attention_pallas(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs,
                                   sm_scale=sm_scale, sliding_window=sliding_window, tuning=tuning,
                                   interpret=interpret)  # fmt: skip
