"""jpaged's kernels: ragged paged attention, the KV-cache write, the MoE grouped matmul, the sampler's threshold
search; each with a jnp reference."""

from jpaged.kernels.filter_search import FilterSearchTuning, filter_thresholds, filter_thresholds_reference
from jpaged.kernels.grouped_matmul import (
    GroupedMatmulTuning,
    grouped_matmul,
    grouped_matmul_reference,
    grouped_matmul_unsupported_reason,
)
from jpaged.kernels.kv_write import write_kv, write_kv_reference
from jpaged.kernels.paged_attention import (
    AttentionTuning,
    paged_attention,
    paged_attention_reference,
    pallas_gpu_unsupported_reason,
)

__all__ = [
    "AttentionTuning",
    "FilterSearchTuning",
    "GroupedMatmulTuning",
    "filter_thresholds",
    "filter_thresholds_reference",
    "grouped_matmul",
    "grouped_matmul_reference",
    "grouped_matmul_unsupported_reason",
    "paged_attention",
    "paged_attention_reference",
    "pallas_gpu_unsupported_reason",
    "write_kv",
    "write_kv_reference",
]
