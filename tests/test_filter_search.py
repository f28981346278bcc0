"""The sampler's threshold-search kernel against its sorted jnp reference: the k-th largest key exactly, the
top-k survivors' mass closely, top-p's last key exactly where top_p is no knife-edge; interpreted here, compiled
on a GPU.

B rows, V vocabulary.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_h200

from jpaged.kernels.filter_search import FilterSearchTuning, filter_thresholds, filter_thresholds_reference
from jpaged.sampler import _order_keys

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

ON_GPU = jax.default_backend() == "gpu"
SMALL = FilterSearchTuning(block=16)


def random_rows(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    """float32 logits with ties (rounded to a grid in some rows), banned tokens, and wide and narrow spreads."""
    x = rng.normal(size=(rows, vocab)) * rng.choice([0.1, 1.0, 5.0, 30.0], size=(rows, 1))
    grid = rng.choice([0.0, 0.5, 2.0], size=(rows, 1))
    x = np.where(grid > 0, np.round(x / np.where(grid > 0, grid, 1.0)) * grid, x)
    x[rng.random((rows, vocab)) < rng.choice([0.0, 0.2, 0.95], size=(rows, 1))] = -np.inf
    x[:, 0] = np.where(np.isinf(x).all(-1), 0.0, x[:, 0])  # at least one finite token a row
    return x.astype(np.float32)


def safe_top_p(rng: np.random.Generator, row: np.ndarray, k: int) -> float:
    """A top_p between two consecutive cumulative masses of the top-k (float64), far from either: summation order
    cannot move the cut. Sometimes 1 (off) or a tiny value (the first token)."""
    choice = rng.random()
    if choice < 0.15:
        return 1.0
    if choice < 0.25:
        return 1e-7
    desc = np.sort(row.astype(np.float64))[::-1]
    probs = np.exp(desc[:k] - desc[0])
    cum = np.unique(np.cumsum(probs / probs.sum()))  # distinct cut points, ascending
    gaps = [(a, b) for a, b in itertools.pairwise(cum) if b - a > 1e-3]
    if not gaps:
        return 1.0
    a, b = gaps[rng.integers(len(gaps))]
    return float((a + b) / 2)


def case(rng: np.random.Generator, rows: int, vocab: int):
    x = random_rows(rng, rows, vocab)
    top_k = np.where(rng.random(rows) < 0.5, rng.integers(1, vocab + 1, size=rows), rng.choice([1, vocab], rows))
    top_p = np.array([safe_top_p(rng, x[b], int(top_k[b])) for b in range(rows)], np.float32)
    keys = _order_keys(jnp.asarray(x))
    weights = jnp.exp(x - x.max(-1, keepdims=True))
    return keys, weights, jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p)


def check(got, want) -> None:
    kth, normaliser, top_p_last = (np.asarray(a) for a in got)
    want_kth, want_normaliser, want_top_p_last = (np.asarray(a) for a in want)
    np.testing.assert_array_equal(kth, want_kth)
    np.testing.assert_allclose(normaliser, want_normaliser, rtol=1e-5)
    np.testing.assert_array_equal(top_p_last, want_top_p_last)


# V: one token; block - 1, block, block + 1 (padding of the last block or none); several blocks; long.
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 100, 1000])
def test_kernel_equals_reference(vocab):
    rng = np.random.default_rng(vocab)
    for _ in range(3):
        keys, weights, top_k, top_p = case(rng, 6, vocab)
        want = filter_thresholds_reference(keys, weights, top_k, top_p)
        check(filter_thresholds(keys, weights, top_k, top_p, tuning=SMALL, interpret=not ON_GPU), want)


@pytest.mark.parametrize("tuning", [FilterSearchTuning(), FilterSearchTuning(block=64, num_warps=2, num_stages=1)])
def test_tunings_agree(tuning):
    keys, weights, top_k, top_p = case(np.random.default_rng(7), 4, 300)
    want = filter_thresholds_reference(keys, weights, top_k, top_p)
    check(filter_thresholds(keys, weights, top_k, top_p, tuning=tuning, interpret=not ON_GPU), want)


def test_reference_by_hand():
    """A row of ties: [3, 3, 1, 3, -inf]. top_k 2: the k-th largest is 3 and two of the three 3s survive, so the
    mass is 2; top_p 0.6 of it: the 3s hold all of it, so the cut is at 3."""
    x = jnp.asarray([[3.0, 3.0, 1.0, 3.0, -jnp.inf]])
    keys, weights = _order_keys(x), jnp.exp(x - 3.0)
    kth, normaliser, top_p_last = filter_thresholds_reference(keys, weights, jnp.asarray([2]), jnp.asarray([0.6]))
    three = _order_keys(jnp.asarray(3.0))
    assert int(kth[0]) == int(three) and float(normaliser[0]) == 2.0 and int(top_p_last[0]) == int(three)
    got = filter_thresholds(keys, weights, jnp.asarray([2]), jnp.asarray([0.6]), tuning=SMALL, interpret=not ON_GPU)
    check(got, (kth, normaliser, top_p_last))


@pytest.mark.parametrize(("p", "want"), [(1.0, 0), (1.5, 0), (0.0, 2**32 - 1), (-0.5, 2**32 - 1)])
def test_top_p_at_or_past_its_ends(p, want):
    """top_p >= 1 is off (0: no cut); top_p <= 0 holds for every key, the largest uint32 included, in the kernel and
    the reference alike (the sampler caps it at the top key)."""
    keys, weights, top_k, _ = case(np.random.default_rng(3), 3, 40)
    top_p = jnp.full((3,), p, jnp.float32)
    got = filter_thresholds(keys, weights, top_k, top_p, tuning=SMALL, interpret=not ON_GPU)
    np.testing.assert_array_equal(np.asarray(got[2]), want)
    check(got, filter_thresholds_reference(keys, weights, top_k, top_p))


def test_inputs_are_validated():
    keys = jnp.zeros((2, 8), jnp.uint32)
    weights = jnp.ones((2, 8), jnp.float32)
    k, p = jnp.ones((2,), jnp.int32), jnp.ones((2,), jnp.float32)
    with pytest.raises(ValueError, match="keys must be uint32"):
        filter_thresholds(keys.astype(jnp.int32), weights, k, p, interpret=True)
    with pytest.raises(ValueError, match="weights must be float32"):
        filter_thresholds(keys, weights[:, :4], k, p, interpret=True)
    with pytest.raises(ValueError, match="top_k must be int32"):
        filter_thresholds(keys, weights, k[:1], p, interpret=True)
    with pytest.raises(ValueError, match="top_p must be float32"):
        filter_thresholds(keys, weights, k, p.astype(jnp.bfloat16), interpret=True)
    for bad in (dict(block=24), dict(block=8), dict(num_warps=3), dict(num_stages=0)):
        with pytest.raises(ValueError, match="must be"):
            FilterSearchTuning(**bad)
    if not ON_GPU:
        with pytest.raises(ValueError, match="needs a GPU"):
            filter_thresholds(keys, weights, k, p)


def test_kernel_lowers_to_triton_for_an_h200():
    """The compiled kernel lowers for CUDA at a 128k vocabulary and 256 rows from any machine (an abstract H200
    answers Triton's question of which GPU; the compile to PTX needs the GPU)."""
    from jpaged.kernels import filter_search

    keys = jax.ShapeDtypeStruct((256, 128256), jnp.uint32)
    weights = jax.ShapeDtypeStruct((256, 128256), jnp.float32)
    k, p = jax.ShapeDtypeStruct((256,), jnp.int32), jax.ShapeDtypeStruct((256,), jnp.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(filter_search, "on_gpu", lambda: True)
        text = lower_for_h200(filter_search.filter_thresholds, keys, weights, k, p)
    assert "filter_search" in text and "triton" in text


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_compiled_kernel_at_model_vocabularies(vocab):
    keys, weights, top_k, top_p = case(np.random.default_rng(vocab), 64, vocab)
    check(filter_thresholds(keys, weights, top_k, top_p), filter_thresholds_reference(keys, weights, top_k, top_p))
