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

GPU (Triton) constraints of the kernel, checked by `pallas_gpu_unsupported_reason`; `impl="auto"` falls
back to the reference when one fails, `impl="pallas"` raises: H a power of two >= 16; S a power of two;
block_q * G and pages_per_block * S >= 16; dtypes float32, bfloat16 or float16. G need not be a power of
two (q is padded to the next one: a copy of q, never of the pages). float32 products follow
jax_default_matmul_precision (TF32 on GPUs unless it says "highest"). Compiling on GPU warns that jax 0.11.2 deprecates
the Pallas Triton backend; nothing in jax replaces it for paged attention yet.

Measured on one H200 (bf16, S = 16, default tuning, decode at full context, K/V bytes read once / time):
Llama-3-8B heads (32/8, H 128) B 64 ctx 2048: 0.26 ms = 2.1 TB/s; B 256 ctx 1024: 0.46 ms = 2.35 TB/s;
B 16 ctx 16k: 0.66 ms = 1.6 TB/s (no split over the context yet, so few long sequences underfill the GPU).
Llama-2-7B heads (32/32) B 64 ctx 2048: 0.92 ms = 2.3 TB/s. JAX's own kernel: 0.40 / 0.68 / 0.74 / 1.16 ms.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import ManualAxisType

IMPLS = ("auto", "reference", "pallas")
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


def _is_power_of_two(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionTuning:
    """Block sizes of the Pallas kernel; one kernel, many tunings. All must be powers of two."""

    block_q: int = 16  # query tokens per program; the dot has block_q * G rows (Triton wants >= 16 of them)
    pages_per_block: int = 4  # KV pages per inner-loop iteration: block_k = pages_per_block * S kv positions
    num_warps: int = 4  # Triton lowering only
    num_stages: int = 2  # Triton lowering only (software pipelining depth of the KV loop)

    def __post_init__(self) -> None:
        for name in ("block_q", "pages_per_block", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or not _is_power_of_two(value):
                raise ValueError(f"AttentionTuning.{name} must be a power of two >= 1, got {value!r}")
        if self.num_warps > 32:
            raise ValueError(f"AttentionTuning.num_warps must be <= 32, got {self.num_warps}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"AttentionTuning.num_stages must be an int >= 1, got {self.num_stages!r}")

    @property
    def name(self) -> str:
        return f"bq{self.block_q}_ppb{self.pages_per_block}_w{self.num_warps}_s{self.num_stages}"


def default_tuning(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int) -> AttentionTuning:
    """The tuning for a shape family, chosen from static shapes (measured on an H200, docs/benchmarks.md).

    Decode-shaped batches (no more tokens than sequences: one query per sequence) put just enough queries in a
    block to fill the 16 rows a Triton dot needs with the G heads that share a KV head. Prefill-shaped batches
    use 64 rows (block_q * G), so each KV page is reused across enough queries: with MHA, 16 rows ran 4x slower
    than 64 (3.2 vs 0.8 ms for 4 x 2048 tokens).
    """
    group_padded = 1 << (num_heads // num_kv_heads - 1).bit_length()
    if num_tokens <= num_seqs:
        return AttentionTuning(block_q=max(1, 16 // group_padded), pages_per_block=4)
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
    blk = pl.program_id(0)
    q_len = block_len_ref[blk]

    @pl.when(q_len > 0)
    def _():
        seq = block_seq_ref[blk]
        q_start = block_start_ref[blk]
        first_pos = block_pos_ref[blk]
        _, group_padded, head_dim = q_ref.shape
        page_size = k_pages_ref.shape[1]
        block_k = pages_per_block * page_size
        rows = block_q * group_padded

        token_valid = jnp.arange(block_q) < q_len  # [block_q]
        q_mask = jnp.broadcast_to(token_valid[:, None, None], (block_q, group_padded, head_dim))
        q = plgpu.load(q_ref.at[pl.ds(q_start, block_q)], mask=q_mask, other=0)  # [block_q, Gp, H]
        q = q.reshape(rows, head_dim)  # row r is token r // Gp, head r % Gp
        q_pos = first_pos + jnp.arange(rows) // group_padded  # [rows]

        last_pos = first_pos + q_len - 1
        num_kv_blocks = pl.cdiv(last_pos + 1, block_k)
        first_kv_block = 0
        if sliding_window is not None:
            first_kv_block = jnp.maximum(first_pos - sliding_window + 1, 0) // block_k

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
        acc, _, l_i = jax.lax.fori_loop(first_kv_block, num_kv_blocks, body, (acc, m_i, l_i))
        # Every valid row sees at least its own position, so l_i > 0 there; invalid rows are not stored.
        out = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
        out = out.reshape(block_q, group_padded, head_dim).astype(o_ref.dtype)
        plgpu.store(o_ref.at[pl.ds(q_start, block_q)], out, mask=q_mask)


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

    kernel = functools.partial(_paged_attention_kernel, block_q=tuning.block_q, pages_per_block=ppb,
                               sm_scale=sm_scale, sliding_window=sliding_window)  # fmt: skip
    whole = pl.BlockSpec()  # the whole array: block metadata and page tables are indexed by value
    head_spec = pl.BlockSpec((num_tokens, None, group_padded, head_dim), lambda b, h: (0, h, 0, 0))
    pages_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda b, h: (h, 0, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        in_specs=[whole] * 5 + [head_spec, pages_spec, pages_spec],
        out_specs=head_spec,
        out_shape=pallas_out_struct(q4.shape, q.dtype, q4, k_pages, v_pages),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_{tuning.name}",
    )(*blocks, page_tables, q4, k_pages, v_pages)
    out = out[:, :, :group].reshape(num_tokens, num_heads, head_dim)
    # No program writes padding rows: zero them (their buffer contents are undefined).
    valid = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]  # [T]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def pallas_gpu_unsupported_reason(q: jax.Array, k_pages: jax.Array, tuning: AttentionTuning) -> str | None:
    """Why the Triton lowering cannot run these shapes on a GPU, or None if it can."""
    head_dim = q.shape[-1]
    page_size = k_pages.shape[2]
    if not _is_power_of_two(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if not _is_power_of_two(page_size):
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


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "impl", "tuning", "interpret"))
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
) -> jax.Array:  # [T, N, H] in q.dtype
    """Ragged paged attention over a flat token batch mixing prefill chunks and decode tokens.

    q: [T, N, H]; sequence b owns rows cu_q_lens[b]:cu_q_lens[b+1]. k_pages/v_pages: [K, P, S, H] with
    N % K == 0; query head n reads kv head n // (N // K). page_tables: [B, max_pages] int32 (unused entries
    -> page 0). seq_lens: [B] int32 kv length including this step's tokens. cu_q_lens: [B+1] int32.
    num_seqs: [1] int32; sequences b >= num_seqs[0] are padding. Query i of sequence b sits at position
    seq_lens[b] - q_len_b + i and attends to kv positions <= its own (and > pos - sliding_window when set).
    Padding rows come back as 0. Scores and the softmax accumulate in float32.

    impl: "reference" (jnp), "pallas" (Triton-style Pallas kernel; off GPU only with interpret=True), or
    "auto": "pallas" on GPU when `pallas_gpu_unsupported_reason` finds nothing, else "reference".
    """
    _validate(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs, sliding_window)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if tuning is None:
        tuning = default_tuning(q.shape[0], page_tables.shape[0], q.shape[1], k_pages.shape[0])
    if impl == "auto":
        use_pallas = _on_gpu() and pallas_gpu_unsupported_reason(q, k_pages, tuning) is None
        impl = "pallas" if use_pallas else "reference"
    if impl == "reference":
        return paged_attention_reference(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs,
                                         sm_scale=sm_scale, sliding_window=sliding_window)  # fmt: skip
    if not interpret:
        if not _on_gpu():
            backend = jax.default_backend()
            raise ValueError(f"impl='pallas' needs a GPU (backend is {backend!r}) or interpret=True")
        reason = pallas_gpu_unsupported_reason(q, k_pages, tuning)
        if reason is not None:
            raise ValueError(f"impl='pallas' cannot run on GPU: {reason}")
    return _paged_attention_pallas(q, k_pages, v_pages, page_tables, seq_lens, cu_q_lens, num_seqs,
                                   sm_scale=sm_scale, sliding_window=sliding_window, tuning=tuning,
                                   interpret=interpret)  # fmt: skip
