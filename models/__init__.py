"""Model architectures, chosen by `config.json`'s `architectures` through one registry."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jpaged.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError


def get_forward(
    cfg: ModelConfig, *, attn_impl: str = "auto", matmul_impl: str = "auto", norm_impl: str = "auto"
) -> Callable[..., Any]:
    """`forward(params, tokens, positions, kv_pages, meta) -> (logits, kv_pages)` for the config's architecture."""
    from jpaged.models import llama, mixtral

    registry = {
        "LlamaForCausalLM": llama.forward,
        "MistralForCausalLM": llama.forward,
        "MixtralForCausalLM": mixtral.forward,
    }
    if cfg.architecture not in registry:
        raise UnsupportedModelError(f"architecture {cfg.architecture!r} is not supported")
    return functools.partial(
        registry[cfg.architecture], cfg=cfg, attn_impl=attn_impl, matmul_impl=matmul_impl, norm_impl=norm_impl
    )


__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "UnsupportedModelError", "get_forward"]
