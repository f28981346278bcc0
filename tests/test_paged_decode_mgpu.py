"""The Mosaic GPU decode kernel against the jnp reference: on CPU through Pallas' Mosaic GPU interpreter (TMA copies,
barriers and wgmmas included) and through the CUDA lowering; compiled on a GPU by the `gpu`-marked tests."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_h200

from jpaged.kernels import paged_decode_mgpu as mgpu
from jpaged.kernels import platform
from jpaged.kernels.paged_attention import has_decode_kernel, paged_attention
from jpaged.kernels.paged_decode_mgpu import (
    DecodeTuning,
    paged_decode_attention_mgpu,
    paged_decode_mgpu_unsupported_reason,
    paged_decode_reference,
)

MAX_REL_ERR = 1e-2  # bf16 output against the float32-softmax reference
# The split-K combine is a Triton-lowered kernel; jax 0.11 deprecates that backend (nothing replaces it yet).
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def make_inputs(*, page_size: int, group: int, lens: tuple[int, ...], num_kv_heads: int = 2, head_dim: int = 128,
                padding_rows: int = 1, extra_columns: int = 2, dtype=jnp.bfloat16, seed: int = 0):  # fmt: skip
    """Live sequences of `lens` over randomly permuted pages (page 0 is the null page unused columns point at), then
    `padding_rows` rows past num_seqs whose lengths and tables hold garbage the kernel must ignore."""
    rng = np.random.default_rng(seed)
    batch = len(lens) + padding_rows
    pages = [-(-n // page_size) for n in lens]
    max_pages = max(pages) + extra_columns
    num_pages = 1 + sum(pages) + 5
    perm = rng.permutation(np.arange(1, num_pages, dtype=np.int32))
    tables = np.zeros((batch, max_pages), np.int32)
    start = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[start : start + n]
        start += n
    tables[len(lens) :] = rng.integers(0, num_pages, (padding_rows, max_pages))
    seq_lens = np.concatenate([lens, rng.integers(1, max_pages * page_size + 1, padding_rows)]).astype(np.int32)
    num_heads = num_kv_heads * group
    q = rng.standard_normal((batch, num_heads, head_dim))
    k = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    v = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(tables),
            jnp.asarray(seq_lens), jnp.asarray([len(lens)], jnp.int32))  # fmt: skip


def lengths(page_size: int, long: int) -> tuple[int, ...]:
    return (1, page_size - 1, page_size, page_size + 1, long)


def check(args, *, tuning: DecodeTuning | None = None, interpret: bool, sm_scale: float = 0.125) -> None:
    out = paged_decode_attention_mgpu(*args, sm_scale=sm_scale, tuning=tuning, interpret=interpret)
    ref = paged_decode_reference(*args, sm_scale=sm_scale)
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    live = int(args[5][0])
    assert np.all(out[live:] == 0), "padding rows must come back as zeros"
    for b in range(live):
        err = np.linalg.norm(out[b] - ref[b]) / np.linalg.norm(ref[b])
        assert err <= MAX_REL_ERR, f"row {b} (seq_len {int(args[4][b])}): relative error {err:.3g}"


# Every page size with a 64-position block (block_kv = pages_per_block * S), G of MHA, Llama-3 and 8.
SWEEP = [(s, g) for s in (8, 16, 32) for g in (1, 4, 8)]


# -- Mosaic GPU interpreter (CPU) -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("page_size", "group"), SWEEP, ids=[f"S{s}-G{g}" for s, g in SWEEP])
def test_interpret_sweep(page_size, group):
    tuning = DecodeTuning(pages_per_block=64 // page_size)
    args = make_inputs(page_size=page_size, group=group, lens=lengths(page_size, long=4 * 64 + 37))
    check(args, tuning=tuning, interpret=True)


TUNINGS = {
    "one-stage": DecodeTuning(num_stages=1),
    "three-stages": DecodeTuning(num_stages=3),
    "block-128": DecodeTuning(pages_per_block=8),
    "split-2": DecodeTuning(num_splits=2),
    "split-4-stages-3": DecodeTuning(num_splits=4, num_stages=3),  # uneven shares (300: 2, 2, 1, 0 blocks), empty ones
    "split-8": DecodeTuning(num_splits=8),
}


@pytest.mark.parametrize("tuning", list(TUNINGS.values()), ids=list(TUNINGS))
def test_interpret_tunings(tuning):
    args = make_inputs(page_size=16, group=4, lens=(1, 15, 16, 17, 7 * 64 + 5, 300), seed=1)
    check(args, tuning=tuning, interpret=True)


# Positions on M (the transposed formulation; lane lowering): Q = 8 or 16 columns, q copies pulled back from q's end
# (the last programs' queries sit at tile columns > 0), split-K with uneven and empty shares.
POSITIONS_ON_M = {
    "S16-G1": (16, 1, DecodeTuning(positions_on_m=True, semantics="lane")),
    "S8-G8-block-128": (8, 8, DecodeTuning(pages_per_block=16, positions_on_m=True, semantics="lane")),
    "S16-G12": (16, 12, DecodeTuning(positions_on_m=True, semantics="lane")),
    "S16-G1-split-2": (16, 1, DecodeTuning(num_splits=2, positions_on_m=True, semantics="lane")),
    "S32-G4-split-4-stages-3": (
        32,
        4,
        DecodeTuning(pages_per_block=2, num_splits=4, num_stages=3, positions_on_m=True, semantics="lane"),
    ),
}


@pytest.mark.parametrize(("page_size", "group", "tuning"), list(POSITIONS_ON_M.values()), ids=list(POSITIONS_ON_M))
def test_interpret_positions_on_m(page_size, group, tuning):
    # No padding rows: the last sequence is live, so the programs whose copies are pulled back write real outputs.
    args = make_inputs(page_size=page_size, group=group, lens=lengths(page_size, long=4 * 64 + 37),
                       num_kv_heads=max(2, 8 // group), padding_rows=0)  # fmt: skip
    rows = args[0].shape[0] * args[0].shape[1]
    last_program_row = rows - group  # the last (sequence, kv head)'s first q row
    assert int(args[5][0]) == args[0].shape[0]
    assert (last_program_row > rows - mgpu.q_columns(group)) == (group % 8 != 0)  # pulled back unless G fills tiles
    check(args, tuning=tuning, interpret=True)


def test_combine_picks_the_programs_columns_with_positions_on_m():
    """The combine over positions-on-M partials ([splits, B, K, H, Q] tiles): each query's column, shifted for the
    programs whose q copy was pulled back from q's end; the other columns hold garbage (NaN, inf) it must not read."""
    rng = np.random.default_rng(0)
    splits, batch, kv_heads, group, head_dim = 2, 2, 3, 3, 16
    heads, q_cols = kv_heads * group, mgpu.q_columns(group)  # 9 heads, Q 8; B * N = 18 rows
    rows = batch * heads
    o_part = rng.choice([np.nan, np.inf], size=(splits, batch, kv_heads, head_dim, q_cols)).astype(np.float32)
    lse = rng.choice([np.nan, np.inf], size=(splits, batch, kv_heads, q_cols)).astype(np.float32)
    want = np.zeros((rows, head_dim), np.float32)
    for b in range(batch):
        for h in range(kv_heads):
            first_row = b * heads + h * group
            col = first_row - min(first_row, rows - q_cols)  # > 0 for (1, 1) and (1, 2): rows 12 and 15
            values = rng.standard_normal((splits, head_dim, group)).astype(np.float32)
            weights = rng.uniform(-3, 3, (splits, group)).astype(np.float32)
            o_part[:, b, h, :, col : col + group] = values
            lse[:, b, h, col : col + group] = weights
            w = np.exp2(weights - weights.max(axis=0))
            want[first_row : first_row + group] = ((w[:, None, :] * values).sum(axis=0) / w.sum(axis=0)).T
    got = mgpu._combine_splits(jnp.asarray(o_part), jnp.asarray(lse), num_heads=heads, group=group,
                               dtype=jnp.float32, interpret=True, positions_on_m=True)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_interpret_head_dim_64_float16_uneven_table():
    # H 64; float16; a table width (12 columns) that is no multiple of the block (4) and of the copy quantum (32).
    args = make_inputs(page_size=16, group=2, lens=(33, 190), head_dim=64, extra_columns=0, dtype=jnp.float16)
    assert args[3].shape[1] == 12
    check(args, tuning=DecodeTuning(num_splits=2), interpret=True)


def test_interpret_few_rows_and_no_padding():
    # B * N < 64 q rows (a program copies its G rows; the tile's other rows are NaN here and must not reach the
    # output); num_seqs == B.
    args = make_inputs(page_size=16, group=1, lens=(70,), num_kv_heads=1, padding_rows=0)
    check(args, interpret=True)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_combine_reads_only_the_programs_rows(group):
    """The combine against a plain merge: [splits, B * N, H] partials, garbage (NaN, inf, a huge finite value) in the
    lse entries past G, which hold the q tile's uninitialised rows, and an empty split (MASK_VALUE) per head."""
    rng = np.random.default_rng(group)
    splits, batch, kv_heads, head_dim = 4, 2, 2, 16
    heads = kv_heads * group
    o_part = rng.standard_normal((splits, batch * heads, head_dim)).astype(np.float32)
    lse = np.full((splits, batch, kv_heads, mgpu.ROWS), np.nan, np.float32)
    lse[..., group:] = rng.choice([np.nan, np.inf, -np.inf, 1e30], size=lse[..., group:].shape)
    lse[..., :group] = rng.uniform(-5, 5, (splits, batch, kv_heads, group))
    lse[1, ..., :group] = mgpu.MASK_VALUE  # split 1 saw nothing: weight 0 (and zeros, as the kernel writes them)
    o_part[1] = 0.0
    got = mgpu._combine_splits(jnp.asarray(o_part), jnp.asarray(lse), num_heads=heads, group=group,
                               dtype=jnp.float32, interpret=True, positions_on_m=False)  # fmt: skip
    live = [0, 2, 3]
    weight = np.exp2(lse[live, ..., :group] - lse[live, ..., :group].max(axis=0))  # [3, B, K, G]
    weight = weight.reshape(len(live), batch * heads, 1)
    want = (weight * o_part[live]).sum(axis=0) / weight.sum(axis=0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


# -- lowering for CUDA on CPU (Mosaic GPU's Python passes, layout inference included; not ptxas) ----------------------
ANCHORS = {  # (B, N, K, context): the benchmark's decode shapes, H 128, S 16, bf16
    "llama3-8b-B64": (64, 32, 8, 2048),
    "llama2-7b-B64": (64, 32, 32, 2048),
    "llama3-8b-B16-16k": (16, 32, 8, 16384),
    "llama3-8b-B256": (256, 32, 8, 1024),
}


def lower_for_cuda(batch, heads, kv_heads, context, tuning, *, page_size=16, head_dim=128) -> str:
    max_pages = context // page_size
    num_pages = batch * max_pages + 1
    sds = jax.ShapeDtypeStruct
    kv = sds((kv_heads, num_pages, page_size, head_dim), jnp.bfloat16)
    args = (sds((batch, heads, head_dim), jnp.bfloat16), kv, kv, sds((batch, max_pages), jnp.int32),
            sds((batch,), jnp.int32), sds((1,), jnp.int32))  # fmt: skip
    fn = functools.partial(paged_decode_attention_mgpu, sm_scale=0.088, tuning=tuning)
    return lower_for_h200(fn, *args)  # the split-K combine is a Triton kernel: it asks which GPU


@pytest.mark.parametrize("semantics", mgpu.SEMANTICS)
@pytest.mark.parametrize("anchor", list(ANCHORS), ids=list(ANCHORS))
def test_lowers_for_cuda(anchor, semantics):
    batch, heads, kv_heads, context = ANCHORS[anchor]
    splits = mgpu.default_tuning(batch, heads, kv_heads).num_splits  # what the engine runs
    for tuning in (DecodeTuning(num_splits=splits), DecodeTuning(num_stages=3, num_splits=max(2, splits))):
        tuning = dataclasses.replace(tuning, semantics=semantics)
        text = lower_for_cuda(batch, heads, kv_heads, context, tuning)
        assert "mosaic_gpu" in text


@pytest.mark.parametrize("semantics", mgpu.SEMANTICS)
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_lowers_for_cuda_page_sizes(page_size, semantics):
    tuning = DecodeTuning(pages_per_block=128 // page_size, num_splits=2, semantics=semantics)
    assert "mosaic_gpu" in lower_for_cuda(8, 8, 1, 4096, tuning, page_size=page_size)


@pytest.mark.parametrize("semantics", mgpu.SEMANTICS)
@pytest.mark.parametrize("splits", [1, 4])
def test_lowers_for_cuda_p_in_registers(splits, semantics):
    tuning = DecodeTuning(p_in_registers=True, num_splits=splits, semantics=semantics)
    assert "mosaic_gpu" in lower_for_cuda(64, 32, 32, 2048, tuning)


@pytest.mark.parametrize("splits", [1, 8])
def test_lowers_for_cuda_positions_on_m(splits):
    tuning = DecodeTuning(positions_on_m=True, semantics="lane", num_splits=splits)
    assert "mosaic_gpu" in lower_for_cuda(64 // splits, 32, 32 if splits == 1 else 8, 2048, tuning)


def test_interpreter_refuses_p_in_registers():
    args = make_inputs(page_size=16, group=1, lens=(20,))
    with pytest.raises(ValueError, match="SMEM only"):
        paged_decode_attention_mgpu(*args, sm_scale=0.1, tuning=DecodeTuning(p_in_registers=True), interpret=True)


@pytest.mark.parametrize("semantics", mgpu.SEMANTICS)
def test_lowers_for_cuda_head_dim_64_one_stage(semantics):
    tuning = DecodeTuning(num_stages=1, num_splits=4, semantics=semantics)
    assert "mosaic_gpu" in lower_for_cuda(4, 16, 2, 1000, tuning, head_dim=64)


# -- validation -------------------------------------------------------------------------------------------------------
def test_tuning_rejects_bad_values():
    for bad in (dict(pages_per_block=3), dict(pages_per_block=0), dict(num_stages=0), dict(num_stages=9),
                dict(num_splits=0), dict(num_splits=3), dict(num_splits=True), dict(semantics="thread"),
                dict(p_in_registers=1), dict(positions_on_m=True),
                dict(positions_on_m=True, semantics="lane", p_in_registers=True)):  # fmt: skip
        with pytest.raises(ValueError):
            DecodeTuning(**bad)
    assert DecodeTuning(num_splits=4).name == "ppb4_st2_split4"
    assert DecodeTuning(positions_on_m=True, semantics="lane").name == "ppb4_st2_posm_lane"
    # The most splits that keep B * K * splits within one wave of 264 programs (2 CTAs on each of 132 SMs).
    assert mgpu.default_tuning(64, 32, 8).num_splits == 1  # 512 programs
    assert mgpu.default_tuning(16, 32, 8).num_splits == 2  # 128 programs -> 256
    assert mgpu.default_tuning(1, 32, 32).num_splits == 8  # Llama-2-7B single stream: 32 -> 256
    assert mgpu.default_tuning(3, 32, 32).num_splits == 2  # 96 -> 192
    assert mgpu.default_tuning(1, 1, 1).num_splits == 16  # at most 16
    # Positions on M (lane lowering) where each q head has its own kv head and the B * N q rows tile by 8; q rows on M
    # at G > 1 (it lost at G 4) and where the q copy could not tile.
    assert mgpu.default_tuning(128, 32, 32) == DecodeTuning(positions_on_m=True, semantics="lane")
    assert mgpu.default_tuning(1, 32, 32).positions_on_m
    assert mgpu.default_tuning(64, 32, 8) == DecodeTuning()
    assert mgpu.default_tuning(3, 6, 6) == DecodeTuning(num_splits=8)  # 18 q rows
    for batch, heads, kv_heads in ((128, 32, 32), (1, 32, 32), (64, 32, 8), (3, 6, 6), (5, 8, 8)):
        q = jax.ShapeDtypeStruct((batch, heads, 128), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((kv_heads, 64, 16, 128), jnp.bfloat16)
        tables = jax.ShapeDtypeStruct((batch, 128), jnp.int32)
        tuning = mgpu.default_tuning(batch, heads, kv_heads)
        assert paged_decode_mgpu_unsupported_reason(q, k, tables, tuning) is None, (batch, heads, kv_heads)


def test_unsupported_reason():
    args = make_inputs(page_size=16, group=4, lens=(20,))
    q, k, _, tables = args[:4]
    ok = DecodeTuning()
    assert paged_decode_mgpu_unsupported_reason(q, k, tables, ok) is None
    f32 = paged_decode_mgpu_unsupported_reason(q.astype(jnp.float32), k.astype(jnp.float32), tables, ok)
    assert "float32" in f32
    assert "differs" in paged_decode_mgpu_unsupported_reason(q, k.astype(jnp.float16), tables, ok)
    assert "head_dim" in paged_decode_mgpu_unsupported_reason(q[..., :96], k[..., :96], tables, ok)
    assert "page_size" in paged_decode_mgpu_unsupported_reason(q, k[:, :, :12], tables, ok)
    assert "block_kv" in paged_decode_mgpu_unsupported_reason(q, k, tables, DecodeTuning(pages_per_block=2))
    wide = jnp.zeros((q.shape[0], 130 * 8), jnp.int32)
    assert "SMEM" in paged_decode_mgpu_unsupported_reason(q, k, wide, DecodeTuning(pages_per_block=8, num_stages=3))
    posm = DecodeTuning(positions_on_m=True, semantics="lane")
    assert paged_decode_mgpu_unsupported_reason(q, k, tables, posm) is None  # B * N = 2 * 8
    assert "8-row tiling" in paged_decode_mgpu_unsupported_reason(q[:, :6], k[:3], tables, posm)  # 2 * 6 rows


def test_wrapper_validates():
    q, k, v, tables, lens, num_seqs = make_inputs(page_size=16, group=4, lens=(20,))
    call = functools.partial(paged_decode_attention_mgpu, sm_scale=0.1, interpret=True)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        call(q, k, v, tables, lens, num_seqs, sliding_window=8)
    with pytest.raises(ValueError, match=r"\[B, N, H\]"):
        call(q[None], k, v, tables, lens, num_seqs)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        call(q[:, :3], k, v, tables, lens, num_seqs)
    with pytest.raises(ValueError, match="seq_lens"):
        call(q, k, v, tables, lens[:1], num_seqs)
    with pytest.raises(ValueError, match="int32"):
        call(q, k, v, tables.astype(jnp.int16), lens, num_seqs)
    with pytest.raises(ValueError, match="cannot run these shapes"):
        call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), tables, lens, num_seqs)


# -- through paged_attention, the engine's one entry point -----------------------------------------------------------
def as_ragged(args, extra_rows: int):
    """The decode batch as `paged_attention` takes it: q with `extra_rows` padding token rows, cu_q_lens arange."""
    q, k, v, tables, lens, num_seqs = args
    live = int(num_seqs[0])
    cu_q_lens = jnp.minimum(jnp.arange(q.shape[0] + 1, dtype=jnp.int32), live)
    q = jnp.concatenate([q, jnp.ones((extra_rows, *q.shape[1:]), q.dtype)])
    return q, k, v, tables, lens, cu_q_lens, num_seqs


@pytest.mark.parametrize(
    "interpret", [pytest.param(True, id="interpret"), pytest.param(False, id="gpu", marks=pytest.mark.gpu)]
)
def test_entry_point_runs_decode_batches_on_the_mosaic_kernel(interpret):
    args = make_inputs(page_size=16, group=4, lens=lengths(16, long=200), num_kv_heads=2, padding_rows=2)
    ragged = as_ragged(args, extra_rows=3)
    call = functools.partial(paged_attention, *ragged, sm_scale=0.125, impl="mgpu", interpret=interpret,
                             decode_only=True)  # fmt: skip
    jaxpr = str(jax.make_jaxpr(call)().jaxpr)  # the kernel, not a fallback (one interpreted run: ~25 s on CPU)
    assert "paged_decode_mgpu" in jaxpr and "ragged_paged_attention" not in jaxpr
    out = call()
    ref = paged_attention(*ragged, sm_scale=0.125, impl="reference")
    assert out.shape == ref.shape == ragged[0].shape
    np.testing.assert_array_equal(np.asarray(out[args[0].shape[0] :]), 0)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= MAX_REL_ERR


# Mixed batches: (context before, query tokens) per live sequence. The leading one-token sequences (running decodes,
# a one-token prompt) go to the decode kernel, the rest (a chunk, a later one-token sequence, a short prompt) to the
# ragged kernel; all lead (a batch of decodes not flagged decode_only); G = 4 (the kernel's q-rows-on-M formulation,
# as Llama-3 and Mixtral run it). (None leading is the ragged path as before, the decode kernel's output masked out
# entirely.) id: (sequences, G)
MIXED = {
    "three-leading": ([(40, 1), (15, 1), (0, 1), (30, 20), (50, 1), (3, 5)], 1),
    "all-leading": ([(40, 1), (15, 1), (70, 1), (1, 1), (50, 1), (17, 1)], 1),
    "G4-two-leading": ([(33, 1), (64, 1), (30, 20), (50, 1), (3, 5), (9, 1)], 4),
}


@pytest.mark.parametrize(
    "interpret", [pytest.param(True, id="interpret"), pytest.param(False, id="gpu", marks=pytest.mark.gpu)]
)
@pytest.mark.parametrize("mix", list(MIXED), ids=list(MIXED))
def test_entry_point_runs_a_mixed_batchs_leading_decodes_on_the_mosaic_kernel(mix, interpret):
    from test_paged_attention import make_batch

    if not interpret and not platform.on_hopper():
        pytest.skip("needs a Hopper GPU")
    seqs, group = MIXED[mix]
    batch = make_batch(np.random.default_rng(7), seqs, page_size=16, num_kv_heads=2, group=group, head_dim=128)
    args = batch.args(jnp.bfloat16)  # 8 sequences (2 padding) x 2 or 8 heads: the q copy's 8-row tiling
    call = functools.partial(paged_attention, *args, sm_scale=0.125, interpret=interpret)
    out = np.asarray(call(impl="mgpu"), np.float32)
    ref = np.asarray(call(impl="reference"), np.float32)
    rows = int(batch.cu_q_lens[batch.num_seqs[0]])
    np.testing.assert_array_equal(out[rows:], 0)  # padding rows
    for b in range(int(batch.num_seqs[0])):  # each sequence's rows, so a swapped row cannot hide in the norm
        lo, hi = batch.cu_q_lens[b], batch.cu_q_lens[b + 1]
        assert np.linalg.norm(out[lo:hi] - ref[lo:hi]) / np.linalg.norm(ref[lo:hi]) <= MAX_REL_ERR, (mix, b)
    jaxpr = str(jax.make_jaxpr(functools.partial(call, impl="mgpu"))().jaxpr)
    assert "paged_decode_mgpu" in jaxpr and "ragged_paged_attention" in jaxpr  # both kernels, the rows split
    assert "dynamic_update_slice" in jaxpr  # the decode rows written into the ragged output, not a select over T rows
    assert "paged_decode_mgpu" not in str(jax.make_jaxpr(functools.partial(call, impl="pallas"))().jaxpr)
    # Where the decode kernel cannot run the batch, every row stays on the ragged path (traced only).
    window = str(jax.make_jaxpr(functools.partial(call, impl="mgpu", sliding_window=32))().jaxpr)
    f32 = str(jax.make_jaxpr(functools.partial(paged_attention, *batch.args(jnp.float32), sm_scale=0.125,
                                               impl="mgpu", interpret=interpret))().jaxpr)  # fmt: skip
    assert "paged_decode_mgpu" not in window and "paged_decode_mgpu" not in f32


def test_entry_point_decode_only_elsewhere():
    args = make_inputs(page_size=16, group=4, lens=(20, 3))
    ragged = as_ragged(args, extra_rows=1)
    call = functools.partial(paged_attention, sm_scale=0.125)
    if not platform.on_hopper():  # "auto" without a Hopper GPU: the ragged path, decode_only or not
        np.testing.assert_array_equal(call(*ragged, decode_only=True), call(*ragged))
        interpreted = call(*ragged, decode_only=True, interpret=True)  # interpret=True does not make "auto" Mosaic
        np.testing.assert_array_equal(interpreted, call(*ragged, impl="reference"))
        with pytest.raises(ValueError, match="needs a Hopper GPU"):
            call(*ragged, impl="mgpu", decode_only=True)
    np.testing.assert_array_equal(call(*ragged, impl="reference", decode_only=True), call(*ragged, impl="reference"))
    with pytest.raises(ValueError, match=r"a q row per sequence: T = 2 < B = 3"):
        call(ragged[0][:2], *ragged[1:], decode_only=True)
    with pytest.raises(ValueError, match="impl='mgpu' cannot run this decode batch: sliding_window"):
        call(*ragged, impl="mgpu", decode_only=True, interpret=True, sliding_window=8)
    f32 = [x.astype(jnp.float32) for x in ragged[:3]]
    with pytest.raises(ValueError, match="impl='mgpu' cannot run this decode batch: dtype float32"):
        call(*f32, *ragged[3:], impl="mgpu", decode_only=True, interpret=True)


def test_has_decode_kernel():
    q, k, _, tables = make_inputs(page_size=16, group=4, lens=(20,))[:4]
    assert has_decode_kernel("mgpu", q, k, tables)
    assert not has_decode_kernel("pallas", q, k, tables) and not has_decode_kernel("reference", q, k, tables)
    assert has_decode_kernel("auto", q, k, tables) == platform.on_hopper()
    # Shapes the Mosaic kernel cannot run: "auto" compiles no separate decode steps for them.
    assert not has_decode_kernel("auto", q.astype(jnp.float32), k.astype(jnp.float32), tables)
    assert not has_decode_kernel("auto", q, k, tables, sliding_window=64)


# -- compiled on a GPU ------------------------------------------------------------------------------------------------
def tma_wgmma_smoke(a, b, *, interpret: bool):
    """The kernel's building blocks alone: two swizzled TMA loads on one barrier, a wgmma with B transposed (as the
    kernel's QK), a float32 tile stored back through SMEM. If this fails on a GPU, Mosaic GPU itself is the problem."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(a_ref, b_ref, o_ref, a_smem, b_smem, o_smem, bar):
        plgpu.copy_gmem_to_smem(a_ref, a_smem, bar)
        plgpu.copy_gmem_to_smem(b_ref, b_smem, bar)
        plgpu.barrier_wait(bar)

        def matmul(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
            return acc_ref[...]

        o_smem[...] = pl.run_scoped(matmul, plgpu.ACC((64, 64), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref)
        plgpu.wait_smem_to_gmem(0)

    scratch = [mgpu._swizzled((64, 64), a.dtype), mgpu._swizzled((64, 64), b.dtype),
               plgpu.SMEM((64, 64), jnp.float32), plgpu.Barrier(num_arrivals=2)]  # fmt: skip
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32), scratch_types=scratch,
                        interpret=mgpu.interpret_params() if interpret else None)(a, b)  # fmt: skip


@pytest.mark.parametrize(
    "interpret", [pytest.param(True, id="interpret"), pytest.param(False, id="gpu", marks=pytest.mark.gpu)]
)
def test_tma_wgmma_smoke(interpret):
    a = jax.random.normal(jax.random.key(0), (64, 64), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (64, 64), jnp.bfloat16)
    out = jax.jit(functools.partial(tma_wgmma_smoke, interpret=interpret))(a, b)
    ref = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32).T)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize(("page_size", "group"), SWEEP, ids=[f"S{s}-G{g}" for s, g in SWEEP])
def test_gpu_sweep(page_size, group):
    args = make_inputs(page_size=page_size, group=group, lens=lengths(page_size, long=2048 + 37), num_kv_heads=4)
    for splits in (1, 4):
        for positions_on_m in (False, True):
            tuning = DecodeTuning(pages_per_block=64 // page_size, num_splits=splits, positions_on_m=positions_on_m,
                                  semantics="lane" if positions_on_m else "warpgroup")  # fmt: skip
            check(args, tuning=tuning, interpret=False)


# P in registers: the interpreter has no register wgmma operand, so these run compiled only.
GPU_TUNINGS = {
    **TUNINGS,
    "lane": DecodeTuning(semantics="lane"),
    "p-registers": DecodeTuning(p_in_registers=True),
    "p-registers-lane": DecodeTuning(p_in_registers=True, semantics="lane"),
    "p-registers-split-4-stages-3": DecodeTuning(p_in_registers=True, num_splits=4, num_stages=3),
    "positions-on-m": DecodeTuning(positions_on_m=True, semantics="lane"),
    "positions-on-m-split-4-stages-3": DecodeTuning(positions_on_m=True, semantics="lane", num_splits=4, num_stages=3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("tuning", list(GPU_TUNINGS.values()), ids=list(GPU_TUNINGS))
def test_gpu_tunings(tuning):
    args = make_inputs(page_size=16, group=4, lens=(1, 15, 16, 17, 7 * 64 + 5, 3000), num_kv_heads=8, seed=1)
    check(args, tuning=tuning, interpret=False)


# 200: tables padded past the 70-token context, as the engine's are; chain 2: two calls a timing, the first checked
@pytest.mark.parametrize(("table_len", "chain"), [(0, 1), (200, 2)])
def test_benchmark_runs_interpreted(tmp_path, table_len, chain):
    from benchmarks import mgpu_decode

    out = tmp_path / "mgpu.json"
    record = mgpu_decode.main(["--cases", "mha", "--tunings", "ppb=4,st=2,splits=2", "--table-len", str(table_len),
                               "--chain", str(chain), "--json-out", str(out)])  # fmt: skip
    assert record["interpret"] and out.exists()
    [row] = record["rows"]
    assert row["ok"], row.get("error")
    assert row["rel_err"] <= MAX_REL_ERR and row["ctas_per_sm"] == 2


@pytest.mark.parametrize("page_order", ["random", "sequential"])
def test_benchmark_pages_come_from_an_engine_sized_pool(page_order):
    from benchmarks import mgpu_decode

    _, k, _, tables, seq_lens, _ = mgpu_decode.make_inputs(4, 2, 3, 40, head_dim=16, table_len=96, pool_pages=50,
                                                          page_order=page_order)  # fmt: skip
    assert k.shape[1] == 50 and tables.shape == (3, 6) and list(seq_lens) == [40] * 3
    used = np.asarray(tables[:, :3])  # 40 tokens: 3 pages a sequence, then null-page padding
    assert np.all(np.asarray(tables[:, 3:]) == 0)
    assert len(set(used.ravel())) == 9 and used.min() >= 1 and used.max() < 50
    if page_order == "sequential":
        assert np.all(np.diff(used, axis=1) == 1) and used[-1, 0] > 30  # consecutive, spread over the pool


def test_benchmark_shapes_flag():
    from benchmarks import mgpu_decode

    assert mgpu_decode.parse_shapes("32/8/24/640, 32/32/3/4096") == [
        ("N32/K8 B=24 ctx=640", 32, 8, 24, 640),
        ("N32/K32 B=3 ctx=4096", 32, 32, 3, 4096),
    ]
    with pytest.raises(Exception, match="N/K/B/context"):
        mgpu_decode.parse_shapes("32/8/24")


def test_with_decode_tuning_runs_a_script_with_the_default_tuning_changed(tmp_path, monkeypatch):
    from benchmarks import common, with_decode_tuning

    monkeypatch.setattr(mgpu, "default_tuning", mgpu.default_tuning)  # restored after the test
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    script, out = tmp_path / "probe.py", tmp_path / "out.json"
    script.write_text(
        "import json, sys\nfrom jpaged.kernels import paged_decode_mgpu as m\n"
        "ts = [m.default_tuning(1, 32, 8), m.default_tuning(128, 32, 32)]\n"
        "json.dump([[t.p_in_registers, t.positions_on_m, t.semantics, t.num_splits] for t in ts],\n"
        "          open(sys.argv[1], 'w'))\n"
    )
    monkeypatch.delenv(common.DECODE_TUNING_ENV, raising=False)  # restored (absent) after the test
    with_decode_tuning.main(["preg=1", str(script), str(out)])
    # the named fields, the default's split count, DecodeTuning's defaults for the rest: at G 1 too, where the
    # default's positions on M would exclude P in registers
    assert json.loads(out.read_text()) == [[True, False, "warpgroup", 16], [True, False, "warpgroup", 1]]
    assert common.env_info()["decode_tuning_override"] == "preg=1"  # every record written under it says so
    with pytest.raises(ValueError, match="lane"):  # checked before anything runs
        with_decode_tuning.override_fields("posm=1")
