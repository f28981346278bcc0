"""Invariants of jpaged.sampler: greedy limits, reproducibility, distributions, penalties, logprobs."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.sampler import (
    SamplingMetadata,
    apply_logit_bias,
    apply_penalties,
    filtered_rows,
    prompt_logprobs,
    sample,
    top_k,
    top_k_top_p_min_p_mask,
    top_k_top_p_min_p_mask_sorted,
)

sample_jit = jax.jit(sample, static_argnames=("num_logprobs", "filters"))
DEFAULTS = dict(
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    repetition_penalty=1.0,
    sample_index=0,
    positions=0,
    prompt_lens=0,
)
DTYPES = dict(top_k=np.int32, sample_index=np.int32, positions=np.int32, prompt_lens=np.int32)


def make_meta(batch: int, *, history=None, bias_ids=None, bias_values=None, seeds=None, **per_row) -> SamplingMetadata:
    """Metadata with every feature off unless given; per-row fields accept a scalar or a [B] sequence."""
    fields = {}
    for name, default in DEFAULTS.items():
        value = np.asarray(per_row.pop(name, default), DTYPES.get(name, np.float32))
        fields[name] = jnp.asarray(np.broadcast_to(value, (batch,)))
    assert not per_row, f"unknown fields {per_row}"
    seeds = np.arange(batch) if seeds is None else np.broadcast_to(np.asarray(seeds), (batch,))
    history = np.full((batch, 1), -1) if history is None else history
    bias_ids = np.full((batch, 1), -1) if bias_ids is None else bias_ids
    bias_values = np.zeros(np.shape(bias_ids)) if bias_values is None else bias_values
    return SamplingMetadata(
        **fields,
        seeds=jnp.asarray(seeds, jnp.uint32),
        history=jnp.asarray(history, jnp.int32),
        bias_ids=jnp.asarray(bias_ids, jnp.int32),
        bias_values=jnp.asarray(bias_values, jnp.float32),
    )


def tokens(logits, meta, num_logprobs: int = 0) -> np.ndarray:
    return np.asarray(sample_jit(jnp.asarray(logits), meta, num_logprobs=num_logprobs).token_ids)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def reference_keep(scaled: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """numpy top-k -> top-p (on the renormalised top-k) -> min-p for one row; ties go to the lower id."""
    order = np.argsort(-scaled, kind="stable")
    desc = scaled[order]
    k = len(desc) if top_k <= 0 else min(top_k, len(desc))
    probs = np.exp(desc[:k] - desc[0])
    probs /= probs.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    n = k if top_p >= 1 else int(np.sum(mass_before < top_p))
    n = min(n, int(np.sum(desc - desc[0] >= np.log(min_p) if min_p > 0 else np.ones_like(desc, bool))))
    keep = np.zeros(len(scaled), bool)
    keep[order[: max(n, 1)]] = True
    return keep


def reference_penalties(logits, history, prompt_lens, presence, frequency, repetition) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    for b in range(len(out)):
        ids = history[b][history[b] >= 0]
        output = history[b][prompt_lens[b] :]
        output = output[output >= 0]
        for token in set(ids.tolist()):
            out[b, token] = out[b, token] / repetition[b] if out[b, token] > 0 else out[b, token] * repetition[b]
        for token in set(output.tolist()):
            out[b, token] -= frequency[b] * np.sum(output == token) + presence[b]
    return out


# --- greedy limits ---


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5, min_p=0.3)])
def test_top_1_filters_equal_greedy_even_with_ties(filters):
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, size=(64, 48)).astype(np.float32)  # many tied maxima
    temperature = rng.uniform(0.3, 3.0, size=64)
    drawn = tokens(logits, make_meta(64, temperature=temperature, positions=np.arange(64), **filters))
    np.testing.assert_array_equal(drawn, np.argmax(logits, axis=-1))


def test_near_zero_temperature_is_greedy():
    logits = np.random.default_rng(1).normal(size=(64, 100)).astype(np.float32)
    temperature = np.resize([0.0, 1e-6, 1e-5], 64)
    drawn = tokens(logits, make_meta(64, temperature=temperature, top_k=5, positions=np.arange(64)))
    np.testing.assert_array_equal(drawn, np.argmax(logits, axis=-1))


# --- reproducibility ---


def test_row_draw_depends_only_on_its_seed_sample_index_position_and_logits():
    rng = np.random.default_rng(2)
    vocab = 256
    targets: dict[str, np.ndarray] = dict(  # 4 unfiltered rows, then 4 filtered ones
        temperature=np.array([0.8, 1.0, 1.3, 2.0, 1.0, 0.9, 1.5, 1.0]),
        top_k=np.array([0, 0, 0, 0, 20, 0, 0, 50]),
        top_p=np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 1.0, 0.95]),
        min_p=np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.01]),
        sample_index=np.array([0, 1, 2, 0, 3, 0, 1, 0]),
        positions=np.array([5, 5, 5, 17, 1000, 3, 99, 12345]),
    )
    target_seeds = np.array([7, 7, 7, 2**32 - 1, 3, 123456789, 0, 42], np.uint32)
    target_logits = rng.normal(size=(8, vocab)).astype(np.float32) * 2

    alone = [  # B = 1: each row on its own
        tokens(
            target_logits[i : i + 1],
            make_meta(1, seeds=target_seeds[i], **{k: v[i] for k, v in targets.items()}),
        )[0]
        for i in range(8)
    ]

    batch = 40  # targets at scattered rows among neighbours that are greedy, filtered, or share a seed
    where = rng.permutation(batch)[:8]
    fields: dict[str, np.ndarray] = dict(
        temperature=rng.choice([0.0, 0.7, 1.0], size=batch),
        top_k=rng.choice([0, 3, 10], size=batch),
        top_p=rng.choice([1.0, 0.5], size=batch),
        min_p=rng.choice([0.0, 0.1], size=batch),
        sample_index=rng.integers(0, 4, size=batch),
        positions=rng.integers(0, 100, size=batch),
    )
    seeds = rng.choice(target_seeds, size=batch)
    logits = rng.normal(size=(batch, vocab)).astype(np.float32)
    for name, values in targets.items():
        fields[name] = fields[name].astype(np.float64)
        fields[name][where] = values
    seeds[where] = target_seeds
    logits[where] = target_logits
    mixed = tokens(logits, make_meta(batch, seeds=seeds, **fields), num_logprobs=3)[where]

    np.testing.assert_array_equal(mixed, alone)


def test_different_position_sample_index_or_seed_gives_different_draws():
    vocab, batch = 1000, 200
    logits = np.zeros((batch, vocab), np.float32)  # uniform: ~181 distinct tokens expected from 200 draws
    for varying in (
        dict(positions=np.arange(batch)),
        dict(sample_index=np.arange(batch)),
        dict(seeds=np.arange(batch)),
    ):
        meta = make_meta(batch, **{"seeds": 5, "positions": 9, **varying})
        assert len(np.unique(tokens(logits, meta))) > 150, varying
    same = tokens(logits, make_meta(batch, seeds=5, positions=9, sample_index=2))
    assert len(np.unique(same)) == 1


def test_top_k_at_least_vocab_draws_exactly_as_top_k_off():
    logits = np.random.default_rng(3).normal(size=(64, 32)).astype(np.float32)
    off = tokens(logits, make_meta(64, top_k=0, positions=np.arange(64)))
    for k in (32, 33, 10**6):
        np.testing.assert_array_equal(tokens(logits, make_meta(64, top_k=k, positions=np.arange(64))), off)


# --- distributions ---

FIXED_LOGITS = np.array([2.0, 1.2, 0.5, 0.0, -0.7, -1.5], np.float32)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (1.0, 0, 1.0, 0.0),
        (0.6, 0, 1.0, 0.0),
        (1.7, 0, 1.0, 0.0),
        (1.0, 3, 1.0, 0.0),
        (1.0, 0, 0.85, 0.0),
        (1.0, 0, 1.0, 0.15),
        (1.4, 5, 0.9, 0.12),
    ],
)
def test_empirical_frequencies_match_filtered_softmax(temperature, top_k, top_p, min_p):
    draws = 20_000
    scaled = FIXED_LOGITS.astype(np.float64) / temperature
    keep = reference_keep(scaled, top_k, top_p, min_p)
    expected = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    expected /= expected.sum()

    logits = np.broadcast_to(FIXED_LOGITS, (draws, len(FIXED_LOGITS)))
    meta = make_meta(
        draws,
        seeds=1234,
        positions=np.arange(draws),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
    )
    frequencies = np.bincount(tokens(logits, meta), minlength=len(FIXED_LOGITS)) / draws

    assert np.all(frequencies[~keep] == 0), frequencies
    np.testing.assert_allclose(frequencies, expected, atol=0.015)  # ~4 standard deviations at 20k draws


@pytest.mark.parametrize("mask_fn", [top_k_top_p_min_p_mask, top_k_top_p_min_p_mask_sorted])
def test_mask_matches_numpy_and_filtered_tokens_are_never_drawn(mask_fn):
    rng = np.random.default_rng(4)
    batch, vocab = 512, 40
    logits = rng.normal(size=(batch, vocab)).astype(np.float32) * 2
    params = dict(
        temperature=rng.uniform(0.5, 2.0, size=batch),
        top_k=rng.integers(-1, vocab + 2, size=batch),
        top_p=rng.choice([1.0, 0.9, 0.5, 0.2], size=batch),
        min_p=rng.choice([0.0, 0.05, 0.3], size=batch),
    )
    scaled = (logits / params["temperature"][:, None].astype(np.float32)).astype(np.float32)
    expected = np.stack(
        [
            reference_keep(scaled[b].astype(np.float64), params["top_k"][b], params["top_p"][b], params["min_p"][b])
            for b in range(batch)
        ]
    )
    mask = jax.jit(mask_fn)(
        jnp.asarray(scaled),
        jnp.asarray(params["top_k"], jnp.int32),
        jnp.asarray(params["top_p"], jnp.float32),
        jnp.asarray(params["min_p"], jnp.float32),
    )
    np.testing.assert_array_equal(np.asarray(mask), expected)

    for position in range(4):
        drawn = tokens(logits, make_meta(batch, positions=position, **params))
        assert expected[np.arange(batch), drawn].all()


@pytest.mark.parametrize("mask_fn", [top_k_top_p_min_p_mask, top_k_top_p_min_p_mask_sorted])
def test_top_k_keeps_exactly_k_breaking_ties_towards_lower_ids(mask_fn):
    scaled = jnp.asarray([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0]])
    mask = mask_fn(scaled, jnp.asarray([3]), jnp.asarray([1.0]), jnp.asarray([0.0]))
    np.testing.assert_array_equal(np.asarray(mask), [[False, True, True, False, True, False]])


def test_filtered_rows_on_the_host_is_the_devices_rule():
    """The runner decides on its numpy columns whether a step may skip the filter stage; the step decides per row
    on the device. Both are filtered_rows over the same float32 values, at the edges too."""
    rng = np.random.default_rng(11)
    batch, vocab = 400, 50
    temperature = rng.choice([0.0, 1e-5, np.nextafter(np.float32(1e-5), 1), 0.7], batch).astype(np.float32)
    top_k = rng.choice([-1, 0, 1, vocab - 1, vocab, vocab + 1], batch).astype(np.int32)
    top_p = rng.choice([0.5, np.nextafter(np.float32(1), 0), 1.0], batch).astype(np.float32)
    min_p = rng.choice([0.0, 1e-8, 0.1], batch).astype(np.float32)
    host = filtered_rows(temperature, top_k, top_p, min_p, vocab=vocab)
    device = jax.jit(filtered_rows, static_argnames="vocab")(temperature, top_k, top_p, min_p, vocab=vocab)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, np.asarray(device))
    assert 0 < host.sum() < batch
    assert not host[temperature <= 1e-5].any()  # greedy rows never filter


def test_skipping_the_filter_stage_changes_no_token_of_unfiltered_rows():
    """filters=False is an exact identity where no row filters (greedy and plain temperature rows, seeded), and
    really skips the stage: a top-k = 1 row then draws other tokens than its argmax."""
    rng = np.random.default_rng(12)
    batch, vocab = 64, 300
    logits = rng.normal(size=(batch, vocab)).astype(np.float32) * 3
    temperature = np.where(np.arange(batch) % 3 == 0, 0.0, rng.uniform(0.3, 2.0, batch))
    for position in range(3):
        meta = make_meta(batch, temperature=temperature, positions=position)
        with_stage = sample_jit(jnp.asarray(logits), meta, num_logprobs=2)
        without = sample_jit(jnp.asarray(logits), meta, num_logprobs=2, filters=False)
        for a, b in zip(jax.tree.leaves(with_stage), jax.tree.leaves(without), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    top1 = make_meta(batch, temperature=2.0, top_k=1)
    assert (tokens(logits, top1) == logits.argmax(-1)).all()
    drawn = np.asarray(sample_jit(jnp.asarray(logits), top1, num_logprobs=0, filters=False).token_ids)
    assert (drawn != logits.argmax(-1)).sum() > batch // 4


# --- the sort-free mask against the sorted definition ---

mask_jit = jax.jit(top_k_top_p_min_p_mask, static_argnames=("search", "digit_bits", "interpret"))
sorted_mask_jit = jax.jit(top_k_top_p_min_p_mask_sorted)
# Who runs the threshold searches: XLA's passes as a bisection (the default) and 4 bits a pass, and the opt-in
# Pallas kernel, interpreted.
SEARCHES = {
    "xla-1bit": dict(search="xla", digit_bits=1),
    "xla-4bit": dict(search="xla", digit_bits=4),
    "pallas": dict(search="pallas", interpret=True),
}
NEG = -np.inf


def near_top_p_boundary(scaled: np.ndarray, top_k: int, top_p: float, margin: float = 1e-5) -> bool:
    """Whether top_p lies within `margin` of the probability of the r >= 1 most likely of the top-k (float64).

    There float32 sums taken in different orders may put the top-p cut one token apart; the sort-free mask and
    the sorted cumsum sum in different orders (the cumsum itself rounds differently on CPU and GPU). The mass
    before the first token is exactly 0 in both, so a tiny top_p is no such knife-edge.
    """
    desc = np.sort(scaled.astype(np.float64))[::-1]
    k = len(desc) if top_k <= 0 else min(top_k, len(desc))
    if top_p >= 1 or not np.isfinite(desc[0]):
        return False
    probs = np.exp(desc[:k] - desc[0])
    return bool(np.any(np.abs(np.cumsum(probs / probs.sum())[:-1] - top_p) < margin))


def random_filter_case(rng: np.random.Generator, batch: int, vocab: int):
    """float32 logits with many ties and banned (-inf) tokens, and filters mixing off, edge and middle values.

    top_p is redrawn where it would sit on a knife-edge (near_top_p_boundary).
    """
    logits = rng.normal(size=(batch, vocab)) * rng.choice([0.1, 1.0, 5.0, 30.0], size=(batch, 1))
    grid = rng.choice([0.0, 0.25, 1.0, 4.0], size=(batch, 1))  # rounding to a grid makes ties; 0: none forced
    logits = np.where(grid > 0, np.round(logits / np.where(grid > 0, grid, 1.0)) * grid, logits)
    logits[rng.random((batch, vocab)) < rng.choice([0.0, 0.0, 0.1, 0.9, 1.0], size=(batch, 1))] = NEG
    logits = logits.astype(np.float32)
    top_k = np.where(
        rng.random(batch) < 0.3,
        rng.integers(1, vocab + 1, size=batch),
        rng.choice([0, -1, 1, 2, vocab, vocab + 1, 10**6], size=batch),
    )
    top_p = np.where(rng.random(batch) < 0.3, rng.uniform(size=batch), rng.choice([1.0, 1e-7, 0.1, 0.5, 0.9], batch))
    min_p = np.where(rng.random(batch) < 0.3, rng.uniform(size=batch), rng.choice([0.0, 0.0, 0.05, 0.3, 1.0], batch))
    top_p = top_p.astype(np.float32)
    for b in range(batch):
        while near_top_p_boundary(logits[b], top_k[b], top_p[b]):
            top_p[b] = rng.uniform()
    return logits, top_k.astype(np.int32), top_p, min_p.astype(np.float32)


def cuts_a_tie_group(logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[B] whether some kept finite token is tied with a dropped one."""
    lowest_kept = np.where(keep, logits, np.inf).min(axis=-1, keepdims=True)
    return np.any(~keep & (logits == lowest_kept), axis=-1) & np.isfinite(lowest_kept[:, 0])


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("vocab", [1, 2, 7, 64, 300])
def test_sort_free_mask_equals_sorted_mask(vocab, search):
    rng = np.random.default_rng(vocab)
    batch, kept_counts, cuts, top_p_cuts = 8, set(), 0, 0
    for _ in range(60):
        logits, top_k, top_p, min_p = random_filter_case(rng, batch, vocab)
        expected = np.asarray(sorted_mask_jit(logits, top_k, top_p, min_p))
        got = mask_jit(logits, top_k, top_p, min_p, **SEARCHES[search])
        np.testing.assert_array_equal(np.asarray(got), expected)
        kept_counts.update(expected.sum(-1).tolist())
        cut = cuts_a_tie_group(logits, expected)
        cuts += int(cut.sum())
        top_p_cuts += int(np.sum(cut & ((top_k <= 0) | (top_k >= vocab)) & (min_p == 0)))  # top-p alone
    assert kept_counts >= {1, vocab}  # rows keeping one token and rows keeping every token
    if vocab > 2:  # the sweep reaches the tie handling, top-p's included, and many kept counts
        assert cuts >= 20 and top_p_cuts >= 5 and len(kept_counts) > vocab // 10, (cuts, top_p_cuts, kept_counts)


@pytest.mark.parametrize(
    "row, top_k, top_p, min_p, expected",
    [
        ([1.0, NEG, 0.0, NEG], 0, 1.0, 0.0, [1, 1, 1, 1]),  # no filter binds: banned tokens pass (never drawn)
        ([1.0, NEG, 0.0, NEG], 3, 1.0, 0.0, [1, 1, 1, 0]),  # top-k counts banned tokens, lower ids first
        ([1.0, NEG, 0.0, NEG], 0, 1.0, 0.01, [1, 0, 1, 0]),  # min-p drops them
        ([1.0, NEG, 0.0, NEG], 0, 0.99999, 0.0, [1, 0, 1, 0]),  # so does top-p below the finite tokens' mass
        ([NEG, NEG, NEG], 0, 0.5, 0.1, [1, 0, 0]),  # all banned: the first token alone, as argmax
        ([NEG, NEG, NEG], 2, 1.0, 0.0, [1, 0, 0]),  # whatever the filters
        ([-0.0, 0.0, -0.0, -1.0], 2, 1.0, 0.0, [1, 1, 0, 0]),  # -0.0 and 0.0 tie
        ([2.0, 2.0, 2.0, 2.0], 0, 0.6, 0.0, [1, 1, 1, 0]),  # top-p cuts a tie group: 0, .25, .5 < .6
        ([2.0, 2.0, 2.0, 2.0], 0, 0.0, 0.0, [1, 0, 0, 0]),  # top_p = 0 keeps the top token
        ([0.0, 3.0, 1.0, 3.0], 0, 1.0, 2.0, [0, 1, 0, 0]),  # min_p > 1 too
    ],
)
def test_mask_edge_cases(row, top_k, top_p, min_p, expected):
    args = (np.asarray([row], np.float32), np.asarray([top_k], np.int32), np.asarray([top_p], np.float32))
    min_p_arg = np.asarray([min_p], np.float32)
    for mask_fn in (*(functools.partial(top_k_top_p_min_p_mask, **kw) for kw in SEARCHES.values()),
                    top_k_top_p_min_p_mask_sorted):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(mask_fn(*args, min_p_arg))[0], expected)


def test_digit_widths_are_checked():
    from jpaged import sampler

    assert sampler.DIGIT_BITS in sampler._DIGIT_WIDTHS
    for bad in (0, 3, 16, 32):
        with pytest.raises(ValueError, match=f"bits must be one of .*, got {bad}"):
            sampler._largest_key(lambda t: t > 0, rows=1, bits=bad)


# --- bias and penalties ---


def test_penalties_change_exactly_the_intended_logits():
    rng = np.random.default_rng(5)
    batch, vocab, length = 8, 50, 30
    logits = rng.normal(size=(batch, vocab)).astype(np.float32) * 3
    history = rng.integers(0, vocab, size=(batch, length))
    for b, used in enumerate(rng.integers(0, length + 1, size=batch)):
        history[b, used:] = -1
    history[0] = -1  # an empty row
    prompt_lens = rng.integers(0, length, size=batch)
    presence = rng.choice([0.0, 0.5, -0.3], size=batch)
    frequency = rng.choice([0.0, 0.2, 1.0], size=batch)
    repetition = rng.choice([1.0, 1.3, 0.8], size=batch)
    meta = make_meta(
        batch,
        history=history,
        prompt_lens=prompt_lens,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
    )

    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), meta))
    np.testing.assert_allclose(
        got,
        reference_penalties(logits, history, prompt_lens, presence, frequency, repetition),
        rtol=1e-6,
        atol=1e-6,
    )
    unseen = np.ones((batch, vocab), bool)
    for b in range(batch):
        unseen[b, history[b][history[b] >= 0]] = False
    np.testing.assert_array_equal(got[unseen], logits[unseen])


def test_penalties_steer_greedy_sampling():
    logits = np.array([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [3.0, 2.9, 0.0]], np.float32)
    history = np.array([[0, 0, -1], [1, 0, 0], [0, -1, -1]])
    meta = make_meta(
        3,
        temperature=0.0,
        history=history,
        prompt_lens=[0, 1, 1],
        presence_penalty=[0.2, 0.0, 0.0],
        repetition_penalty=[1.0, 1.0, 1.1],
        frequency_penalty=[0.0, 0.06, 0.0],
    )
    # row 0: output token 0 loses 0.2 once; row 1: output token 0 twice loses 0.12, prompt token 1 nothing;
    # row 2: prompt token 0 becomes 3 / 1.1
    np.testing.assert_array_equal(tokens(logits, meta), [1, 1, 1])


def test_logit_bias_adds_values_and_ignores_padding():
    logits = np.zeros((2, 5), np.float32)
    ids = np.array([[1, 3, 1, -1], [-1, -1, -1, -1]])
    values = np.array([[0.5, -2.0, 0.25, 100.0], [7.0, 7.0, 7.0, 7.0]])
    got = apply_logit_bias(jnp.asarray(logits), jnp.asarray(ids, jnp.int32), jnp.asarray(values, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), [[0, 0.75, 0, -2.0, 0], [0, 0, 0, 0, 0]])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_minus_inf_bias_bans_a_token(temperature):
    draws = 4000
    logits = np.broadcast_to(np.array([1.0, 0.5, 6.0, 0.0], np.float32), (draws, 4))
    ids = np.broadcast_to([[2, -1]], (draws, 2))
    values = np.broadcast_to(np.array([[-np.inf, 0.0]], np.float32), (draws, 2))
    meta = make_meta(draws, temperature=temperature, positions=np.arange(draws), bias_ids=ids, bias_values=values)
    drawn = tokens(logits, meta)
    assert not np.any(drawn == 2)
    if temperature == 0.0:
        assert np.all(drawn == 0)


# --- logprobs ---


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logprobs_are_those_of_the_raw_logits(dtype):
    rng = np.random.default_rng(6)
    batch, vocab, k = 16, 64, 5
    logits = jnp.asarray(rng.normal(size=(batch, vocab)) * 3, dtype)
    meta = make_meta(
        batch,
        temperature=rng.choice([0.0, 0.5, 2.0], size=batch),
        top_k=7,
        min_p=0.01,
        positions=np.arange(batch),
        presence_penalty=1.0,
        history=rng.integers(0, vocab, size=(batch, 4)),
        bias_ids=rng.integers(0, vocab, size=(batch, 3)),
        bias_values=rng.normal(size=(batch, 3)) * 5,
    )
    out = sample_jit(logits, meta, num_logprobs=k)
    expected = log_softmax(np.asarray(logits.astype(jnp.float32)))
    ids = np.asarray(out.token_ids)

    np.testing.assert_allclose(np.asarray(out.logprobs), expected[np.arange(batch), ids], atol=1e-5)
    top_logprobs = np.asarray(out.top_logprobs)
    assert np.all(np.diff(top_logprobs, axis=-1) <= 0)
    np.testing.assert_allclose(top_logprobs, -np.sort(-expected, axis=-1)[:, :k], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(expected, np.asarray(out.top_ids), -1), top_logprobs, atol=1e-5)

    none = sample_jit(logits, meta, num_logprobs=0)
    assert none.top_ids.shape == (batch, 0) and none.top_logprobs.shape == (batch, 0)
    np.testing.assert_array_equal(np.asarray(none.token_ids), ids)


@pytest.mark.parametrize("vocab", [100, 128 * 48, 128 * 48 + 5])
@pytest.mark.parametrize("k", [1, 20])
def test_chunked_top_k_equals_lax_top_k_with_ties(vocab, k):
    rng = np.random.default_rng(vocab + k)
    for x in (rng.normal(size=(8, vocab)), rng.integers(0, 3, size=(8, vocab))):  # distinct values, then many ties
        x = jnp.asarray(x, jnp.float32)
        got = jax.jit(top_k, static_argnames="k")(x, k=k)
        want = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_prompt_logprobs_match_numpy():
    rng = np.random.default_rng(7)
    length, vocab, k = 12, 40, 4
    logits = rng.normal(size=(length, vocab)).astype(np.float32) * 2
    targets = rng.integers(0, vocab, size=length)
    targets[-1] = -1
    logits[3, 5:9] = logits[3, targets[3]]  # ties with the target count, as vLLM counts them
    target_lp, rank, top_ids, top_lp = jax.jit(prompt_logprobs, static_argnames="num_logprobs")(
        jnp.asarray(logits), jnp.asarray(targets, jnp.int32), num_logprobs=k
    )
    expected = log_softmax(logits)
    np.testing.assert_allclose(np.asarray(target_lp)[:-1], expected[np.arange(length - 1), targets[:-1]], atol=1e-5)
    assert np.asarray(target_lp)[-1] == 0.0
    chosen = logits[np.arange(length - 1), targets[:-1]][:, None]
    np.testing.assert_array_equal(np.asarray(rank)[:-1], (logits[:-1] >= chosen).sum(-1))
    assert np.asarray(rank)[:-1].max() > k  # some targets rank past the top k
    np.testing.assert_array_equal(np.asarray(top_ids), np.argsort(-expected, axis=-1, kind="stable")[:, :k])
    np.testing.assert_allclose(np.asarray(top_lp), -np.sort(-expected, axis=-1)[:, :k], atol=1e-5)


# --- validation ---


def test_rejects_inconsistent_inputs():
    logits = jnp.zeros((4, 10))
    meta = make_meta(4)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, dataclasses.replace(meta, temperature=jnp.ones(3)), num_logprobs=0)
    with pytest.raises(ValueError, match="seeds"):
        sample(logits, dataclasses.replace(meta, seeds=meta.seeds.astype(jnp.int32)), num_logprobs=0)
    with pytest.raises(ValueError, match="num_logprobs"):
        sample(logits, meta, num_logprobs=11)
    with pytest.raises(ValueError, match="logits"):
        sample(jnp.zeros((4, 10), jnp.int32), meta, num_logprobs=0)


@pytest.mark.parametrize("num_logprobs", [0, 3])
def test_sampling_has_no_device_side_control_flow(num_logprobs, monkeypatch):
    """No cond, case or while in the sampler's program as a GPU gets it: there a device-side predicate is copied to
    the host and waited for, which made dispatching each engine step wait for the whole model (measured on an
    H200). Elsewhere the filter searches are loops (sampler._rolled_searches), as the last assertion checks."""
    from jpaged import sampler

    logits = jnp.zeros((4, 64), jnp.float32)
    monkeypatch.setattr(sampler, "_rolled_searches", lambda: False)  # what jax.default_backend() == "gpu" picks
    # A partial of its own each time: jitted functions of one Python function share their traces.
    text = jax.jit(functools.partial(sample, num_logprobs=num_logprobs)).lower(logits, make_meta(4)).as_text()
    # Off GPU, JAX lowers threefry with a rolled loop of five rounds (a constant trip count); on a GPU it is a
    # single kernel. Every other function must be straight-line code.
    functions = text.split("func.func ")[1:]
    assert any(f.startswith("public @main") for f in functions)
    for function in functions:
        if function.startswith("private @threefry2x32"):
            continue
        for op in ("stablehlo.while", "stablehlo.case", "stablehlo.if"):
            assert op not in function, f"{op} in {function[:60]!r}"
    monkeypatch.undo()
    if jax.default_backend() != "gpu":  # here the filter stage's two searches are loops
        assert sampler._rolled_searches()
        rolled = jax.jit(functools.partial(sample, num_logprobs=num_logprobs)).lower(logits, make_meta(4)).as_text()
        assert rolled.count("stablehlo.while") - rolled.count("func.func private @threefry2x32") == 2


@pytest.mark.parametrize("bits", [1, 4])
def test_rolled_searches_keep_what_the_unrolled_ones_keep(bits, monkeypatch):
    """The filter searches as loops (off a GPU) and unrolled (on one) give the same masks."""
    from jpaged import sampler

    rng = np.random.default_rng(bits)
    for vocab in (7, 300):
        cases = [random_filter_case(rng, 8, vocab) for _ in range(20)]
        masks = []
        for rolled in (True, False):
            monkeypatch.setattr(sampler, "_rolled_searches", lambda rolled=rolled: rolled)
            mask = jax.jit(functools.partial(top_k_top_p_min_p_mask, search="xla", digit_bits=bits))  # traced afresh
            masks.append([np.asarray(mask(*case)) for case in cases])
        for case, got, want in zip(cases, *masks, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=str(case))
        assert len({int(m.sum()) for m in masks[0]}) > 1  # the cases keep different numbers of tokens
