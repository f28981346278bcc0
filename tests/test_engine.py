"""The engine's sizing of accelerator memory (jpaged/engine.py): what JAX's allocator may take, the KV pool in it."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
from conftest import HF_FIXTURES

from jpaged import engine as engine_module
from jpaged.config import EngineConfig
from jpaged.engine import CLAIMED_KV_SHARE, MEM_FRACTION_VAR, LLMEngine, claim_gpu_memory


def _no_fraction_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable unset for the test and restored after (set first so that monkeypatch records it: it does not
    record deleting a variable that was never there)."""
    monkeypatch.setenv(MEM_FRACTION_VAR, "unset")
    monkeypatch.delenv(MEM_FRACTION_VAR)


@pytest.fixture
def fresh_jax(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if JAX had not started its backends, with no fraction chosen."""
    from jax._src import xla_bridge

    _no_fraction_chosen(monkeypatch)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)


@pytest.fixture
def started_jax(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if JAX had started its backends first, with no fraction chosen."""
    from jax._src import xla_bridge

    _no_fraction_chosen(monkeypatch)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)


@pytest.mark.usefixtures("fresh_jax")
@pytest.mark.parametrize(("utilization", "claimed"), [(0.9, "0.9"), (0.45, "0.45"), (1.0, "0.95")])
def test_claims_the_utilization_before_jax_starts(utilization: float, claimed: str) -> None:
    """What the engine asks for, so that two engines at 0.45 share a GPU; at most 0.95, which leaves the CUDA
    context and libraries room outside JAX's pool."""
    import os

    assert claim_gpu_memory(utilization)
    assert os.environ[MEM_FRACTION_VAR] == claimed


@pytest.mark.usefixtures("fresh_jax")
def test_a_users_fraction_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv(MEM_FRACTION_VAR, "0.5")
    assert not claim_gpu_memory(0.9)
    assert os.environ[MEM_FRACTION_VAR] == "0.5"


@pytest.mark.usefixtures("started_jax")
def test_too_late_on_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import os

    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.WARNING, logger="jpaged.engine"):
        assert not claim_gpu_memory(1.0)
    assert MEM_FRACTION_VAR not in os.environ
    assert "JAX started before the engine" in caplog.text and f"{MEM_FRACTION_VAR}=0.95" in caplog.text


@pytest.mark.usefixtures("started_jax")
@pytest.mark.parametrize(("backend", "utilization"), [("gpu", 0.6), ("cpu", 0.9)])
def test_too_late_is_silent_off_gpu_or_within_jaxs_default(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, backend: str, utilization: float
) -> None:
    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    with caplog.at_level(logging.WARNING, logger="jpaged.engine"):
        assert not claim_gpu_memory(utilization)
    assert caplog.text == ""


def _sizing_engine(
    stats: list[dict[str, int]], claimed: bool = False, platform: str = "gpu", **config: object
) -> LLMEngine:
    """An engine object with only what the sizing reads: a Llama-2-7B-like shape, devices reporting `stats`."""
    engine = object.__new__(LLMEngine)
    engine.claimed_gpu_memory = claimed
    engine.config = EngineConfig(model=str(HF_FIXTURES / "llama-gqa4"), max_num_batched_tokens=8192, **config)
    engine.model_config = types.SimpleNamespace(num_layers=32, num_kv_heads=32, head_dim=128, vocab_size=32000)
    engine.max_model_len = 2048
    devices = [types.SimpleNamespace(memory_stats=lambda s=s: s, platform=platform) for s in stats]
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


def test_gpu_pages_of_a_claimed_allocator_leave_it_a_tenth() -> None:
    """Where the engine set the allocator's fraction itself, the utilization is already in its limit: the pool takes
    CLAIMED_KV_SHARE of it whatever the utilization (0.5 here), not the utilization again."""
    gb = 10**9
    stats = [{"bytes_limit": 70 * gb, "bytes_in_use": 13 * gb}]
    claimed = _sizing_engine(stats, claimed=True, gpu_memory_utilization=0.5)
    page_bytes = 2 * 32 * 32 * 16 * 128 * 2
    reserve = 2 * 8192 * 32000 * 4 + (1 << 30)
    want = int((CLAIMED_KV_SHARE * 70 * gb - 13 * gb - reserve) // page_bytes)
    assert claimed._num_pages_from_memory(np.dtype("bfloat16")) == want
    not_claimed = _sizing_engine(stats, gpu_memory_utilization=0.5)
    assert not_claimed._num_pages_from_memory(np.dtype("bfloat16")) == int(
        (0.5 * 70 * gb - 13 * gb - reserve) // page_bytes
    )


def test_gpu_pool_takes_the_tightest_device_times_the_devices() -> None:
    gb = 10**9
    engine = _sizing_engine([{"bytes_limit": 100 * gb, "bytes_in_use": 10 * gb},
                             {"bytes_limit": 100 * gb, "bytes_in_use": 30 * gb}])  # fmt: skip
    one = _sizing_engine([{"bytes_limit": 100 * gb, "bytes_in_use": 30 * gb}])
    pages = engine._num_pages_from_memory(np.dtype("bfloat16"))
    assert abs(pages - 2 * one._num_pages_from_memory(np.dtype("bfloat16"))) <= 1


def test_gpu_allocator_without_a_limit_is_a_clear_error_not_the_cpu_default() -> None:
    """XLA's VMM allocator (which --xla_gpu_command_buffer_update_mode switches to) reports no bytes_limit: an H200
    run sized its pool as on CPU, 1 GB (119 pages of Llama-2-7B), and failed later on a long sequence."""
    engine = _sizing_engine([{"bytes_in_use": 13 * 10**9}])
    with pytest.raises(
        ValueError, match=r"the gpu allocator reports no memory limit .*\['bytes_in_use'\]\); pass num_pages"
    ):
        engine._num_pages_from_memory(np.dtype("bfloat16"))
    cpu = _sizing_engine([{}], platform="cpu", kv_cache_memory_gb=0.5)
    assert cpu._num_pages_from_memory(np.dtype("bfloat16")) == int(0.5e9 // (2 * 32 * 32 * 16 * 128 * 2))


def test_gpu_without_room_for_two_pages_is_a_clear_error() -> None:
    engine = _sizing_engine([{"bytes_limit": 4 * 10**9, "bytes_in_use": 3 * 10**9}])
    with pytest.raises(
        ValueError, match=r"no memory left for KV pages: 3\.0 GB in use of an allocator limit of 4\.0 GB"
    ):
        engine._num_pages_from_memory(np.dtype("bfloat16"))


def test_engine_claims_before_it_touches_jax(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim is the engine's first act: even a config it then rejects has made it."""
    claimed = []
    monkeypatch.setattr(engine_module, "claim_gpu_memory", lambda fraction: claimed.append(fraction) or False)
    with pytest.raises(ValueError, match="larger than the model's max_position_embeddings"):
        LLMEngine(EngineConfig(model=str(HF_FIXTURES / "llama-gqa4"), max_model_len=10**6, gpu_memory_utilization=0.7))
    assert claimed == [0.7]
