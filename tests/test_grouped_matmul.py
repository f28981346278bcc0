"""Grouped matmul: the Pallas kernel (interpret mode here, compiled on a GPU) and the jnp reference against
`jax.lax.ragged_dot`, over groups without rows, one group with every row, padding rows past sum(group_sizes), and row
counts around the 16-row tile.

M rows, K contraction, N output columns, E groups.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.kernels.grouped_matmul import (
    GroupedMatmulTuning,
    default_tuning,
    grouped_matmul,
    grouped_matmul_reference,
    grouped_matmul_unsupported_reason,
    matmul,
)

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
# The package re-exports the function under the module's name, so fetch the module itself.
gm_module = importlib.import_module("jpaged.kernels.grouped_matmul")

K, N = 32, 48  # not powers of two: default_tuning picks blocks that divide them (32 and 16)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """GPUs multiply float32 in TF32 by default; the tight float32 comparisons need full float32 products."""
    with jax.default_matmul_precision("highest"):
        yield


def make(sizes, num_rows, *, k=K, n=N, dtype=jnp.float32, seed=0):
    """lhs [M, K], rhs [E, K, N], group_sizes [E]; rows past sum(sizes) are padding holding junk."""
    assert sum(sizes) <= num_rows
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(num_rows, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def check(out, lhs, rhs, group_sizes):
    """out equals ragged_dot and the reference: tightly in float32, to 1e-2 relative in 16-bit floats."""
    assert out.shape == (lhs.shape[0], rhs.shape[2]) and out.dtype == lhs.dtype
    padding = np.arange(lhs.shape[0]) >= int(np.sum(group_sizes))
    np.testing.assert_array_equal(np.asarray(out, np.float32)[padding], 0.0)
    # float32 oracle from the (rounded) inputs, row by row
    lhs32, rhs32, ends = np.asarray(lhs, np.float32), np.asarray(rhs, np.float32), np.cumsum(group_sizes)
    expected = np.zeros(out.shape, np.float32)
    for e in range(rhs.shape[0]):
        rows = slice(ends[e] - group_sizes[e], ends[e])
        expected[rows] = lhs32[rows] @ rhs32[e]
    tol = 1e-5 if lhs.dtype == jnp.float32 else 1e-2
    scale = max(1.0, float(np.abs(expected).max()))
    for got in (out, jax.lax.ragged_dot(lhs, rhs, group_sizes), grouped_matmul_reference(lhs, rhs, group_sizes)):
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=tol, atol=tol * scale)


# (M, group sizes): zero-row groups, one group with every row, padding rows, M around the 16-row tile.
CASES = [
    (1, [0, 1, 0, 0]),
    (1, [0, 0, 0, 0]),  # every row is padding
    (2, [1, 0, 0, 1]),  # batch-1 decode, top-2
    (15, [0, 15, 0, 0]),  # one group has every row
    (16, [4, 4, 0, 8]),
    (17, [5, 0, 8, 0]),  # 4 padding rows
    (64, [0, 30, 3, 31]),
    (300, [0, 150, 100, 20]),  # 30 padding rows; groups of several tiles
]
CASE_IDS = [f"M{m}-{'-'.join(map(str, s))}" for m, s in CASES]


# --- the jnp reference --------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_rows", "sizes"), CASES, ids=CASE_IDS)
def test_reference_and_xla_match_the_definition(num_rows, sizes):
    lhs, rhs, gs = make(sizes, num_rows, seed=num_rows)
    check(grouped_matmul(lhs, rhs, gs, impl="reference"), lhs, rhs, gs)
    check(grouped_matmul(lhs, rhs, gs, impl="xla"), lhs, rhs, gs)


def test_auto_off_gpu_is_ragged_dot():
    lhs, rhs, gs = make([3, 0, 9, 2], 16)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(grouped_matmul(lhs, rhs, gs), jax.lax.ragged_dot(lhs, rhs, gs))


# --- the Pallas kernel --------------------------------------------------------------------------------


class TestPallasInterpret:
    """Every case runs in the Pallas interpreter; the subclass below reruns them compiled on a GPU."""

    interpret = True

    def run(self, lhs, rhs, gs, tuning=None):
        if not self.interpret:
            tuning = tuning or default_tuning(lhs.shape[0], rhs.shape[1], rhs.shape[2], rhs.shape[0])
            reason = grouped_matmul_unsupported_reason(lhs, rhs, tuning)
            if reason is not None:
                pytest.skip(f"not a GPU shape: {reason}")
        return grouped_matmul(lhs, rhs, gs, impl="pallas", tuning=tuning, interpret=self.interpret)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize(("num_rows", "sizes"), CASES, ids=CASE_IDS)
    def test_matches_ragged_dot_and_reference(self, num_rows, sizes, dtype):
        lhs, rhs, gs = make(sizes, num_rows, dtype=dtype, seed=num_rows)
        check(self.run(lhs, rhs, gs), lhs, rhs, gs)

    @pytest.mark.parametrize(
        "tuning",
        [
            GroupedMatmulTuning(block_m=16, block_n=16, block_k=16, group_m=3),  # partial last sweep of tiles
            GroupedMatmulTuning(block_m=32, block_n=16, block_k=16, k_splits=2),  # float32 partial sums
            GroupedMatmulTuning(block_m=64, block_n=16, block_k=32, group_m=1),
        ],
        ids=lambda t: t.name,
    )
    def test_tunings(self, tuning):
        lhs, rhs, gs = make([40, 0, 1, 70, 0, 17], 140, seed=3)  # 12 padding rows
        check(self.run(lhs, rhs, gs, tuning), lhs, rhs, gs)

    def test_groups_without_rows_are_never_read(self):
        """The weights of groups with no rows are NaN: nothing of them may reach the output."""
        lhs, rhs, gs = make([0, 2, 0, 0, 1, 0], 4, seed=5)
        poisoned = rhs.at[jnp.array([0, 2, 3, 5])].set(jnp.nan)
        out = self.run(lhs, poisoned, gs)
        assert np.isfinite(np.asarray(out)).all()
        np.testing.assert_allclose(out, grouped_matmul(lhs, rhs, gs, impl="xla"), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("num_rows", [1, 15, 16, 17, 40])
    @pytest.mark.parametrize(
        "tuning",
        [None, GroupedMatmulTuning(block_m=16, block_n=16, block_k=16, k_splits=2, group_m=2)],
        ids=["default", "split"],
    )
    def test_dense_matmul(self, num_rows, tuning):
        """The one-group case with static tiles: every row is real, a partial last tile, split K."""
        lhs, rhs, gs = make([num_rows], num_rows, seed=num_rows)
        if not self.interpret and tuning is None:
            reason = grouped_matmul_unsupported_reason(lhs, rhs, default_tuning(num_rows, K, N, 1))
            if reason is not None:
                pytest.skip(f"not a GPU shape: {reason}")
        out = matmul(lhs, rhs[0], impl="pallas", tuning=tuning, interpret=self.interpret)
        check(out, lhs, rhs, gs)

    def test_mixtral_model_dims(self):
        """The tiny HF Mixtral fixtures: D = 64, F = 32, 4 experts (gate/up K=64 N=32, down K=32 N=64)."""
        for k, n in ((64, 32), (32, 64)):
            lhs, rhs, gs = make([3, 0, 5, 2], 12, k=k, n=n, seed=k)
            check(self.run(lhs, rhs, gs), lhs, rhs, gs)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
class TestPallasGpu(TestPallasInterpret):
    interpret = False


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU tests compile the kernel itself")
@pytest.mark.parametrize(("m", "k", "n"), [(2, 14336, 4096), (512, 4096, 14336)], ids=["decode-down", "prefill-up"])
def test_lowers_to_triton_for_an_h200(monkeypatch, m, k, n):
    """Off GPU, the Triton lowering still runs (to Triton IR, not to PTX) when an H200 is declared: Mixtral-8x7B's
    decode down projection (K split in 4) and a prefill-sized gate/up projection."""
    from jax._src.pallas.triton import gpu_info

    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    tuning = default_tuning(m, k, n, 8)
    fn = jax.jit(lambda a, b, s: gm_module._grouped_matmul_pallas(a, b, s, tuning=tuning, interpret=False))
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in
            (((m, k), jnp.bfloat16), ((8, k, n), jnp.bfloat16), ((8,), jnp.int32))]  # fmt: skip
    target = "__gpu$xla.gpu.triton"
    checks = [jax.export.DisabledSafetyCheck.custom_call(target)]
    module = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
    assert target in module and f"grouped_matmul_{tuning.name}" in module


def test_tiles_cover_only_groups_with_rows():
    """Decode (M = 2, top-2): two tiles, one per active group, so only those groups' weights are loaded."""
    group, start, length = gm_module._row_tiles(jnp.array([0, 1, 0, 0, 0, 0, 1, 0], jnp.int32), num_rows=2, block_m=16)
    assert group.tolist() == [1, 6] and start.tolist() == [0, 1] and length.tolist() == [1, 1]
    # 40 rows in tiles of 16: 16 + 3 in group 0, 16 + 5 in group 2; unused slots have no rows
    group, start, length = gm_module._row_tiles(jnp.array([19, 0, 21], jnp.int32), num_rows=48, block_m=16)
    used = np.asarray(length) > 0
    assert np.asarray(group)[used].tolist() == [0, 0, 2, 2]
    assert np.asarray(start)[used].tolist() == [0, 16, 19, 35] and np.asarray(length)[used].tolist() == [16, 3, 16, 5]
    assert len(group) == gm_module.num_tiles(48, 3, 16) == 6  # 48 // 16 + 3


def test_every_row_count_fits_the_tile_table():
    """For any sizes summing to <= M the static table has a slot for every tile."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        m, e, bm = int(rng.integers(1, 200)), int(rng.integers(1, 10)), int(rng.choice([16, 32, 64]))
        weights = rng.random(e) * (rng.random(e) < 0.7) + 1e-9  # some groups get (almost surely) no rows
        sizes = rng.multinomial(int(rng.integers(0, m + 1)), weights / weights.sum())
        needed = int(np.sum(-(-sizes // bm)))
        assert sizes.sum() <= m and needed <= gm_module.num_tiles(m, e, bm), (m, sizes, bm)


# --- tuning, constraints, validation ------------------------------------------------------------------


def test_default_tuning_by_shape_family():
    decode_up = default_tuning(2, 4096, 2 * 14336, 8)  # Mixtral-8x7B, batch 1: the fused gate/up
    decode_down = default_tuning(2, 14336, 4096, 8)
    assert decode_up.block_m == decode_down.block_m == 16 and decode_up.block_n == decode_down.block_n == 128
    # Rows fill one tile: 224 N-blocks are too few programs for two per SM (264), 448 are enough; 32 need 8 splits.
    assert (decode_up.k_splits, decode_down.k_splits) == (2, 8)
    # Llama-2-7B's down projection, dense, at a decode step of 16 rows: K = 11008 = 43 * 256 splits only as 43 * 32
    dense_down = default_tuning(16, 11008, 4096, 1)
    assert (dense_down.block_k, dense_down.k_splits) == (32, 8)
    prefill = default_tuning(8192, 4096, 14336, 8)
    assert prefill.block_m == 128 and prefill.k_splits == 1
    for t in (decode_up, decode_down, prefill):
        assert grouped_matmul_unsupported_reason(jnp.zeros((2, 4096), jnp.bfloat16),
                                                 jnp.zeros((8, 4096, 14336), jnp.bfloat16), t) is None  # fmt: skip
    tiny = default_tuning(12, 64, 172, 4)  # stories260K-moe: F = 172 is no multiple of 16
    reason = grouped_matmul_unsupported_reason(jnp.zeros((12, 64)), jnp.zeros((4, 64, 172)), tiny)
    assert reason is not None and "N = 172" in reason


def test_dense_matmul_validates():
    lhs, rhs = jnp.zeros((4, 64)), jnp.zeros((64, 32))
    with pytest.raises(ValueError, match=r"matmul takes lhs \[M, K\] and rhs \[K, N\]"):
        matmul(lhs, rhs[None])
    with pytest.raises(ValueError, match="K of lhs"):
        matmul(lhs, jnp.zeros((32, 32)))
    with pytest.raises(ValueError, match="impl must be one of"):
        matmul(lhs, rhs, impl="cublas")
    with pytest.raises(ValueError, match="N = 32 is not a multiple of block_n = 64"):
        matmul(lhs, rhs, impl="pallas", interpret=True, tuning=GroupedMatmulTuning(block_n=64, block_k=64))
    if jax.default_backend() != "gpu":  # auto is XLA's dot off GPU
        np.testing.assert_allclose(matmul(lhs + 1, rhs + 1), jnp.full((4, 32), 64.0))


def test_gpu_constraints():
    lhs, rhs = jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((2, 64, 32), jnp.bfloat16)
    assert grouped_matmul_unsupported_reason(lhs, rhs, GroupedMatmulTuning(block_n=32, block_k=64)) is None
    assert "N = 32 is not a multiple of block_n = 64" in grouped_matmul_unsupported_reason(
        lhs, rhs, GroupedMatmulTuning(block_n=64, block_k=64)
    )
    assert "block_k * k_splits = 64 * 2" in grouped_matmul_unsupported_reason(
        lhs, rhs, GroupedMatmulTuning(block_n=32, block_k=64, k_splits=2)
    )


def test_pallas_rejects_shapes_it_cannot_tile():
    lhs, rhs, gs = make([2, 2], 4, k=24, n=16)
    with pytest.raises(ValueError, match=r"cannot run these shapes: K = 24"):
        grouped_matmul(lhs, rhs, gs, impl="pallas", interpret=True)
    np.testing.assert_allclose(grouped_matmul(lhs, rhs, gs), jax.lax.ragged_dot(lhs, rhs, gs))  # auto: xla


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU error")
def test_pallas_off_gpu_needs_interpret():
    lhs, rhs, gs = make([1, 1], 2)
    with pytest.raises(ValueError, match=r"needs a GPU .* or interpret=True"):
        grouped_matmul(lhs, rhs, gs, impl="pallas", interpret=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((jnp.zeros((4,)), jnp.zeros((2, 4, 16)), jnp.zeros(2, jnp.int32)), r"lhs must be \[M, K\]"),
        ((jnp.zeros((4, 4)), jnp.zeros((4, 16)), jnp.zeros(2, jnp.int32)), r"rhs must be \[E, K, N\]"),
        ((jnp.zeros((4, 8)), jnp.zeros((2, 4, 16)), jnp.zeros(2, jnp.int32)), r"K of lhs \(8\) and of rhs \(4\)"),
        ((jnp.zeros((4, 4)), jnp.zeros((2, 4, 16), jnp.bfloat16), jnp.zeros(2, jnp.int32)), r"dtypes differ"),
        ((jnp.zeros((4, 4), jnp.int32), jnp.zeros((2, 4, 16), jnp.int32), jnp.zeros(2, jnp.int32)), "floating"),
        ((jnp.zeros((4, 4)), jnp.zeros((2, 4, 16)), jnp.zeros(3, jnp.int32)), r"group_sizes must be \[E=2\]"),
        ((jnp.zeros((4, 4)), jnp.zeros((2, 4, 16)), jnp.zeros(2, jnp.float32)), r"group_sizes must be int32"),
    ],
    ids=["lhs-rank", "rhs-rank", "k", "dtypes", "int", "sizes-shape", "sizes-dtype"],
)
def test_validation_errors(args, message):
    for impl in ("xla", "reference", "pallas"):
        with pytest.raises(ValueError, match=message):
            grouped_matmul(*args, impl=impl)


def test_bad_impl():
    with pytest.raises(ValueError, match=r"impl must be one of"):
        grouped_matmul(*make([1, 1], 2), impl="triton")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_m": 8},
        {"block_n": 48},
        {"block_k": 0},
        {"k_splits": 3},
        {"num_warps": 64},
        {"group_m": 0},
        {"num_stages": 0},
    ],
)
def test_tuning_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="GroupedMatmulTuning"):
        GroupedMatmulTuning(**kwargs)
