"""What one jitted step knows about the ragged batch besides the tokens themselves.

All fields are arrays so that a new mix of requests never recompiles the step; their shapes are the padding buckets
(T tokens, B sequences, R logit rows), which the runner picks from a small fixed set.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: (
        jax.Array
    )  # [T] int32 page_id * page_size + offset where each token's K/V is written; padding -> page 0
    page_tables: jax.Array  # [B, max_pages] int32 pages of each sequence in order; unused entries -> page 0
    seq_lens: jax.Array  # [B] int32 KV length of each sequence after this step's tokens are written
    cu_q_lens: jax.Array  # [B + 1] int32 sequence b's tokens are rows cu_q_lens[b]:cu_q_lens[b+1] of the batch
    num_seqs: jax.Array  # [1] int32 live sequences; rows b >= num_seqs[0] are padding
    logits_indices: jax.Array  # [R] int32 token rows whose logits the step returns (each sequence's last, or all)
    # Static (part of the compiled program's key, not an array): every live sequence has one token, in row b. Set
    # only where attention has a decode kernel of its own (kernels.paged_attention.has_decode_kernel).
    decode_only: bool = dataclasses.field(default=False, metadata={"static": True})
