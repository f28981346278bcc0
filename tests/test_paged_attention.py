"""Ragged paged attention: the Pallas kernel (interpret mode here, compiled on a GPU) and the jnp reference
against a naive dense softmax attention in numpy, over randomly permuted page tables and mixed batches of
decode tokens, prefill chunks and padding.

T tokens, N q-heads, K kv-heads, G = N // K, H head dim, B sequences, P pages, S page size.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from jpaged.kernels.paged_attention import (
    AttentionTuning,
    default_tuning,
    paged_attention,
    paged_attention_reference,
    pallas_gpu_unsupported_reason,
)

# jax 0.11.2 warns on every Triton lowering of a Pallas kernel; that backend is what this kernel is written for.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """GPUs multiply float32 in TF32 by default (XLA and the Triton kernel alike); the 1e-5 comparisons need
    full float32 products."""
    with jax.default_matmul_precision("highest"):
        yield


# The package re-exports the function under the module's name, so fetch the module itself.
pa_module = importlib.import_module("jpaged.kernels.paged_attention")
NULL_PAGE_VALUE = 100.0  # page 0 holds junk that must never reach a valid output


@dataclasses.dataclass(frozen=True)
class Batch:
    q: np.ndarray  # [T, N, H]
    k_pages: np.ndarray  # [K, P, S, H]
    v_pages: np.ndarray  # [K, P, S, H]
    page_tables: np.ndarray  # [B, max_pages] int32
    seq_lens: np.ndarray  # [B] int32
    cu_q_lens: np.ndarray  # [B+1] int32
    num_seqs: np.ndarray  # [1] int32

    def args(self, dtype=jnp.float32):
        return (
            jnp.asarray(self.q, dtype), jnp.asarray(self.k_pages, dtype), jnp.asarray(self.v_pages, dtype),
            jnp.asarray(self.page_tables), jnp.asarray(self.seq_lens), jnp.asarray(self.cu_q_lens),
            jnp.asarray(self.num_seqs),
        )  # fmt: skip


def make_batch(
    rng: np.random.Generator,
    seqs: list[tuple[int, int]],  # (context before this step, query tokens this step) per live sequence
    *,
    page_size: int,
    num_kv_heads: int = 2,
    group: int = 1,
    head_dim: int = 8,
    num_pad_seqs: int = 2,
    num_pad_tokens: int = 3,
    spare_pages: int = 3,
) -> Batch:
    seq_lens = [ctx + q_len for ctx, q_len in seqs]
    pages_needed = [-(-length // page_size) for length in seq_lens]
    num_seqs_max = len(seqs) + num_pad_seqs
    max_pages = max(pages_needed) + 1  # at least one trailing entry points at the null page
    num_pages = 1 + sum(pages_needed) + spare_pages
    free_pages = iter(rng.permutation(np.arange(1, num_pages)))  # page 0 is the null page
    page_tables = np.zeros((num_seqs_max, max_pages), np.int32)
    for b, n in enumerate(pages_needed):
        page_tables[b, :n] = [next(free_pages) for _ in range(n)]
    cu_q_lens = np.zeros(num_seqs_max + 1, np.int32)
    cu_q_lens[1 : len(seqs) + 1] = np.cumsum([q_len for _, q_len in seqs])
    cu_q_lens[len(seqs) + 1 :] = cu_q_lens[len(seqs)]
    num_tokens = int(cu_q_lens[-1]) + num_pad_tokens
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k_pages = rng.standard_normal(shape, np.float32)
    v_pages = rng.standard_normal(shape, np.float32)
    k_pages[:, 0] = v_pages[:, 0] = NULL_PAGE_VALUE
    return Batch(
        q=rng.standard_normal((num_tokens, num_kv_heads * group, head_dim), np.float32),
        k_pages=k_pages,
        v_pages=v_pages,
        page_tables=page_tables,
        seq_lens=np.array(seq_lens + [0] * num_pad_seqs, np.int32),
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([len(seqs)], np.int32),
    )


def naive_attention(batch: Batch, *, sm_scale: float, sliding_window: int | None = None) -> np.ndarray:
    """Dense softmax attention, one sequence at a time, over the sequence's K/V laid out contiguously."""
    num_tokens, num_heads, head_dim = batch.q.shape
    num_kv_heads = batch.k_pages.shape[0]
    group = num_heads // num_kv_heads
    out = np.zeros((num_tokens, num_heads, head_dim), np.float32)
    for b in range(int(batch.num_seqs[0])):
        lo, hi, kv_len = batch.cu_q_lens[b], batch.cu_q_lens[b + 1], batch.seq_lens[b]
        pages = batch.page_tables[b]
        k = batch.k_pages[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :kv_len]  # [K, L, H]
        v = batch.v_pages[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :kv_len]  # [K, L, H]
        q = batch.q[lo:hi].reshape(hi - lo, num_kv_heads, group, head_dim)  # [q_len, K, G, H]
        q_pos = kv_len - (hi - lo) + np.arange(hi - lo)  # [q_len]
        kv_pos = np.arange(kv_len)
        allowed = kv_pos[None, :] <= q_pos[:, None]  # [q_len, L]
        if sliding_window is not None:
            allowed &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        scores = np.einsum("qkgh,klh->qkgl", q, k) * sm_scale
        scores = np.where(allowed[:, None, None, :], scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[lo:hi] = np.einsum("qkgl,klh->qkgh", probs, v).reshape(hi - lo, num_heads, head_dim)
    return out


def length_mix(page_size: int) -> list[tuple[int, int]]:
    """Decode tokens at kv lengths 1, S-1, S, S+1, 5S; prefill chunks from scratch and after some context."""
    s = page_size
    decode = [(length - 1, 1) for length in (1, s - 1, s, s + 1, 5 * s)]
    prefill = [(0, s - 1), (0, s + 1), (s, s), (s + 1, 2 * s + 3), (3 * s - 1, 1 + s // 2)]
    return decode + prefill


def shuffled(rng: np.random.Generator, seqs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [seqs[i] for i in rng.permutation(len(seqs))]


def assert_close(actual, expected, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, atol=atol, rtol=atol)


# --- the jnp reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_reference_matches_naive(page_size, group):
    rng = np.random.default_rng(page_size * 10 + group)
    batch = make_batch(rng, shuffled(rng, length_mix(page_size)), page_size=page_size, group=group)
    sm_scale = 1 / math.sqrt(batch.q.shape[-1])
    out = paged_attention(*batch.args(), sm_scale=sm_scale, impl="reference")
    assert out.shape == batch.q.shape and out.dtype == jnp.float32
    assert_close(out, naive_attention(batch, sm_scale=sm_scale))


@pytest.mark.parametrize("sliding_window", [1, 5, 8, 21])
def test_reference_sliding_window(sliding_window):
    rng = np.random.default_rng(sliding_window)
    batch = make_batch(rng, shuffled(rng, length_mix(8)), page_size=8, group=2)
    out = paged_attention(*batch.args(), sm_scale=0.3, sliding_window=sliding_window, impl="reference")
    assert_close(out, naive_attention(batch, sm_scale=0.3, sliding_window=sliding_window))


@pytest.mark.parametrize(
    "seqs",
    [
        [(0, 1), (6, 1), (17, 1), (40, 1), (7, 1)],  # decode only: query blocks of one token
        [(5, 150)],  # one long prefill chunk: blocks of 64 tokens
        [(0, 70), (3, 1), (9, 33)],  # mixed
    ],
    ids=["decode", "prefill", "mixed"],
)
def test_reference_block_sizes(seqs):
    rng = np.random.default_rng(len(seqs))
    batch = make_batch(rng, seqs, page_size=8, group=2, num_pad_seqs=0, num_pad_tokens=0)
    out = paged_attention(*batch.args(), sm_scale=0.3, impl="reference")
    assert_close(out, naive_attention(batch, sm_scale=0.3))


def test_reference_in_chunks(monkeypatch):
    """Past the gather budget the reference maps over chunks of query blocks (with a remainder chunk)."""
    rng = np.random.default_rng(7)
    batch = make_batch(rng, length_mix(8), page_size=8, group=2)
    num_kv_heads, _, page_size, head_dim = batch.k_pages.shape
    kv_len = batch.page_tables.shape[1] * page_size
    monkeypatch.setattr(pa_module, "_REFERENCE_GATHER_BUDGET", 7 * num_kv_heads * kv_len * head_dim)
    out = paged_attention_reference(*batch.args(), sm_scale=0.3, sliding_window=6)
    assert_close(out, naive_attention(batch, sm_scale=0.3, sliding_window=6))


def test_reference_bfloat16():
    rng = np.random.default_rng(3)
    batch = make_batch(rng, length_mix(16), page_size=16, group=2)
    args = batch.args(jnp.bfloat16)
    out = paged_attention(*args, sm_scale=0.3, impl="reference")
    assert out.dtype == jnp.bfloat16
    q, k_pages, v_pages = (np.asarray(arr, np.float32) for arr in args[:3])
    rounded = dataclasses.replace(batch, q=q, k_pages=k_pages, v_pages=v_pages)
    assert_close(out, naive_attention(rounded, sm_scale=0.3), atol=2e-2)


def test_auto_off_gpu_is_reference():
    rng = np.random.default_rng(4)
    batch = make_batch(rng, length_mix(8), page_size=8, group=2)
    auto = paged_attention(*batch.args(), sm_scale=0.3)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(auto, paged_attention(*batch.args(), sm_scale=0.3, impl="reference"))


def test_all_padding_batch_is_zero():
    rng = np.random.default_rng(5)
    batch = dataclasses.replace(make_batch(rng, [(3, 2)], page_size=8), num_seqs=np.array([0], np.int32))
    for impl, interpret in (("reference", False), ("pallas", True)):
        out = paged_attention(*batch.args(), sm_scale=0.3, impl=impl, interpret=interpret)
        np.testing.assert_array_equal(out, 0.0)


# --- the Pallas kernel --------------------------------------------------------------------------------


class TestPallasInterpret:
    """Every case runs in the Pallas interpreter; the subclass below reruns them compiled on a GPU."""

    interpret = True

    def run(self, batch: Batch, dtype=jnp.float32, **kwargs):
        args = batch.args(dtype)
        if not self.interpret:
            tuning = kwargs.get("tuning") or AttentionTuning()
            reason = pallas_gpu_unsupported_reason(args[0], args[1], tuning)
            if reason is not None:
                pytest.skip(f"not a GPU shape: {reason}")
        return paged_attention(*args, impl="pallas", interpret=self.interpret, **kwargs)

    @pytest.mark.parametrize("page_size", [8, 16, 32])
    @pytest.mark.parametrize("group", [1, 2, 4])
    def test_matches_reference_and_naive(self, page_size, group):
        rng = np.random.default_rng(page_size * 10 + group)
        head_dim = 8 if self.interpret else 16
        seqs = shuffled(rng, length_mix(page_size))
        batch = make_batch(rng, seqs, page_size=page_size, group=group, head_dim=head_dim)
        sm_scale = 1 / math.sqrt(head_dim)
        out = self.run(batch, sm_scale=sm_scale)
        assert out.shape == batch.q.shape and out.dtype == jnp.float32
        assert_close(out, naive_attention(batch, sm_scale=sm_scale))
        assert_close(out, paged_attention(*batch.args(), sm_scale=sm_scale, impl="reference"))

    @pytest.mark.parametrize("sliding_window", [1, 5, 21])
    def test_sliding_window(self, sliding_window):
        rng = np.random.default_rng(sliding_window)
        batch = make_batch(rng, shuffled(rng, length_mix(8)), page_size=8, group=2, head_dim=16)
        # block_k = 16 and windows shorter than a block, equal to a page, and over two blocks
        out = self.run(batch, sm_scale=0.3, sliding_window=sliding_window,
                       tuning=AttentionTuning(block_q=8, pages_per_block=2))  # fmt: skip
        assert_close(out, naive_attention(batch, sm_scale=0.3, sliding_window=sliding_window))

    @pytest.mark.parametrize(
        ("block_q", "pages_per_block", "group"),
        [(1, 1, 4), (4, 8, 2), (32, 2, 1), (16, 4, 3)],  # (16, 4, 3): G = 3 is padded to 4 heads
    )
    def test_tunings(self, block_q, pages_per_block, group):
        rng = np.random.default_rng(block_q + pages_per_block + group)
        batch = make_batch(rng, shuffled(rng, length_mix(16)), page_size=16, group=group, head_dim=16)
        tuning = AttentionTuning(block_q=block_q, pages_per_block=pages_per_block)
        out = self.run(batch, sm_scale=0.25, tuning=tuning)
        assert_close(out, naive_attention(batch, sm_scale=0.25))

    def test_decode_only_batch(self):
        rng = np.random.default_rng(11)
        seqs = [(int(n), 1) for n in rng.integers(0, 70, size=9)]
        batch = make_batch(rng, seqs, page_size=16, group=4, head_dim=16, num_pad_tokens=7)
        assert_close(self.run(batch, sm_scale=0.25), naive_attention(batch, sm_scale=0.25))

    def test_bfloat16(self):
        rng = np.random.default_rng(12)
        batch = make_batch(rng, shuffled(rng, length_mix(16)), page_size=16, group=2, head_dim=16)
        out = self.run(batch, jnp.bfloat16, sm_scale=0.25)
        assert out.dtype == jnp.bfloat16
        ref = paged_attention(*batch.args(jnp.bfloat16), sm_scale=0.25, impl="reference")
        assert_close(out, np.asarray(ref, np.float32), atol=2e-2)

    @pytest.mark.parametrize("num_splits", [1, 4])
    def test_under_shard_map(self, num_splits):
        """Callers shard K and N over a mesh axis; the kernel sees the local heads only."""
        rng = np.random.default_rng(13)
        devices = jax.devices()
        num_kv_heads = len(devices)
        batch = make_batch(rng, length_mix(8), page_size=8, num_kv_heads=num_kv_heads, group=2, head_dim=16)
        mesh = jax.sharding.Mesh(np.array(devices), ("model",))
        heads = PS(None, "model", None)  # q and the output: [T, N, H], N sharded
        pages = PS("model", None, None, None)  # [K, P, S, H], K sharded
        tuning = AttentionTuning(block_q=8, pages_per_block=2, num_splits=num_splits)
        attend = functools.partial(paged_attention, sm_scale=0.3, impl="pallas", interpret=self.interpret,
                                   tuning=tuning)  # fmt: skip
        fn = jax.shard_map(
            attend,
            mesh=mesh,
            in_specs=(heads, pages, pages, PS(), PS(), PS(), PS()),
            out_specs=heads,
        )
        assert_close(jax.jit(fn)(*batch.args()), naive_attention(batch, sm_scale=0.3))

    # --- split-K (num_splits > 1): each (query block, kv head) split over programs, then combined ----------

    def split_tuning(self, page_size: int, group: int, num_splits: int, **kwargs) -> AttentionTuning:
        """Small KV blocks (16 positions on a GPU, one page here) so that short sequences span several splits."""
        group_padded = 1 << (group - 1).bit_length()
        pages_per_block = 1 if self.interpret else max(1, 16 // page_size)
        return AttentionTuning(block_q=max(1, 16 // group_padded), pages_per_block=pages_per_block,
                               num_splits=num_splits, **kwargs)  # fmt: skip

    @pytest.mark.parametrize(
        ("page_size", "group", "num_splits"),
        [(ps, g, 2 + 2 * ((i + j) % 2)) for i, ps in enumerate((8, 16, 32)) for j, g in enumerate((1, 2, 4))],
    )
    def test_splits_match_reference(self, page_size, group, num_splits):
        """Decode at lengths 1, S-1, S, S+1, 5S, 13S+2 and prefill chunks, over permuted page tables; every page
        size and GQA ratio meets both 2 and 4 splits."""
        rng = np.random.default_rng(1000 + page_size * 10 + group + num_splits)
        head_dim = 8 if self.interpret else 16
        seqs = shuffled(rng, [*length_mix(page_size), (13 * page_size + 1, 1)])
        batch = make_batch(rng, seqs, page_size=page_size, group=group, head_dim=head_dim)
        sm_scale = 1 / math.sqrt(head_dim)
        out = self.run(batch, sm_scale=sm_scale, tuning=self.split_tuning(page_size, group, num_splits))
        assert out.shape == batch.q.shape and out.dtype == jnp.float32
        assert_close(out, paged_attention(*batch.args(), sm_scale=sm_scale, impl="reference"))
        assert_close(out, naive_attention(batch, sm_scale=sm_scale))

    @pytest.mark.parametrize("sliding_window", [1, 5, 21])
    def test_splits_sliding_window(self, sliding_window):
        """The window's first KV block, not block 0, starts the range the splits share."""
        rng = np.random.default_rng(100 + sliding_window)
        seqs = shuffled(rng, [*length_mix(8), (60, 1), (45, 20)])
        batch = make_batch(rng, seqs, page_size=8, group=2, head_dim=16)
        out = self.run(batch, sm_scale=0.3, sliding_window=sliding_window, tuning=self.split_tuning(8, 2, 4))
        assert_close(out, naive_attention(batch, sm_scale=0.3, sliding_window=sliding_window))

    def test_empty_splits(self):
        """Sequences with fewer KV blocks than splits leave splits empty (their acc is never written: NaN in
        the interpreter); 8 splits over 1, 2, 3 and 9 KV blocks (5 splits used) and 16 blocks (all 8 used)."""
        rng = np.random.default_rng(14)
        page_size = 16
        seqs = [(0, 1), (3, 1), (16, 1), (40, 1), (33, 2), (8 * page_size + 5, 1), (16 * page_size - 1, 1), (2, 1)]
        batch = make_batch(rng, seqs, page_size=page_size, group=4, head_dim=16, num_pad_tokens=5)
        out = self.run(batch, sm_scale=0.25, tuning=self.split_tuning(page_size, 4, 8))
        assert np.isfinite(np.asarray(out)).all()
        assert_close(out, naive_attention(batch, sm_scale=0.25))

    def test_splits_in_a_mixed_batch(self):
        """Prefill chunks of several query blocks each (causal rows that see only some splits' keys), decode
        tokens and padding in one batch, split 4 ways."""
        rng = np.random.default_rng(15)
        seqs = shuffled(rng, [(0, 37), (5, 1), (50, 23), (70, 1), (0, 1), (17, 16)])
        batch = make_batch(rng, seqs, page_size=8, group=2, head_dim=16)
        out = self.run(batch, sm_scale=0.3, tuning=self.split_tuning(8, 2, 4))
        assert_close(out, naive_attention(batch, sm_scale=0.3))

    def test_splits_target_programs(self):
        """With target_programs, 4 live sequences x 2 kv heads use 2 of the 8 splits (target 12): same result."""
        rng = np.random.default_rng(16)
        seqs = [(70, 1), (3, 1), (40, 1), (100, 1)]
        batch = make_batch(rng, seqs, page_size=8, group=2, head_dim=16)
        out = self.run(batch, sm_scale=0.3, tuning=self.split_tuning(8, 2, 8, target_programs=12))
        assert_close(out, naive_attention(batch, sm_scale=0.3))

    def test_splits_bfloat16(self):
        rng = np.random.default_rng(17)
        batch = make_batch(rng, shuffled(rng, length_mix(16)), page_size=16, group=2, head_dim=16)
        out = self.run(batch, jnp.bfloat16, sm_scale=0.25, tuning=self.split_tuning(16, 2, 4))
        assert out.dtype == jnp.bfloat16
        ref = paged_attention(*batch.args(jnp.bfloat16), sm_scale=0.25, impl="reference")
        assert_close(out, np.asarray(ref, np.float32), atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
class TestPallasGpu(TestPallasInterpret):
    interpret = False


# --- validation --------------------------------------------------------------------------------------


def _valid_args():
    batch = make_batch(np.random.default_rng(0), [(3, 2), (0, 1)], page_size=8, group=2)
    return dict(zip(("q", "k_pages", "v_pages", "page_tables", "seq_lens", "cu_q_lens", "num_seqs"),
                    batch.args(), strict=True))  # fmt: skip


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("q", lambda a: a[0], r"q must be \[T, N, H\]"),
        ("k_pages", lambda a: a[0], r"k_pages must be \[K, P, S, H\]"),
        ("v_pages", lambda a: a[:, :-1], r"v_pages must have k_pages' shape"),
        ("v_pages", lambda a: a.astype(jnp.bfloat16), r"dtypes differ"),
        ("q", lambda a: a[..., :4], r"head_dim of q \(4\) and of k/v pages \(8\) differ"),
        ("q", lambda a: a[:, :3], r"q heads \(3\) must be a multiple of kv heads \(2\)"),
        ("page_tables", lambda a: a.astype(jnp.int16), r"page_tables must be int32"),
        ("page_tables", lambda a: a[0], r"page_tables must have rank 2"),
        ("seq_lens", lambda a: a[:-1], r"seq_lens must be \[B=4\]"),
        ("cu_q_lens", lambda a: a[:-1], r"cu_q_lens must be \[B\+1=5\]"),
        ("cu_q_lens", lambda a: a.astype(jnp.uint32), r"cu_q_lens must be int32"),
        ("num_seqs", lambda a: jnp.concatenate([a, a]), r"num_seqs must be \[1\]"),
    ],
)
def test_validation_errors(name, bad, message):
    args = _valid_args()
    args[name] = bad(args[name])
    with pytest.raises(ValueError, match=message):
        paged_attention(*args.values(), sm_scale=0.3, impl="reference")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(impl="triton"), r"impl must be one of"),
        (dict(sliding_window=0), r"sliding_window must be None or an int >= 1"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paged_attention(*_valid_args().values(), sm_scale=0.3, **kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU error")
def test_pallas_off_gpu_needs_interpret():
    with pytest.raises(ValueError, match=r"needs a GPU .* or interpret=True"):
        paged_attention(*_valid_args().values(), sm_scale=0.3, impl="pallas")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(block_q=3), dict(block_q=0), dict(pages_per_block=6), dict(num_warps=64), dict(num_stages=0),
        dict(num_splits=3), dict(num_splits=0), dict(num_splits=4, target_programs=-1), dict(target_programs=264),
    ],
)  # fmt: skip
def test_tuning_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=r"AttentionTuning\."):
        AttentionTuning(**kwargs)


def test_gpu_constraints():
    tuning = AttentionTuning()
    q = jnp.zeros((4, 8, 128), jnp.bfloat16)
    pages = jnp.zeros((2, 10, 16, 128), jnp.bfloat16)
    assert pallas_gpu_unsupported_reason(q, pages, tuning) is None
    assert "head_dim 8" in pallas_gpu_unsupported_reason(q[..., :8], pages[..., :8], tuning)
    assert "head_dim 80" in pallas_gpu_unsupported_reason(q[..., :80], pages[..., :80], tuning)
    assert "page_size 12" in pallas_gpu_unsupported_reason(q, pages[:, :, :12], tuning)
    assert "rows < 16" in pallas_gpu_unsupported_reason(q, pages, AttentionTuning(block_q=2))
    assert "block_k" in pallas_gpu_unsupported_reason(q, pages[:, :, :4], AttentionTuning(pages_per_block=2))


# --- split-K: the default and the run-time split count -------------------------------------------------


def test_default_tuning_splits_decode_only():
    """Decode with few sequences splits (the padded bucket of 16 may hold a single stream); prefill never does."""
    for num_seqs in (1, 16):  # single-stream decode, alone or in the runner's smallest bucket
        for num_kv_heads in (32, 8):  # Llama-2-7B, Llama-3-8B
            tuning = default_tuning(num_seqs, num_seqs, 32, num_kv_heads)
            assert tuning.num_splits == 16 and tuning.target_programs > 0
    assert default_tuning(32, 32, 32, 8).num_splits > 1  # >= 17 live x 8 kv heads: still < 2 programs per SM
    assert default_tuning(256, 256, 32, 8).num_splits == 1  # a full GPU without splitting
    assert default_tuning(64, 64, 32, 32).num_splits == 1
    for num_tokens, num_seqs in ((2048, 4), (512, 64), (2, 1)):  # prefill and mixed batches
        assert default_tuning(num_tokens, num_seqs, 32, 8).num_splits == 1
    assert default_tuning(64, 64, 32, 8).name == AttentionTuning(block_q=4).name  # unsplit: name unchanged


@pytest.mark.parametrize(
    ("live", "num_kv_heads", "expected"),
    [(1, 32, 16), (2, 32, 8), (8, 32, 2), (9, 32, 1), (1, 8, 16), (16, 8, 4), (33, 8, 1), (0, 8, 16)],
)
def test_splits_in_use(live, num_kv_heads, expected):
    """The fewest power-of-two splits (<= num_splits) with live blocks x kv heads x splits >= target_programs."""
    block_len = jnp.array([1] * live + [0] * 5, jnp.int32)
    tuning = AttentionTuning(num_splits=16, target_programs=264)
    assert pa_module._splits_in_use(block_len, num_kv_heads, tuning).tolist() == [expected]
    assert pa_module._splits_in_use(block_len, num_kv_heads, AttentionTuning(num_splits=4)).tolist() == [4]


def test_combine_ignores_splits_that_saw_nothing():
    """An empty split (l = 0, m = MASK_VALUE, acc unwritten: NaN) gets weight 0; the merge equals one softmax."""
    rng = np.random.default_rng(18)
    scores = rng.standard_normal(10).astype(np.float32)
    values = rng.standard_normal((10, 3)).astype(np.float32)
    parts = [(scores[:6], values[:6]), (scores[6:], values[6:])]
    acc = [np.exp(s - s.max()) @ v for s, v in parts] + [np.full(3, np.nan, np.float32)]
    maxes = [s.max() for s, _ in parts] + [pa_module.MASK_VALUE]
    sums = [np.exp(s - s.max()).sum() for s, _ in parts] + [0.0]
    shape = (3, 1, 1, 1)  # [num_splits, T, K, Gp]
    out = pa_module._combine_splits(
        jnp.array(np.stack(acc)).reshape(*shape, 3),
        jnp.array(maxes, jnp.float32).reshape(shape),
        jnp.array(sums, jnp.float32).reshape(shape),
    )
    probs = np.exp(scores - scores.max())
    np.testing.assert_allclose(np.asarray(out).reshape(3), probs @ values / probs.sum(), rtol=1e-5, atol=1e-6)


def test_every_split_reports_its_rows(monkeypatch):
    """The kernel's partial outputs, before the combine: every split writes m and l for every valid row (a GPU
    buffer starts as garbage, the interpreter's as NaN), l = 0 exactly for splits past the sequence's KV blocks
    (split s of n blocks is empty when s * ceil(n / 4) >= n), and acc exactly where l > 0 (decode rows see
    every key of a non-empty split)."""
    rng = np.random.default_rng(19)
    seq_lens = [1, 8, 9, 17, 30, 41, 100]  # 1, 1, 2, 3, 4, 6, 13 KV blocks of one 8-position page
    batch = make_batch(rng, [(n - 1, 1) for n in seq_lens], page_size=8, group=2, head_dim=8, num_pad_tokens=0)
    partials = {}
    combine = pa_module._combine_splits

    def capture(acc, maxes, sums):
        partials.update(acc=np.asarray(acc), maxes=np.asarray(maxes), sums=np.asarray(sums))
        return combine(acc, maxes, sums)

    monkeypatch.setattr(pa_module, "_combine_splits", capture)
    tuning = AttentionTuning(block_q=8, pages_per_block=1, num_splits=4)
    pa_module._paged_attention_pallas(*batch.args(), sm_scale=0.3, sliding_window=None, tuning=tuning, interpret=True)
    acc, maxes, sums = (partials[name][:, : len(seq_lens), :, :2] for name in ("acc", "maxes", "sums"))  # valid rows
    assert np.isfinite(maxes).all() and np.isfinite(sums).all()
    num_blocks = -(-np.array(seq_lens) // 8)  # [B]
    has_keys = np.arange(4)[:, None] * -(-num_blocks // 4) < num_blocks  # [num_splits, B]
    np.testing.assert_array_equal(sums > 0, np.broadcast_to(has_keys[:, :, None, None], sums.shape))
    np.testing.assert_array_equal(maxes[sums == 0], np.float32(pa_module.MASK_VALUE))
    assert np.isfinite(acc[sums > 0]).all()
    assert np.isnan(acc[sums == 0]).all()  # empty splits exit without walking a block (acc keeps the interpreter's NaN)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU tests compile the kernel itself")
@pytest.mark.parametrize(
    ("num_tokens", "num_seqs", "num_kv_heads", "sliding_window"),
    [(16, 16, 32, None), (16, 16, 8, 4096), (2048, 16, 8, None)],
    ids=["llama2-7b-decode", "llama3-8b-decode-window", "llama3-8b-prefill"],
)
def test_lowers_to_triton_for_an_h200(monkeypatch, num_tokens, num_seqs, num_kv_heads, sliding_window):
    """Off GPU, the Triton lowering still runs (to Triton IR, not to PTX) when an H200 is declared: decode in
    the runner's smallest bucket (split 16 ways) and prefill (unsplit), under the default tuning."""
    from jax._src.pallas.triton import gpu_info

    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    tuning = default_tuning(num_tokens, num_seqs, 32, num_kv_heads)
    assert (tuning.num_splits > 1) == (num_tokens <= num_seqs)
    fn = jax.jit(lambda *args: pa_module._paged_attention_pallas(*args, sm_scale=0.1, sliding_window=sliding_window,
                                                                  tuning=tuning, interpret=False))  # fmt: skip
    pages = (num_kv_heads, 4096, 16, 128)
    tables = ((num_seqs, 256), (num_seqs,), (num_seqs + 1,), (1,))  # page tables, seq_lens, cu_q_lens, num_seqs
    shapes = [((num_tokens, 32, 128), jnp.bfloat16), (pages, jnp.bfloat16), (pages, jnp.bfloat16)]
    shapes += [(shape, jnp.int32) for shape in tables]
    target = "__gpu$xla.gpu.triton"
    checks = [jax.export.DisabledSafetyCheck.custom_call(target)]
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    module = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
    assert target in module and f"ragged_paged_attention_{tuning.name}" in module
    assert f"grid_z = {tuning.num_splits} : i32" in module
