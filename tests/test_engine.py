"""The engine's sizing of accelerator memory (jpaged/engine.py): what JAX's allocator may take, the KV pool in it."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
from conftest import HF_FIXTURES

from jpaged import engine as engine_module
from jpaged.config import EngineConfig
from jpaged.engine import MEM_FRACTION_VAR, LLMEngine, claim_gpu_memory


@pytest.fixture
def fresh_jax(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if JAX had not started its backends, with no fraction chosen (the environment restored afterwards: set first
    so that monkeypatch records it, as it does not record a variable it deletes that was never there)."""
    from jax._src import xla_bridge

    monkeypatch.setenv(MEM_FRACTION_VAR, "unset")
    monkeypatch.delenv(MEM_FRACTION_VAR)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)


@pytest.mark.usefixtures("fresh_jax")
def test_claims_the_utilization_before_jax_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    claim_gpu_memory(0.85)
    assert os.environ[MEM_FRACTION_VAR] == "0.85"


@pytest.mark.usefixtures("fresh_jax")
def test_claims_at_most_what_leaves_the_cuda_context_room() -> None:
    import os

    claim_gpu_memory(1.0)
    assert os.environ[MEM_FRACTION_VAR] == "0.95"


@pytest.mark.usefixtures("fresh_jax")
def test_claims_no_less_than_jaxs_default() -> None:
    """The pool is `gpu_memory_utilization` of the allocator's limit: claiming 0.5 would halve it twice."""
    import os

    claim_gpu_memory(0.5)
    assert os.environ[MEM_FRACTION_VAR] == "0.75"


@pytest.mark.usefixtures("fresh_jax")
def test_a_users_fraction_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv(MEM_FRACTION_VAR, "0.5")
    claim_gpu_memory(0.9)
    assert os.environ[MEM_FRACTION_VAR] == "0.5"


def test_too_late_on_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import os

    import jax
    from jax._src import xla_bridge

    monkeypatch.setenv(MEM_FRACTION_VAR, "unset")
    monkeypatch.delenv(MEM_FRACTION_VAR)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.WARNING, logger="jpaged.engine"):
        claim_gpu_memory(0.9)
    assert MEM_FRACTION_VAR not in os.environ
    assert "JAX started before the engine" in caplog.text and f"{MEM_FRACTION_VAR}=0.9" in caplog.text


def test_too_late_on_a_gpu_is_silent_when_asking_no_more_than_the_default(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import jax
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.WARNING, logger="jpaged.engine"):
        claim_gpu_memory(0.6)
    assert caplog.text == ""


def test_too_late_off_gpu_is_silent(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="jpaged.engine"):
        claim_gpu_memory(0.9)
    assert caplog.text == ""


def _sizing_engine(stats: list[dict[str, int]], **config: object) -> LLMEngine:
    """An engine object with only what the sizing reads: a Llama-2-7B-like shape, devices reporting `stats`."""
    engine = object.__new__(LLMEngine)
    engine.config = EngineConfig(model=str(HF_FIXTURES / "llama-gqa4"), max_num_batched_tokens=8192, **config)
    engine.model_config = types.SimpleNamespace(num_layers=32, num_kv_heads=32, head_dim=128, vocab_size=32000)
    engine.max_model_len = 2048
    devices = [types.SimpleNamespace(memory_stats=lambda s=s: s) for s in stats]
    engine.mesh = types.SimpleNamespace(devices=np.array(devices, dtype=object))
    return engine


def test_gpu_pages_fill_the_utilization_of_the_allocator_after_weights_and_temporaries() -> None:
    gb = 10**9
    engine = _sizing_engine([{"bytes_limit": 129 * gb, "bytes_in_use": 13 * gb}], gpu_memory_utilization=0.9)
    page_bytes = 2 * 32 * 32 * 16 * 128 * 2  # K and V, every layer, one 16-token page, bf16
    reserve = 2 * 8192 * 32000 * 4 + (1 << 30)  # the largest bucket's float32 logits, twice, and 1 GiB
    assert engine._num_pages_from_memory(np.dtype("bfloat16")) == int(
        (0.9 * 129 * gb - 13 * gb - reserve) // page_bytes
    )


def test_gpu_pool_takes_the_tightest_device_times_the_devices() -> None:
    gb = 10**9
    engine = _sizing_engine([{"bytes_limit": 100 * gb, "bytes_in_use": 10 * gb},
                             {"bytes_limit": 100 * gb, "bytes_in_use": 30 * gb}])  # fmt: skip
    one = _sizing_engine([{"bytes_limit": 100 * gb, "bytes_in_use": 30 * gb}])
    pages = engine._num_pages_from_memory(np.dtype("bfloat16"))
    assert abs(pages - 2 * one._num_pages_from_memory(np.dtype("bfloat16"))) <= 1


def test_gpu_without_room_for_two_pages_is_a_clear_error() -> None:
    engine = _sizing_engine([{"bytes_limit": 4 * 10**9, "bytes_in_use": 3 * 10**9}])
    with pytest.raises(
        ValueError, match=r"no memory left for KV pages: 3\.0 GB in use of an allocator limit of 4\.0 GB"
    ):
        engine._num_pages_from_memory(np.dtype("bfloat16"))


def test_engine_claims_before_it_touches_jax(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim is the engine's first act: even a config it then rejects has made it."""
    claimed = []
    monkeypatch.setattr(engine_module, "claim_gpu_memory", claimed.append)
    with pytest.raises(ValueError, match="larger than the model's max_position_embeddings"):
        LLMEngine(EngineConfig(model=str(HF_FIXTURES / "llama-gqa4"), max_model_len=10**6, gpu_memory_utilization=0.7))
    assert claimed == [0.7]
