"""On-device sampling: one row of logits and that row's parameters in, one token out.

Legend: B rows, V vocabulary, L history length, M bias entries, K logprobs.

Everything is a pure function of arrays traced inside the engine's jitted step, so a new mix of sampling
parameters neither recompiles nor syncs with the host (hence no data-dependent control flow: see below).
The pipeline follows vLLM: logit bias -> penalties ->
(greedy rows: argmax) -> temperature -> top-k -> top-p -> min-p -> draw. Logprobs are those of the raw logits.

Reproducibility: a row's draw depends only on its own logits and its own key,
fold_in(fold_in(key(seed), sample_index), position), never on a batch key or on the row index. The Gumbel
noise is drawn in vocabulary order (not sorted order) and filtered tokens are masked rather than removed, so
a seeded request yields the same tokens whatever shares its batch, and top_k >= V draws exactly as top_k = 0.
Threefry is named explicitly because other PRNG implementations (rbg) do not promise the same bits under vmap.

No `lax.cond`: every stage runs for every batch and rows that do not use it pass through unchanged (penalties of
0 and 1 are exact identities; greedy rows take the argmax; unfiltered rows keep every token). A cond whose
predicate lives on the device made XLA's GPU executable copy the predicate to the host and wait for it, so
dispatching a step blocked until the model had run: on an H200 that serialised host and device (Llama-2-7B shape,
128 sequences: ~9 ms of idle GPU per 32 ms step, jax.profiler trace) and undid async scheduling. The price is the
filter stage in every step. It used to be a sort (~3 ms at B=256, V=128k on an H200); it is now a threshold
search (top_k_top_p_min_p_mask): two bisections of 32 compare-and-sum passes over [B, V], a kernel launch each on a
GPU (~0.2-0.4 ms of a 7B decode step on an H200). A Pallas kernel running both searches of a row in one program
(jpaged.kernels.filter_search, opt-in) was not clearly faster; see its resolve_impl.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpaged.kernels import filter_search

GREEDY_TEMPERATURE = 1e-5  # temperature <= this samples greedily, as vLLM's _SAMPLING_EPS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    temperature: jax.Array  # [B] float32; <= GREEDY_TEMPERATURE means greedy (argmax)
    top_p: jax.Array  # [B] float32 in (0, 1]; 1 = off
    top_k: jax.Array  # [B] int32; <= 0 = off (>= V is off too)
    min_p: jax.Array  # [B] float32 in [0, 1]; 0 = off
    seeds: jax.Array  # [B] uint32 each request's own seed (the engine draws one for unseeded requests)
    sample_index: jax.Array  # [B] int32 which of a request's n samples this row is (0..n-1)
    positions: jax.Array  # [B] int32 position of the token being sampled (= number of tokens before it)
    presence_penalty: jax.Array  # [B] float32; 0 = off; over output tokens (OpenAI)
    frequency_penalty: jax.Array  # [B] float32; 0 = off; over output tokens (OpenAI)
    repetition_penalty: jax.Array  # [B] float32; 1 = off; over prompt and output tokens (HF/vLLM)
    history: jax.Array  # [B, L] int32 prompt + output ids so far, -1 padded (L may be 1 without penalties)
    prompt_lens: jax.Array  # [B] int32 the first prompt_lens[b] entries of history[b] are prompt tokens
    bias_ids: jax.Array  # [B, M] int32 token ids to bias, -1 padded
    bias_values: jax.Array  # [B, M] float32 added to the logits; -inf bans a token (min_tokens: EOS/stop ids)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # [B] int32 sampled tokens
    logprobs: jax.Array  # [B] float32 logprob of token_ids under log_softmax of the raw logits
    top_ids: jax.Array  # [B, K] int32 the K most likely tokens of the raw logits, most likely first
    top_logprobs: jax.Array  # [B, K] float32 their logprobs, descending


def sample(logits: jax.Array, meta: SamplingMetadata, *, num_logprobs: int, filters: bool = True) -> SamplerOutput:
    """Samples one token per row of `logits` [B, V] (any float dtype; computed in float32).

    `num_logprobs` is static: 0 skips the top-K logprobs (top_ids/top_logprobs are then [B, 0]). `filters` is
    static too: False skips the top-k/top-p/min-p stage, which is an exact identity for batches where no row uses it
    (`filtered_rows` of the metadata all False), so their tokens do not change.
    """
    _check_inputs(logits, meta, num_logprobs)
    raw = logits.astype(jnp.float32)
    x = apply_logit_bias(raw, meta.bias_ids, meta.bias_values)
    x = apply_penalties(x, meta)  # rows without penalties: an exact identity
    greedy = meta.temperature <= GREEDY_TEMPERATURE
    greedy_ids = jnp.argmax(x, axis=-1).astype(jnp.int32)  # first maximum, like a stable sort's rank 0

    temperature = jnp.where(greedy, 1.0, meta.temperature)  # greedy rows' draws are discarded; no x / 0
    scaled = x / temperature[:, None]
    noise = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[1:], jnp.float32))(row_keys(meta))
    candidates = scaled + noise
    if filters:  # ~200 kernel launches of a 7B decode step on an H200, whether or not a row filters
        filtered = filtered_rows(meta.temperature, meta.top_k, meta.top_p, meta.min_p, vocab=x.shape[1])
        keep = ~filtered[:, None] | top_k_top_p_min_p_mask(scaled, meta.top_k, meta.top_p, meta.min_p)
        candidates = jnp.where(keep, candidates, -jnp.inf)
    drawn = jnp.argmax(candidates, axis=-1).astype(jnp.int32)
    token_ids = jnp.where(greedy, greedy_ids, drawn)
    logprobs, top_ids, top_logprobs = _raw_logprobs(raw, token_ids, num_logprobs)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)


def filtered_rows[Array: (jax.Array, np.ndarray)](
    temperature: Array, top_k: Array, top_p: Array, min_p: Array, *, vocab: int
) -> Array:
    """[B] bool: the rows whose draw top-k, top-p or min-p restricts (greedy rows never: they take the argmax).

    Plain array operators, so the host evaluates on the numpy columns it packs exactly what the step evaluates on
    the device (jpaged.runner picks the step without the filter stage where this is all False).
    """
    top_k_on = (top_k > 0) & (top_k < vocab)
    return ~(temperature <= GREEDY_TEMPERATURE) & (top_k_on | (top_p < 1) | (min_p > 0))  # `sample`'s greedy test


def prompt_logprobs(
    logits: jax.Array, targets: jax.Array, *, num_logprobs: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Logprobs of each prompt position's next token under the raw logits [T, V].

    targets [T] int32 is the next token of each position, -1 where there is none (its logprob and rank are then
    0 and meaningless). Returns (target logprob [T], target rank [T] int32: the tokens at least as likely, itself
    included, as vLLM counts it; top_ids [T, K], top_logprobs [T, K]). The [T, V] log_softmax is never
    materialised, but the float32 logits are: chunk long prompts.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"want logits [T, V] and targets [T]; got {logits.shape} and {targets.shape}")
    _check_num_logprobs(num_logprobs, logits.shape[1])
    raw = logits.astype(jnp.float32)
    safe = jnp.maximum(targets, 0)
    chosen, top_ids, top_logprobs = _raw_logprobs(raw, safe, num_logprobs)
    target_logit = jnp.take_along_axis(raw, safe[:, None], axis=-1)  # [T, 1]
    rank = jnp.sum(raw >= target_logit, axis=-1, dtype=jnp.int32)
    valid = targets >= 0
    return jnp.where(valid, chosen, 0.0), jnp.where(valid, rank, 0), top_ids, top_logprobs


def apply_logit_bias(logits: jax.Array, bias_ids: jax.Array, bias_values: jax.Array) -> jax.Array:
    """Adds bias_values [B, M] at bias_ids [B, M] (-1 = padding; a repeated id gets the sum) to logits [B, V].

    Ids outside [0, V) are dropped, not clipped: the engine validates requests' ids against the vocabulary.
    """
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where(bias_ids >= 0, bias_ids, logits.shape[1])
    return logits.at[rows, ids].add(bias_values.astype(logits.dtype), mode="drop")


def apply_penalties(logits: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens) penalties, as vLLM.

    A token seen anywhere in history[b] has its logit divided by repetition_penalty if positive, else
    multiplied; then frequency_penalty * (its count in the output) and presence_penalty * (1 if in the output)
    are subtracted.
    """
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]
    in_output = lax.broadcasted_iota(jnp.int32, meta.history.shape, 1) >= meta.prompt_lens[:, None]
    valid = meta.history >= 0
    output_ids = jnp.where(valid & in_output, meta.history, vocab)  # vocab = out of range, dropped
    prompt_ids = jnp.where(valid & ~in_output, meta.history, vocab)
    counts = jnp.zeros((batch, vocab), jnp.int32).at[rows, output_ids].add(1, mode="drop")  # [B, V]
    in_prompt = jnp.zeros((batch, vocab), bool).at[rows, prompt_ids].set(True, mode="drop")  # [B, V]

    repetition = meta.repetition_penalty[:, None]
    penalised = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = jnp.where(in_prompt | (counts > 0), penalised, logits)
    logits = logits - meta.frequency_penalty[:, None] * counts.astype(logits.dtype)
    return logits - meta.presence_penalty[:, None] * (counts > 0).astype(logits.dtype)


def _count(mask: jax.Array) -> jax.Array:  # [B, V] bool -> [B, 1] int32
    return jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.int32)


def _mass(mask: jax.Array, weights: jax.Array) -> jax.Array:  # [B, V] bool, [B, V] float32 -> [B, 1] float32
    return jnp.sum(jnp.where(mask, weights, 0.0), axis=-1, keepdims=True)


def top_k_top_p_min_p_mask(
    scaled: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    *,
    search: str = "auto",
    digit_bits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Which tokens of temperature-scaled float32 logits [B, V] survive top-k, top-p, then min-p: [B, V] bool.

    The mask of top_k_top_p_min_p_mask_sorted (whose docstring has the semantics), found without sorting. Each
    filter keeps the tokens at or above some value, so together they keep those at or above the largest of the
    three: every token above it and, of those tied at it, as many as fit, lowest ids first. The values are found
    by a radix search over order-preserving integer keys: the k-th largest by counting, then top-p's by summing
    probabilities, which are normalised over the top-k survivors and so wait for the k-th largest. min-p's takes
    one pass. `search` says who runs the two searches: "xla", one compare-and-sum pass over [B, V] a step
    (`_largest_key`, `digit_bits` per step, DIGIT_BITS by default), each pass a kernel launch on a GPU; "pallas",
    jpaged.kernels.filter_search, both searches of a row in one program (off GPU with interpret=True); "auto",
    XLA's (filter_search.resolve_impl says why).

    Top-k and min-p are exact. Top-p sums the same probabilities as the sorted version's cumsum in another order
    (and that cumsum itself rounds differently on CPU and GPU), so a row whose top_p lies within float32
    rounding (~1e-6) of a cumulative probability may keep one token more or one fewer. Logits must not be NaN or
    +inf; -inf (a banned token) is fine.
    """
    vocab = scaled.shape[1]
    keys = _order_keys(scaled)  # [B, V] uint32
    top = jnp.max(scaled, axis=-1, keepdims=True)  # [B, 1]
    weights = jnp.exp(scaled - top)  # [B, V] unnormalised probabilities, as softmax computes them
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k).astype(jnp.int32)  # [B]
    if filter_search.resolve_impl(search) == "pallas":
        found = filter_search.filter_thresholds(keys, weights, k, top_p.astype(jnp.float32), interpret=interpret)
    else:
        found = _filter_thresholds_xla(keys, weights, top, k, top_p, digit_bits)
    kth, normaliser, top_p_last = (x[:, None] for x in found)  # [B, 1] each
    k, top_p = k[:, None], top_p[:, None]

    mass = functools.partial(_mass, weights=weights)

    in_min_p = scaled - top >= jnp.log(min_p)[:, None]  # the sorted version's float ops; log(0) = -inf
    num_min_p = _count(in_min_p)
    min_p_last = jnp.min(jnp.where(in_min_p, keys, _KEY_MAX), axis=-1, keepdims=True)  # _KEY_MAX if none
    # the last kept value; at most the top one, as one token is always kept (top_p <= 0, min_p > 1, all -inf)
    threshold = jnp.minimum(jnp.maximum(jnp.maximum(kth, top_p_last), min_p_last), _order_keys(top))

    above = keys > threshold
    tied = keys == threshold
    num_above, num_tied = _count(above), _count(tied)
    # top-p inside the tie group: its j-th token (from 0) survives while p_above + j * p_tied < top_p
    p_above = mass(above) / normaliser
    p_tied = jnp.exp(_key_value(threshold) - top) / normaliser
    tied_in_top_p = jnp.minimum(jnp.ceil((top_p - p_above) / p_tied), num_tied.astype(jnp.float32))
    tied_in_top_p = jnp.where(p_above < top_p, tied_in_top_p, 0.0).astype(jnp.int32)  # also when p_tied = 0
    num_top_p = jnp.where(top_p >= 1, vocab, num_above + tied_in_top_p)
    # in (num_above, num_above + num_tied], but for top-p's rounding (then one token more or fewer at most)
    num_kept = jnp.maximum(jnp.minimum(jnp.minimum(k, num_top_p), num_min_p), 1)
    room = num_kept - num_above  # how many tied tokens fit, lowest ids first
    return above | (tied & (jnp.cumsum(tied, axis=-1) <= room))


def _filter_thresholds_xla(
    keys: jax.Array, weights: jax.Array, top: jax.Array, k: jax.Array, top_p: jax.Array, digit_bits: int | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """filter_search.filter_thresholds in XLA: the k-th largest key, the top-k survivors' mass, top-p's last key
    ([B] each), each search pass a [B, V] reduction."""
    rows = keys.shape[0]
    k, top_p = k[:, None], top_p[:, None]

    mass = functools.partial(_mass, weights=weights)

    # The searches ask about J thresholds t [B, J] at once: J reductions of [B, V] each, never a [B, J, V] array
    # (which XLA on CPU materialised: ~2 GB a pass at B = 256, V = 128k), siblings a GPU compiler can fuse.
    def at_least(reduce: Callable[[jax.Array], jax.Array], t: jax.Array) -> jax.Array:  # t [B, J] -> [B, J]
        return jnp.concatenate([reduce(keys >= t[:, j : j + 1]) for j in range(t.shape[1])], axis=-1)

    rolled = _rolled_searches()
    kth = _largest_key(lambda t: at_least(_count, t) >= k, rows, digit_bits, rolled=rolled)  # [B, 1] the k-th largest
    above_kth = keys > kth
    # softmax normaliser of the top-k survivors: those above the k-th value, then enough of those tied at it
    normaliser = mass(above_kth) + (k - _count(above_kth)) * jnp.exp(_key_value(kth) - top)
    # the top-p survivors end at the largest value whose tokens at or above it hold top_p of the mass (0 if off)
    top_p_last = _largest_key(
        lambda t: (top_p < 1) & (at_least(mass, t) / normaliser >= top_p), rows, digit_bits, rolled=rolled
    )
    return kth[:, 0], normaliser[:, 0], top_p_last[:, 0]


def top_k_top_p_min_p_mask_sorted(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """The definition of top_k_top_p_min_p_mask, by one descending sort per row: the tests' reference.

    Each filter keeps a prefix of the sorted row, so together they keep its first `num_kept` entries; mapping
    that prefix back to the vocabulary breaks ties towards the lower token id, as argmax does, so top_k = 1 (or
    a tiny top_p) keeps exactly the greedy token. top-p is measured on the top-k survivors renormalised; min-p
    keeps tokens with prob >= min_p * max prob, which no earlier filter changes.
    """
    vocab = scaled.shape[1]
    desc = -jnp.sort(-scaled, axis=-1)  # [B, V] each row descending
    rank = lax.broadcasted_iota(jnp.int32, desc.shape, 1)
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    in_top_k = rank < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
    # Mass of strictly more likely tokens; an exclusive cumsum of non-negative floats never decreases.
    mass_before = jnp.concatenate([jnp.zeros_like(probs[:, :1]), jnp.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)  # p = 1 is off despite cumsum rounding
    in_min_p = desc - desc[:, :1] >= jnp.log(min_p)[:, None]  # log(0) = -inf keeps everything
    num_kept = jnp.maximum(jnp.sum(in_top_k & in_top_p & in_min_p, axis=-1, keepdims=True), 1)  # [B, 1]

    threshold = jnp.take_along_axis(desc, num_kept - 1, axis=-1)  # [B, 1] the last kept value
    above = scaled > threshold
    tied = scaled == threshold
    room = num_kept - jnp.sum(above, axis=-1, keepdims=True)  # how many tied tokens fit, lowest ids first
    return above | (tied & (jnp.cumsum(tied, axis=-1) <= room))


_SIGN = np.uint32(1 << 31)
_KEY_MAX = np.uint32(2**32 - 1)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys of float32 x that order as the floats do (-0.0 and 0.0 get one key; NaN sorts outside ±inf)."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | _SIGN)  # negatives reversed, below the positives


def _key_value(key: jax.Array) -> jax.Array:
    """The float32 whose _order_keys is `key`."""
    return lax.bitcast_convert_type(jnp.where(key >> 31 == 1, key & ~_SIGN, ~key), jnp.float32)


# Bits of the key `_largest_key` settles per step: a bisection (1 bit: 32 passes over [B, V] per search, one
# comparison a token) on every backend. 4 bits (8 passes of 15 comparisons) took longer everywhere measured: on the
# H200 (benchmarks/sampler.py, V = 32,000) 961 against 434 us a mask at B = 1, 1,049 against 590 at B = 128 (not
# profiled further); on the CPU box 4.5x.
DIGIT_BITS = 1
_DIGIT_WIDTHS = (1, 2, 4, 8)


def _largest_key(
    holds: Callable[[jax.Array], jax.Array], rows: int, bits: int | None = None, *, rolled: bool = False
) -> jax.Array:
    """The largest uint32 t [B, 1] with holds(t) (0 if none), for a `holds` never true again once false.

    `holds` maps candidates [B, J] to [B, J] bool. The key is settled `bits` bits a step (DIGIT_BITS by default),
    from the top: each step asks about the 2**bits - 1 candidates for the next digit at once, and as `holds` is
    monotone the digits that hold are a prefix, so their count is the digit (1 bit: a bisection). Unrolled unless
    `rolled`, so the step holds no loop: a loop with a device predicate had made every step on the H200 wait for
    the model (see the module docstring).
    """
    bits = DIGIT_BITS if bits is None else bits
    if bits not in _DIGIT_WIDTHS:
        raise ValueError(f"bits must be one of {_DIGIT_WIDTHS}, got {bits}")
    digits = np.arange(1, 1 << bits, dtype=np.uint32)[None, :]  # [1, J]

    def settle(shift: np.uint32 | jax.Array, found: jax.Array) -> jax.Array:  # the digit at bits [shift, shift + bits)
        candidates = found | (digits << shift)  # [B, J]
        digit = jnp.sum(holds(candidates), axis=-1, keepdims=True, dtype=jnp.uint32)  # [B, 1]
        return found | (digit << shift)

    found = jnp.zeros((rows, 1), jnp.uint32)
    if rolled:
        return lax.fori_loop(0, 32 // bits, lambda i, f: settle((32 - bits * (i + 1)).astype(jnp.uint32), f), found)
    for shift in range(32 - bits, -1, -bits):
        found = settle(np.uint32(shift), found)
    return found


def _rolled_searches() -> bool:
    """Whether the filter searches run as loops: everywhere but on a GPU (see `_largest_key` for why not there). A
    CPU evaluates a loop's predicate where it runs the rest (as a TPU's scalar core does), and XLA:CPU compiles the
    loop in less than half the time of the unrolled passes: 2.0-2.5 s instead of 4.6-4.9 for the bundled model's
    whole step, whose two searches unrolled are 64 copies of a pass. The CPU test suite, mostly such compiles, went
    from 21:07 to 15:12 with it."""
    return jax.default_backend() != "gpu"


def row_keys(meta: SamplingMetadata) -> jax.Array:
    """[B] typed keys, each from its row's (seed, sample_index, position) alone."""

    def one(seed: jax.Array, sample_index: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.key(seed, impl="threefry2x32")
        return jax.random.fold_in(jax.random.fold_in(key, sample_index), position)

    return jax.vmap(one)(meta.seeds, meta.sample_index, meta.positions)


def _raw_logprobs(raw: jax.Array, token_ids: jax.Array, num_logprobs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log_softmax(raw [R, V]) at token_ids [R], and its top `num_logprobs` (ties: lower id first).

    Computed as raw - logsumexp(raw), so no [R, V] log_softmax is written out.
    """
    lse = jax.nn.logsumexp(raw, axis=-1)  # [R]
    chosen = jnp.take_along_axis(raw, token_ids[:, None], axis=-1)[:, 0] - lse
    if num_logprobs == 0:
        rows = raw.shape[0]
        return chosen, jnp.zeros((rows, 0), jnp.int32), jnp.zeros((rows, 0), jnp.float32)
    top_values, top_ids = top_k(raw, num_logprobs)
    return chosen, top_ids.astype(jnp.int32), top_values - lse[:, None]


def top_k(x: jax.Array, k: int, *, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """Exactly lax.top_k(x [R, V], k) (ties: lower index first), ranking only k * chunk candidates per row.

    XLA's GPU TopK kernel serves only k <= 16 and sorts whole rows above that: k = 20 at R=256, V=128k took
    2.2 ms on an H200. The best k elements lie in the k chunks with the best maxima (a chunk outside those is
    beaten by k chunk maxima, each a distinct better element), so those k chunks are all that need ranking.
    """
    rows, vocab = x.shape
    num_chunks = -(-vocab // chunk)
    if num_chunks <= 2 * k:
        return lax.top_k(x, k)
    padding = num_chunks * chunk - vocab  # -inf at the highest ids: never ahead of a real element
    chunks = jnp.pad(x, ((0, 0), (0, padding)), constant_values=-jnp.inf).reshape(rows, num_chunks, chunk)
    _, best = lax.top_k(chunks.max(axis=-1), k)  # [R, k]
    best = jnp.sort(best, axis=-1)  # in id order, so that ties among candidates still go to the lower id
    candidates = jnp.take_along_axis(chunks, best[:, :, None], axis=1).reshape(rows, k * chunk)
    values, where = lax.top_k(candidates, k)
    return values, jnp.take_along_axis(best, where // chunk, axis=-1) * chunk + where % chunk


def _check_num_logprobs(num_logprobs: int, vocab: int) -> None:
    if not isinstance(num_logprobs, int) or not 0 <= num_logprobs <= vocab:
        raise ValueError(f"num_logprobs must be a static int in [0, {vocab}], got {num_logprobs!r}")


def _check_inputs(logits: jax.Array, meta: SamplingMetadata, num_logprobs: int) -> None:
    if logits.ndim != 2 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a float [B, V] array, got {logits.dtype}{list(logits.shape)}")
    batch, vocab = logits.shape
    _check_num_logprobs(num_logprobs, vocab)
    for field in dataclasses.fields(meta):
        value = getattr(meta, field.name)
        ndim = 2 if field.name in ("history", "bias_ids", "bias_values") else 1
        if value.ndim != ndim or value.shape[0] != batch:
            raise ValueError(f"meta.{field.name} must be {ndim}-D with {batch} rows, got {list(value.shape)}")
    if meta.bias_ids.shape != meta.bias_values.shape:
        raise ValueError(f"bias_ids {meta.bias_ids.shape} and bias_values {meta.bias_values.shape} differ")
    if meta.seeds.dtype != jnp.uint32:
        raise ValueError(f"meta.seeds must be uint32, got {meta.seeds.dtype}")
