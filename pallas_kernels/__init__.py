"""jpaged's attention kernels: ragged paged attention and the KV-cache write, each with a jnp reference."""

from jpaged.kernels.kv_write import write_kv, write_kv_reference
from jpaged.kernels.paged_attention import (
    AttentionTuning,
    paged_attention,
    paged_attention_reference,
    pallas_gpu_unsupported_reason,
)

__all__ = [
    "AttentionTuning",
    "paged_attention",
    "paged_attention_reference",
    "pallas_gpu_unsupported_reason",
    "write_kv",
    "write_kv_reference",
]
