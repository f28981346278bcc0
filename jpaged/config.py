"""The engine's settings: one frozen dataclass, checked when made. The CLI's flags are generated from its fields
(see `add_cli_arguments`), so a flag and its setting cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

BUNDLED_MODEL = Path(__file__).parent / "bundled" / "stories260K"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: str = dataclasses.field(
        default=str(BUNDLED_MODEL), metadata=_help("Hugging Face model folder (default: the bundled stories260K)")
    )
    tokenizer: str | None = dataclasses.field(default=None, metadata=_help("tokenizer folder (default: the model's)"))
    dtype: str = dataclasses.field(default="auto", metadata=_help("auto, float32, bfloat16 or float16"))
    load_format: str = dataclasses.field(
        default="auto", metadata=_help("auto (safetensors) or dummy (random weights of the config's shapes)")
    )
    max_model_len: int | None = dataclasses.field(
        default=None, metadata=_help("longest sequence, prompt plus output (default: the model's limit)")
    )
    page_size: int = dataclasses.field(default=16, metadata=_help("tokens per KV page"))
    num_pages: int | None = dataclasses.field(
        default=None, metadata=_help("KV pages in the pool (default: sized from memory)")
    )
    gpu_memory_utilization: float = dataclasses.field(
        default=0.9, metadata=_help("fraction of accelerator memory for weights plus KV pages")
    )
    kv_cache_memory_gb: float = dataclasses.field(
        default=1.0, metadata=_help("KV pool size on CPU, in GB (accelerators use gpu_memory_utilization)")
    )
    max_num_seqs: int = dataclasses.field(default=64, metadata=_help("most sequences in one step"))
    max_num_batched_tokens: int = dataclasses.field(default=512, metadata=_help("most tokens in one step"))
    enable_chunked_prefill: bool = dataclasses.field(
        default=True, metadata=_help("split long prompts across steps under the token budget")
    )
    enable_prefix_caching: bool = dataclasses.field(
        default=True, metadata=_help("reuse the KV pages of shared prompt prefixes")
    )
    tensor_parallel_size: int = dataclasses.field(default=1, metadata=_help("devices to shard the model over"))
    seed: int = dataclasses.field(default=0, metadata=_help("seed for requests that bring none"))
    attn_impl: str = dataclasses.field(
        default="auto",
        metadata=_help(
            "attention kernels: auto (GPU: Mosaic GPU decode on Hopper, Pallas Triton otherwise; CPU: reference), "
            "mgpu, pallas or reference"
        ),
    )
    matmul_impl: str = dataclasses.field(
        default="auto",
        metadata=_help(
            "weight matmuls: auto or xla (XLA's GEMMs), pallas (jpaged's Triton-lowered Pallas kernel; GPU only) or "
            "mgpu (its Mosaic GPU weight-streaming kernel; Hopper only), the kernels for steps of <= 256 rows where "
            "they can tile the weight"
        ),
    )
    norm_impl: str = dataclasses.field(
        default="auto",
        metadata=_help(
            "residual adds and RMSNorms: auto (GPU: jpaged's fused Pallas kernel where the model width is a power of "
            "two; CPU: XLA), pallas (GPU only) or xla"
        ),
    )
    async_scheduling: bool = dataclasses.field(
        default=True, metadata=_help("schedule and dispatch step N+1 before step N's tokens reach the host")
    )
    warmup: bool = dataclasses.field(
        default=False, metadata=_help("compile every step bucket at start-up (the server always does)")
    )
    skip_tokenizer_init: bool = dataclasses.field(
        default=False, metadata=_help("load no tokenizer: prompts must be token ids and outputs carry no text")
    )
    chat_template: str | None = dataclasses.field(
        default=None, metadata=_help("Jinja chat template file (or text) for models without one")
    )

    def __post_init__(self) -> None:
        positive = ("page_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2, got {self.num_pages}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.attn_impl not in ("auto", "mgpu", "pallas", "reference"):
            raise ValueError(f"attn_impl must be auto, mgpu, pallas or reference, got {self.attn_impl!r}")
        if self.matmul_impl not in ("auto", "mgpu", "pallas", "xla"):
            raise ValueError(f"matmul_impl must be auto, mgpu, pallas or xla, got {self.matmul_impl!r}")
        if self.norm_impl not in ("auto", "pallas", "xla"):
            raise ValueError(f"norm_impl must be auto, pallas or xla, got {self.norm_impl!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"model folder {self.model!r} does not exist")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """Adds one `--field-name` flag per field of the dataclass `cls`, typed from its annotation."""
    for field in dataclasses.fields(cls):
        if field.name in exclude or field.name.startswith("_"):
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = str(field.type)
        default = field.default if field.default is not dataclasses.MISSING else None
        extra: dict[str, Any] = dict(field.metadata)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **extra)
        elif kind.startswith(("list", "str | list")):
            item: Any = int if "int" in kind else str
            parser.add_argument(flag, type=item, nargs="+", default=default, **extra)
        elif kind.startswith("dict"):
            continue  # not expressible as a flag (logit_bias): Python and HTTP only
        else:
            conv: Any = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=conv, default=default, **extra)


def add_cli_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Adds `--max-model-len`-style flags, one per `EngineConfig` field."""
    add_dataclass_arguments(parser, EngineConfig, exclude)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**(values | overrides))
