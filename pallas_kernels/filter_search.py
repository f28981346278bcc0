"""The sampler's top-k / top-p thresholds, both radix searches of a row in one kernel launch (opt-in: XLA's passes
stay the default, measured faster or as fast; see resolve_impl).

B rows, V vocabulary (padded to Vp, a multiple of the block), J = 2**DIGIT_BITS candidates a pass.

jpaged's sampler keeps, per row, the tokens at or above a threshold found without sorting (jpaged/sampler.py):
the k-th largest order key (the largest t with count(keys >= t) >= k) and top-p's last key (the largest t with
mass(keys >= t) / normaliser >= top_p, the mass normalised over the top-k survivors). Written in XLA each search
is a chain of [B, V] reductions, a kernel launch each: the step of a 7B model on an H200 runs ~200 of them. Here one
program a row runs both searches and the normaliser between them, re-reading its row from L2 every pass.

Keys are the sampler's order-preserving uint32 keys with the sign bit flipped, as int32, so that signed
comparisons order them (Triton compares int32 signed). Padding keys are INT32_MIN, the flipped key 0: every
candidate a search asks about is at least 1, so padding is never counted, and its weight is 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.kernels.paged_attention import pallas_out_struct
from jpaged.kernels.platform import on_gpu

DIGIT_BITS = 4  # a pass settles 4 bits of a 32-bit key against 15 candidates: 8 passes a search
_J = 1 << DIGIT_BITS
_INT32_MIN = np.int32(-(2**31))


@dataclasses.dataclass(frozen=True)
class FilterSearchTuning:
    """On the H200 (benchmarks/sampler.py, V = 32,000; block/warps/stages) the largest tiles won: at B = 1,
    1024/8/2 took 311 us a call against 689 us at 256/4/2; at B = 128, 512/8/3 took 482 us (1024/8/2 not timed
    there), though 128/4/3 beat 256/4/2 (586 against 765 us): block size and warps were not varied apart."""

    block: int = 1024  # vocabulary entries a loop iteration compares with all J candidates (a [J, block] tile)
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {self.block}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


def to_signed_keys(keys: jax.Array) -> jax.Array:
    """uint32 order keys -> int32 keys that order the same way under signed comparison."""
    return lax.bitcast_convert_type(keys ^ np.uint32(1 << 31), jnp.int32)


def _validate(keys, weights, top_k, top_p) -> None:
    if keys.ndim != 2 or keys.dtype != jnp.uint32:
        raise ValueError(f"keys must be uint32 [B, V], got {keys.dtype}{list(keys.shape)}")
    if weights.shape != keys.shape or weights.dtype != jnp.float32:
        raise ValueError(f"weights must be float32 {list(keys.shape)}, got {weights.dtype}{list(weights.shape)}")
    rows = keys.shape[0]
    if top_k.shape != (rows,) or top_k.dtype != jnp.int32:
        raise ValueError(f"top_k must be int32 [{rows}], got {top_k.dtype}{list(top_k.shape)}")
    if top_p.shape != (rows,) or top_p.dtype != jnp.float32:
        raise ValueError(f"top_p must be float32 [{rows}], got {top_p.dtype}{list(top_p.shape)}")


def filter_thresholds_reference(
    keys: jax.Array,  # [B, V] uint32 order keys
    weights: jax.Array,  # [B, V] float32 exp(logit - row max)
    top_k: jax.Array,  # [B] int32 in [1, V]
    top_p: jax.Array,  # [B] float32; >= 1 = off
) -> tuple[jax.Array, jax.Array, jax.Array]:  # kth [B] uint32, normaliser [B] float32, top_p_last [B] uint32
    """Plain jnp by sorting: both thresholds are key values of the row (or 0), so per token the mass at or above
    its key is all that needs knowing (the tests' oracle; sums in another order than the kernel). Except where
    top_p <= 0: every key then holds, so the search's answer is the largest uint32, 0xFFFFFFFF (the sampler keeps
    the top token: it caps its threshold at the top key)."""
    _validate(keys, weights, top_k, top_p)
    order = jnp.argsort(keys, axis=-1)  # ascending
    asc = jnp.take_along_axis(keys, order, axis=-1)
    w = jnp.take_along_axis(weights, order, axis=-1)
    first = jax.vmap(lambda a: jnp.searchsorted(a, a, side="left"))(asc)  # [B, V] first index of each key's ties
    at_or_above_count = keys.shape[1] - first
    suffix_mass = jnp.flip(jnp.cumsum(jnp.flip(w, -1), -1), -1)  # mass from each ascending position up
    at_or_above_mass = jnp.take_along_axis(suffix_mass, first, axis=-1)
    kth = jnp.max(jnp.where(at_or_above_count >= top_k[:, None], asc, 0), axis=-1)
    above = asc > kth[:, None]
    kth_weight = jnp.max(jnp.where(asc == kth[:, None], w, 0.0), axis=-1)
    normaliser = jnp.sum(jnp.where(above, w, 0.0), -1) + (top_k - jnp.sum(above, -1)) * kth_weight
    holds = (top_p[:, None] < 1) & (at_or_above_mass / normaliser[:, None] >= top_p[:, None])
    top_p_last = jnp.where(top_p <= 0, np.uint32(2**32 - 1), jnp.max(jnp.where(holds, asc, 0), axis=-1))
    return kth, normaliser, top_p_last


def _kernel(
    top_k_ref,  # [B] int32 in [1, V]
    top_p_ref,  # [B] float32
    keys_ref,  # [Vp] int32 this row's signed keys, INT32_MIN past V
    weights_ref,  # [Vp] float32 this row's exp(logit - max), 0 past V
    kth_ref,  # [B] int32 out: the k-th largest key (uint32 bits)
    normaliser_ref,  # [B] float32 out: mass of the top-k survivors
    top_p_last_ref,  # [B] int32 out: top-p's last key (uint32 bits; 0 when off or none)
    *,
    block: int,
):
    row = pl.program_id(0)
    k, p = top_k_ref[row], top_p_ref[row]
    num_blocks = keys_ref.shape[0] // block
    digits = lax.broadcasted_iota(jnp.int32, (_J, 1), 0)  # [J, 1]

    def per_candidate_sums(candidates, of_weights: bool):  # [J, 1] signed -> [J]: count or mass of keys >= each
        dtype = jnp.float32 if of_weights else jnp.int32

        def body(i, acc):  # acc [J, block]: reduced once a pass, not once an iteration
            at = pl.ds(pl.multiple_of(i * block, block), block)
            ge = keys_ref[at][None, :] >= candidates  # [J, block]
            if of_weights:
                return acc + jnp.where(ge, weights_ref[at][None, :], 0.0)
            return acc + ge.astype(jnp.int32)

        return jnp.sum(lax.fori_loop(0, num_blocks, body, jnp.zeros((_J, block), dtype)), axis=1)

    def largest_key(holds, of_weights: bool):  # the largest uint32 t (as int32 bits) with holds(sums(t)), or 0
        found = jnp.int32(0)
        for shift in range(32 - DIGIT_BITS, -1, -DIGIT_BITS):
            candidates = found | (digits << shift)  # [J, 1] uint32 bits; digit 0 is `found`, which holds
            ok = holds(per_candidate_sums(candidates ^ _INT32_MIN, of_weights)) & (digits[:, 0] > 0)
            found = found | (jnp.sum(ok.astype(jnp.int32)) << shift)  # monotone: the digits that hold are a prefix
        return found

    kth = largest_key(lambda counts: counts >= k, of_weights=False)
    kth_signed = kth ^ _INT32_MIN

    def normaliser_body(i, acc):  # mass and count above the k-th key, and the k-th key's own weight
        mass, count, kth_weight = acc
        at = pl.ds(pl.multiple_of(i * block, block), block)
        keys, weights = keys_ref[at], weights_ref[at]
        above = keys > kth_signed
        return (
            mass + jnp.where(above, weights, 0.0),
            count + above.astype(jnp.int32),
            jnp.maximum(kth_weight, jnp.where(keys == kth_signed, weights, 0.0)),
        )

    zeros = jnp.zeros((block,), jnp.float32)
    mass, count, kth_weight = lax.fori_loop(
        0, num_blocks, normaliser_body, (zeros, jnp.zeros((block,), jnp.int32), zeros)
    )
    # the top-k survivors: every token above the k-th key, then as many tied at it as fit
    normaliser = jnp.sum(mass) + (k - jnp.sum(count)).astype(jnp.float32) * jnp.max(kth_weight)
    top_p_last = largest_key(lambda masses: (p < 1) & (masses / normaliser >= p), of_weights=True)
    kth_ref[row] = kth
    normaliser_ref[row] = normaliser
    top_p_last_ref[row] = top_p_last


def resolve_impl(impl: str) -> str:
    """What "auto" means: XLA's passes on every backend. On the H200 the kernel lost or barely won (benchmarks/
    sampler.py, a mask per call): at V = 32,000, B = 1, 311 us at its best tuning against XLA's 434 (689 at the first
    tuning, which in the 7B decode step made a step 0.46 ms slower at batch 1 and 0.6 ms at batch 128); at B = 128
    482 against 590; at V = 128,256, B = 128, 3.3 ms. One program a row leaves a batch-1 step's search on one SM,
    latency-bound on its loop, and at 4 bits a pass it compares each token 128 times a search (16 candidates, 8
    passes). Beating XLA clearly
    needs a row split over many programs, which needs a grid-wide reduction between passes."""
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'pallas', got {impl!r}")
    return "xla" if impl == "auto" else impl


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def filter_thresholds(
    keys: jax.Array,  # [B, V] uint32 order keys (jpaged.sampler._order_keys)
    weights: jax.Array,  # [B, V] float32 exp(logit - row max)
    top_k: jax.Array,  # [B] int32 in [1, V] (V = off)
    top_p: jax.Array,  # [B] float32; >= 1 = off
    *,
    tuning: FilterSearchTuning = FilterSearchTuning(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # kth [B] uint32, normaliser [B] float32, top_p_last [B] uint32
    """Per row: the k-th largest key; the softmax mass of the top-k survivors; the largest key t whose tokens at
    or above it hold top_p of that mass (0 when top_p >= 1; 0xFFFFFFFF when top_p <= 0). One program a row; off
    GPU needs interpret=True."""
    _validate(keys, weights, top_k, top_p)
    if not interpret and not on_gpu():
        raise ValueError(f"the kernel needs a GPU (backend is {jax.default_backend()!r}) or interpret=True")
    rows, vocab = keys.shape
    padded = -(-vocab // tuning.block) * tuning.block
    signed = jnp.pad(to_signed_keys(keys), ((0, 0), (0, padded - vocab)), constant_values=_INT32_MIN)
    weights = jnp.pad(weights, ((0, 0), (0, padded - vocab)))
    row_spec = pl.BlockSpec((None, padded), lambda b: (b, 0))
    kth, normaliser, top_p_last = pl.pallas_call(
        functools.partial(_kernel, block=tuning.block),
        grid=(rows,),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), row_spec, row_spec],
        out_specs=[pl.BlockSpec()] * 3,
        out_shape=[pallas_out_struct((rows,), dtype, keys, weights) for dtype in (jnp.int32, jnp.float32, jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=interpret,
        name="filter_search",
    )(top_k, top_p, signed, weights)
    as_key = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.uint32)
    return as_key(kth), normaliser, as_key(top_p_last)
