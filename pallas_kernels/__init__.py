"""jpaged's kernels: ragged paged attention, the KV-cache write (alone, and fused with RoPE), the residual add fused
with RMSNorm, the MoE grouped matmul, the sampler's threshold search; each with a jnp reference."""

from jpaged.kernels.add_rms_norm import AddRmsNormTuning, add_rms_norm, add_rms_norm_reference
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
from jpaged.kernels.rope_write_kv import RopeWriteTuning, rope_write_kv, rope_write_kv_reference

__all__ = [
    "AddRmsNormTuning",
    "AttentionTuning",
    "FilterSearchTuning",
    "GroupedMatmulTuning",
    "RopeWriteTuning",
    "add_rms_norm",
    "add_rms_norm_reference",
    "filter_thresholds",
    "filter_thresholds_reference",
    "grouped_matmul",
    "grouped_matmul_reference",
    "grouped_matmul_unsupported_reason",
    "paged_attention",
    "paged_attention_reference",
    "pallas_gpu_unsupported_reason",
    "rope_write_kv",
    "rope_write_kv_reference",
    "write_kv",
    "write_kv_reference",
]
