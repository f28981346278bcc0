"""Shared test setup: four fake CPU devices (for tensor-parallel tests), model paths, and the engine factory."""

from __future__ import annotations

import os

# Must happen before JAX initialises its backends: every test process sees four CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import atexit
import shutil
import tempfile
from pathlib import Path

import jax
import pytest


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """pyproject's `-n auto`: two workers without an NVIDIA GPU (the CI box's two cores: the suite in ~11 minutes
    instead of ~18), none with one, where each worker's JAX would claim 75% of the GPU's memory at start.
    PYTEST_XDIST_AUTO_NUM_WORKERS, as xdist documents it, overrides both."""
    if (chosen := os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")) is not None:
        return int(chosen)
    if shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists():
        return 0
    return min(2, os.cpu_count() or 1)


def _session_compilation_cache() -> None:
    """JAX's persistent compilation cache, in a folder of this test session's own (removed at exit).

    `_release_compiled_programs` below drops every compiled program after each module, so each module that runs the
    bundled model (the server modules, the LLM and CLI modules, ...) compiled the same step buckets again: ~2.5 s
    of XLA:CPU each. With this cache a module that needs a program an earlier one compiled reads it back from disk
    (~0.1 s). The cache key is the lowered program plus the compile options and XLA flags, so a changed or
    monkeypatched model never hits; a fresh folder per session keeps runs independent of each other; and a cache hit
    still goes through JAX's backend-compile event, so the tests that count compilations see it. Also exported to
    the environment, so the subprocesses the tests start (the server CLI, benchmark children) share it."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # else the caller chose a cache
        folder = tempfile.mkdtemp(prefix="jpaged-test-jax-cache-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")  # the step, not the small helpers
    # Set here too: the environment is read when JAX is first imported, which a plugin may have done already.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
    )


_session_compilation_cache()

REPO = Path(__file__).resolve().parent.parent
SHARED_MODELS = REPO.parent / "shared" / "models"
STORIES = REPO / "jpaged" / "bundled" / "stories260K"
HF_FIXTURES = REPO / "tests" / "fixtures" / "hf"
# stories260K's greedy continuation of "Once upon a time" (60 tokens), as llama2.c publishes it.
KNOWN_GREEDY = (
    ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. "
    "She wanted to play with it, but it was too high.\nLily"
)


def has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module.

    Every XLA:CPU executable keeps a few memory mappings, and the suite compiles thousands of programs (Pallas
    interpret mode compiles one per kernel shape), so one process heads for the kernel's per-process limit
    (vm.max_map_count, 65,530 here: ~3 mappings per small program, measured): the full suite aborted inside an XLA
    compile at the same test three times, while that test and the modules before it passed when run without the
    rest. jax.clear_caches() unmaps them (1,058 -> 471 mappings after 200 programs)."""
    yield
    jax.clear_caches()


def assert_pool_clean(llm) -> None:
    """After a run every page is free (cached pages have ref count 0) and nothing is queued."""
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.pool.all_free(), engine.pool.stats()
    assert not engine._groups and not engine._detokenizers


def write_engine_probe(path: Path, *, before: str, after: str) -> Path:
    """A script for the benchmarks' with_*.py wrapper tests: `python path MODEL OUT` runs a small warmed-up greedy
    generate and writes its tokens to OUT as JSON, with `before` and `after` (Python expressions over the imported
    `runner` module) evaluated before and after the generate. Run as is, then under a wrapper, to compare."""
    path.write_text(
        "import json, sys\n"
        "from jpaged import LLM, SamplingParams, runner\n"
        "llm = LLM(model=sys.argv[1], max_num_seqs=4, max_num_batched_tokens=16,\n"
        "          max_model_len=128, skip_tokenizer_init=True, warmup=True)\n"
        f"before = {before}\n"
        "prompts = [{'prompt_token_ids': [5 + i] * (3 + 7 * i)} for i in range(3)]\n"
        "outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))\n"
        f"after = {after}\n"
        "json.dump({'tokens': [o.outputs[0].token_ids for o in outs], 'before': before, 'after': after},\n"
        "          open(sys.argv[2], 'w'))\n"
    )
    return path


def one_prompt_metadata(n: int, page_size: int):
    """Metadata for a forward over one n-token prompt written into pages 1, 2, ... in order (page 0 is the null page):
    the tests that call a model's forward directly, outside the engine."""
    import jax.numpy as jnp

    from jpaged.models.metadata import AttentionMetadata

    return AttentionMetadata(
        slot_mapping=jnp.arange(n, dtype=jnp.int32) + page_size,
        page_tables=jnp.arange(1, -(-n // page_size) + 1, dtype=jnp.int32)[None, :],
        seq_lens=jnp.array([n], jnp.int32),
        cu_q_lens=jnp.array([0, n], jnp.int32),
        num_seqs=jnp.array([1], jnp.int32),
        logits_indices=jnp.arange(n, dtype=jnp.int32),
    )


def lower_for_h200(fn, *args) -> str:
    """The text of `jax.jit(fn)` lowered for CUDA on an abstract H200, from any machine: a Triton-lowered Pallas kernel
    asks which GPU it compiles for, and the abstract device answers (the compile to PTX still needs the GPU). args:
    arrays or jax.ShapeDtypeStructs."""
    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h200)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
