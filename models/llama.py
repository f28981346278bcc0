"""Llama (and Mistral) as a pure function over a ragged token batch and a paged KV cache.

Dimensions: T tokens, D model, N q-heads, K kv-heads, G = N / K, H head dim, F ffn, V vocab, R logit rows.

Parameters are a plain pytree of per-layer arrays (a Python list, unrolled in the jitted graph: on the H200 a
`lax.scan` over stacked layer weights streams them at a third of the bandwidth, see ../shared/anchors/README.md):

    {"embed": [V, D], "final_norm": [D], "lm_head": [V, D] (untied models only),
     "layers": [{"attn_norm": [D], "wqkv": [D, K, G + 2, H], "wo": [N, H, D],
                 "mlp_norm": [D], "w_gate_up": [D, 2, F], "w_down": [F, D]}, ...]}

q/k/v and gate/up are fused (the loader concatenates HF's matrices) because a decode step is a stream of weight
reads and fewer, larger matmuls stream faster (benchmarks/gemm.py). wqkv is ordered per KV head, so splitting it
on K over devices hands each device whole attention groups (jpaged/sharding.py).

Weight matmuls with few rows (decode) can run on a Pallas kernel (matmul_impl "pallas" or "mgpu", see `project`); by
default they are XLA's but where the Mosaic GPU kernel measured faster on the H200.

Mixtral (models/mixtral.py) reuses everything here and swaps the feed-forward.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jpaged import sharding
from jpaged.kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm
from jpaged.kernels.add_rms_norm import pallas_unsupported_reason as add_norm_unsupported_reason
from jpaged.kernels.add_rms_norm import resolve_impl as resolve_norm_impl
from jpaged.kernels.grouped_matmul import default_tuning, matmul, matmul_unsupported_reason
from jpaged.kernels.matmul_mgpu import default_tuning as mgpu_tuning
from jpaged.kernels.matmul_mgpu import matmul_mgpu, matmul_mgpu_unsupported_reason, measured_faster_tuning
from jpaged.kernels.paged_attention import paged_attention
from jpaged.kernels.platform import on_gpu, on_hopper
from jpaged.kernels.rope_write_kv import rope_write_kv
from jpaged.models.config import ModelConfig, RopeConfig
from jpaged.models.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

Params = dict[str, Any]
KVPages = list[tuple[jax.Array, jax.Array]]  # per layer: (k_pages, v_pages), each [K, P, S, H]
# feed_forward(layer, x [T, D], cfg, num_tokens [] int32: rows past it are padding, *, matmul_impl) -> [T, D]
FeedForward = Callable[..., jax.Array]


def add_norm(x: jax.Array, delta: jax.Array, weight: jax.Array, cfg: ModelConfig, *, impl: str):
    """(x + delta, rms_norm(x + delta)) [T, D] each: the residual add and the next norm, fused by the kernel
    (add_rms_norm.py) where it runs; "pallas" where D cannot be a Triton block falls back to XLA, saying why in the
    log."""
    if impl == "pallas" and (reason := add_norm_unsupported_reason(x)) is not None:
        logger.info("norm_impl='pallas': XLA for rows of width %d (%s)", x.shape[1], reason)
        impl = "xla"
    if resolve_norm_impl(impl, x) == "xla":  # no kernel: XLA partitions it like any other op
        return add_rms_norm_reference(x, delta, weight, cfg.rms_norm_eps)
    fn = functools.partial(add_rms_norm, eps=cfg.rms_norm_eps, impl="pallas", interpret=not on_gpu())
    return sharding.on_every_device(fn)(x, delta, weight)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> jax.Array:
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1's frequency-dependent scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
        # ramp in between (same formula as HF's _compute_llama3_parameters).
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


# Weight matmuls of at most this many rows may take a kernel (decode steps; prefill-sized ones are compute-bound and
# stay with XLA's GEMMs).
MAX_KERNEL_ROWS = 256


def _kernel_unsupported_reason(x: jax.Array, w: jax.Array, impl: str) -> str | None:
    if x.shape[0] > MAX_KERNEL_ROWS:
        return f"{x.shape[0]} rows > {MAX_KERNEL_ROWS}"
    if impl == "mgpu":
        return matmul_mgpu_unsupported_reason(x, w, mgpu_tuning(*x.shape, w.shape[1]))
    return matmul_unsupported_reason(x, w, default_tuning(*x.shape, w.shape[1], 1))


def _matmul(x: jax.Array, w: jax.Array, impl: str) -> jax.Array:
    """x [M, K] @ w [K, N]. "xla": XLA's GEMMs. "auto": XLA's, except on Hopper for the shapes where the Mosaic GPU
    kernel measured faster (`measured_faster_tuning`). "pallas" (the Triton-lowered kernel, slower than XLA for
    Llama-2-7B's decode shapes on the H200) and "mgpu" (the Mosaic GPU one, default tunings) where they can run the
    shapes, XLA elsewhere."""
    tuning = measured_faster_tuning(*x.shape, w.shape[1]) if impl == "auto" and on_hopper() else None
    if tuning is not None and matmul_mgpu_unsupported_reason(x, w, tuning) is None:  # (a float32 model is not)
        return matmul_mgpu(x, w, tuning=tuning)
    if impl in ("auto", "xla"):
        return matmul(x, w, impl="xla")
    if (reason := _kernel_unsupported_reason(x, w, impl)) is not None:
        # e.g. a width the kernel cannot tile (a device's slice under tensor parallelism) or a prefill-sized step:
        # XLA for this projection, said once per compilation.
        logger.info("matmul_impl=%r: XLA for a [%d, %d] x [%d, %d] projection (%s)", impl, *x.shape, *w.shape, reason)
        return matmul(x, w, impl="xla")
    if impl == "mgpu":
        return matmul_mgpu(x, w, interpret=jax.default_backend() != "gpu")
    return matmul(x, w, impl="pallas")


def _project(x: jax.Array, w: jax.Array, *, impl: str) -> jax.Array:
    """x [T, I...] @ w [I..., O...] contracting x's trailing dims with w's leading ones -> [T, O...]."""
    contract = x.ndim - 1
    x2 = x.reshape(x.shape[0], -1)
    out = _matmul(x2, w.reshape(x2.shape[1], -1), impl)
    return out.reshape(x.shape[0], *w.shape[contract:])


def project(x: jax.Array, layer: dict[str, jax.Array], name: str, *, impl: str) -> jax.Array:
    """x @ layer[name] under tensor parallelism: a weight split on an output dimension runs per device
    (column-parallel); one split on its first, contracted, dimension sums the devices' partial outputs (row-parallel).

    impl: "xla" or "auto" (XLA's GEMMs), "pallas" (the Triton-lowered Pallas kernel) or "mgpu" (the Mosaic GPU one)
    for steps of <= MAX_KERNEL_ROWS rows, where the kernel can tile the weight.
    """
    w, fn = layer[name], functools.partial(_project, impl=impl)
    if name in sharding.ROW_PARALLEL:
        return sharding.row_parallel(fn)(x, w)
    if name in sharding.COLUMN_PARALLEL:
        return sharding.column_parallel(fn, w_dim=sharding.COLUMN_PARALLEL[name])(x, w)
    raise ValueError(
        f"{name!r} is not a layer projection (known: {[*sharding.COLUMN_PARALLEL, *sharding.ROW_PARALLEL]})"
    )


def silu(x: jax.Array) -> jax.Array:
    """As torch's: in float32, rounded once to x's dtype (`jax.nn.silu` on bf16 also rounds its sigmoid to bf16).
    On CPU this brings a random 1B Llama's bf16 logits ~6% closer to HF's bf16 and to float32
    (tests/test_gpu_parity.py)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def mlp(layer: dict[str, jax.Array], x: jax.Array, cfg: ModelConfig, num_tokens: jax.Array | None = None, *,
        matmul_impl: str = "auto") -> jax.Array:  # fmt: skip
    del num_tokens  # dense: padding rows cost no more weight reads than real ones
    gate_up = project(x, layer, "w_gate_up", impl=matmul_impl)  # [T, 2, F]
    return project(silu(gate_up[:, 0]) * gate_up[:, 1], layer, "w_down", impl=matmul_impl)


def _write_and_attend(qkv, positions, k_pages, v_pages, meta: AttentionMetadata, *, cfg: ModelConfig, impl: str):
    # The plain-jnp attention path stays all XLA, its rope and write too; otherwise they pick their own implementation
    # by backend and shape (the fused Pallas kernel on GPUs), whichever attention kernel runs.
    write_impl = "xla" if impl == "reference" else "auto"
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope)
    q, k_pages, v_pages = rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages, meta.slot_mapping,
                                        impl=write_impl)  # fmt: skip
    out = paged_attention(
        q.reshape(q.shape[0], -1, q.shape[-1]), k_pages, v_pages, meta.page_tables, meta.seq_lens, meta.cu_q_lens,
        meta.num_seqs, sm_scale=cfg.sm_scale, sliding_window=cfg.sliding_window, impl=impl,
        decode_only=meta.decode_only,
    )  # fmt: skip
    return out, k_pages, v_pages


def attention(
    layer: dict[str, jax.Array],
    x: jax.Array,
    positions: jax.Array,
    layer_kv: tuple[jax.Array, jax.Array],
    meta: AttentionMetadata,
    cfg: ModelConfig,
    attn_impl: str,
    matmul_impl: str = "auto",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    qkv = project(x, layer, "wqkv", impl=matmul_impl)  # [T, K, G + 2, H]
    attend = sharding.over_kv_heads(functools.partial(_write_and_attend, cfg=cfg, impl=attn_impl))
    out, k_pages, v_pages = attend(qkv, positions, *layer_kv, meta)  # out [T, N, H]
    return project(out, layer, "wo", impl=matmul_impl), (k_pages, v_pages)


def decoder_forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    kv_pages: KVPages,
    meta: AttentionMetadata,
    *,
    cfg: ModelConfig,
    feed_forward: FeedForward,
    attn_impl: str = "auto",
    matmul_impl: str = "auto",
    norm_impl: str = "auto",
) -> tuple[jax.Array, KVPages]:
    """tokens/positions [T] -> logits [R, V] (float32) at meta.logits_indices, and the updated pages.

    attn_impl: paged attention's (`paged_attention`); matmul_impl: the weight matmuls' (`project`); norm_impl: the
    residual adds and norms' ("auto", "xla" or "pallas", `add_rms_norm`)."""
    x = params["embed"][tokens]
    num_tokens = meta.cu_q_lens[meta.num_seqs[0]]  # rows past the last live sequence's are padding
    layers = params["layers"]
    # Each residual add is fused with the norm after it (`add_norm`): the attention and feed-forward blocks read
    # normed rows `h` and give a delta for x.
    h = rms_norm(x, layers[0]["attn_norm"], cfg.rms_norm_eps)
    new_pages: KVPages = []
    for i, (layer, layer_kv) in enumerate(zip(layers, kv_pages, strict=True)):
        delta, layer_kv = attention(layer, h, positions, layer_kv, meta, cfg, attn_impl, matmul_impl)
        x, h = add_norm(x, delta, layer["mlp_norm"], cfg, impl=norm_impl)
        delta = feed_forward(layer, h, cfg, num_tokens, matmul_impl=matmul_impl)
        if i + 1 < len(layers):
            x, h = add_norm(x, delta, layers[i + 1]["attn_norm"], cfg, impl=norm_impl)
        new_pages.append(layer_kv)
    # The last add only for the rows that give logits.
    x = rms_norm(x[meta.logits_indices] + delta[meta.logits_indices], params["final_norm"], cfg.rms_norm_eps)
    lm_head = params.get("lm_head", params["embed"])
    logits = jnp.einsum("rd,vd->rv", x, lm_head, preferred_element_type=jnp.float32)
    return logits, new_pages


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    kv_pages: KVPages,
    meta: AttentionMetadata,
    *,
    cfg: ModelConfig,
    attn_impl: str = "auto",
    matmul_impl: str = "auto",
    norm_impl: str = "auto",
) -> tuple[jax.Array, KVPages]:
    return decoder_forward(params, tokens, positions, kv_pages, meta, cfg=cfg, feed_forward=mlp, attn_impl=attn_impl,
                           matmul_impl=matmul_impl, norm_impl=norm_impl)  # fmt: skip
