"""Mixtral: Llama's attention, norms and RoPE with a sparse mixture-of-experts feed-forward.

Dimensions: T tokens, D model, F ffn, E experts, A = T * top-k token-expert assignments.

Expert weights are stacked per layer (`expert_gate_up` [E, D, 2F]: each expert's gate then up columns,
`expert_down` [E, F, D], `router` [D, E]) so a later change can shard them across devices on E.

The expert matmuls are `jpaged.kernels.grouped_matmul` (ragged_dot's contract). Its "auto" choice is the Pallas kernel
on a GPU, which reads only the weights of experts that received tokens (2 of 8 at batch 1, top-2), and
`jax.lax.ragged_dot` elsewhere or for shapes the kernel cannot tile (a ffn size that is no multiple of 16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpaged.kernels import grouped_matmul
from jpaged.models import llama
from jpaged.models.config import ModelConfig


def route(router_logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """As HF's Mixtral: softmax over all experts in float32, keep the top k, renormalise them to sum to one."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, k]
    return weights / jnp.sum(weights, axis=-1, keepdims=True), experts


def moe(
    layer: dict[str, jax.Array], x: jax.Array, cfg: ModelConfig, num_tokens: jax.Array | None = None, *,
    impl: str = "auto", matmul_impl: str = "auto",
) -> jax.Array:  # fmt: skip
    """Grouped expert compute: assignments sorted by expert, one grouped matmul per projection, no token dropped.

    num_tokens: [] int32; rows of x past it are the step's padding (a batch-1 decode step is padded to 16 rows).
    They are routed to no expert, so they cost no weight reads: routed, they would pull in experts no real token
    chose. None: every row is real. Padding rows come back as zeros.
    impl: `grouped_matmul`'s ("auto", "xla", "reference" or "pallas"); the model's forward uses "auto".
    matmul_impl: accepted for the FeedForward signature; the experts take `impl`, and the router's matmul (E
    columns) stays with XLA.
    """
    del matmul_impl
    k, num_experts = cfg.num_experts_per_tok, cfg.num_experts
    weights, experts = route(jnp.einsum("td,de->te", x, layer["router"]), k)
    if num_tokens is not None:
        # Expert id E: sorted after every real group and dropped by bincount, so these rows are the grouped
        # matmul's padding (past sum(group_sizes)) and come back as zeros.
        experts = jnp.where(jnp.arange(x.shape[0])[:, None] < num_tokens, experts, num_experts)
    if x.shape[0] == 1:
        return _moe_one_token(layer, x, weights[0], experts[0], num_experts, impl)
    flat_experts = experts.reshape(-1)  # [A]
    order = jnp.argsort(flat_experts, stable=True)  # [A] assignments grouped by expert
    token_of = order // k  # [A] which token each sorted assignment came from
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)  # [E]
    out = _experts(layer, x[token_of], group_sizes, impl)  # [A, D]
    # Weighted and summed in float32, rounded once: the one-token path below adds its rows in another order.
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros(x.shape, jnp.float32).at[token_of].add(out).astype(x.dtype)


def _experts(layer: dict[str, jax.Array], xs: jax.Array, group_sizes: jax.Array, impl: str) -> jax.Array:
    """Each row of xs [A, D] through its expert's SwiGLU; rows sorted by expert, group_sizes [E] rows each."""
    gate, up = jnp.split(grouped_matmul(xs, layer["expert_gate_up"], group_sizes, impl=impl), 2, axis=1)  # [A, F] x2
    return grouped_matmul(llama.silu(gate) * up, layer["expert_down"], group_sizes, impl=impl)  # [A, D]


def _moe_one_token(
    layer: dict[str, jax.Array], x: jax.Array, weights: jax.Array, experts: jax.Array, num_experts: int, impl: str
) -> jax.Array:
    """moe for a step of one token (a lone sequence's decode step has a bucket of its own on GPUs with a decode
    kernel). Its k assignments all hold the same x, so they need no gather, and the combine is a weighted sum over
    k rows, not a scatter; the rows are put in expert order by ranks from k x k comparisons instead of a sort. At
    batch 1 the sort, bincount, gather and scatter-add were each a kernel of 1-4 us per layer on the H200.

    x: [1, D]; weights, experts: [k] (expert id num_experts: a padding row, routed nowhere).
    """
    k = experts.shape[0]
    a = jnp.arange(k)
    other, this = experts[None, :], experts[:, None]  # [1, k], [k, 1]
    before = (other < this) | ((other == this) & (a[None, :] < a[:, None]))  # [k, k] assignment b sorts before a
    rank = jnp.sum(before, axis=1)  # [k] row of each assignment once sorted by expert (stable)
    group_sizes = jnp.sum(experts[:, None] == jnp.arange(num_experts)[None, :], axis=0).astype(jnp.int32)  # [E]
    row_weights = jnp.sum(jnp.where(rank[:, None] == a[None, :], weights[:, None], 0.0), axis=0)  # [k] by row
    out = _experts(layer, jnp.broadcast_to(x, (k, x.shape[1])), group_sizes, impl)  # [k, D]
    return jnp.sum(out.astype(jnp.float32) * row_weights[:, None], axis=0, keepdims=True).astype(x.dtype)


def moe_dense_reference(layer: dict[str, jax.Array], x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Every expert on every token, weighted by the (sparse) routing: the plain definition, for tests."""
    weights, experts = route(jnp.einsum("td,de->te", x, layer["router"]), cfg.num_experts_per_tok)
    dense_w = jnp.zeros((x.shape[0], cfg.num_experts), jnp.float32)
    dense_w = dense_w.at[jnp.arange(x.shape[0])[:, None], experts].set(weights)  # [T, E]
    gate, up = jnp.split(jnp.einsum("td,edf->tef", x, layer["expert_gate_up"]), 2, axis=2)
    out = jnp.einsum("tef,efd->ted", llama.silu(gate) * up, layer["expert_down"])
    return jnp.einsum("ted,te->td", out, dense_w.astype(out.dtype))


def forward(params, tokens, positions, kv_pages, meta, *, cfg: ModelConfig, attn_impl: str = "auto",
            matmul_impl: str = "auto", norm_impl: str = "auto"):  # fmt: skip
    return llama.decoder_forward(params, tokens, positions, kv_pages, meta, cfg=cfg, feed_forward=moe,
                                 attn_impl=attn_impl, matmul_impl=matmul_impl, norm_impl=norm_impl)  # fmt: skip
