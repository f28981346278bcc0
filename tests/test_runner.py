from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
from conftest import assert_pool_clean

from jpaged import LLM, SamplingParams
from jpaged.runner import bucket, buckets


def test_buckets_are_powers_of_two_then_the_cap():
    assert buckets(16, 512) == [16, 32, 64, 128, 256, 512]
    assert buckets(16, 100) == [16, 32, 64, 100]
    assert bucket(17, buckets(16, 100)) == 32 and bucket(100, buckets(16, 100)) == 100
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        bucket(101, buckets(16, 100))


@contextlib.contextmanager
def count_compilations():
    """Counts XLA compilations (of anything) while the block runs."""
    events: list[str] = []

    def listener(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_no_recompilation_after_warm_up():
    # A token budget no other test uses, so warm-up really has to compile these buckets.
    with count_compilations() as warm_up:
        llm = LLM(max_model_len=160, max_num_batched_tokens=96, max_num_seqs=24, warmup=True)
    assert len(warm_up) >= len(llm.engine.runner.token_buckets) == 4  # the counter sees compilations
    rng = np.random.default_rng(1)
    prompts, params = [], []
    for i in range(40):
        prompts.append({"prompt_token_ids": [1, *rng.integers(3, 512, int(rng.integers(1, 120))).tolist()]})
        params.append(
            SamplingParams(
                temperature=[0.0, 0.7, 1.2][i % 3], top_p=[1.0, 0.9][i % 2], top_k=[0, 5][i % 2], min_p=0.05 * (i % 2),
                seed=i if i % 4 else None, n=1 + (i % 5 == 0), max_tokens=int(rng.integers(1, 30)),
                min_tokens=i % 3, stop=["the"] if i % 7 == 0 else None, logit_bias={5: 2.0} if i % 6 == 0 else None,
            )
        )  # fmt: skip
    with count_compilations() as compiles:
        llm.generate(prompts, params)
    assert compiles == []
    assert_pool_clean(llm)


def test_kv_pages_are_donated_and_updated_in_place():
    llm = LLM(max_model_len=64)
    before = llm.engine.runner.kv_pages[0][0]
    llm.generate([1, 403, 407], SamplingParams(max_tokens=3))
    after = llm.engine.runner.kv_pages[0][0]
    assert before.is_deleted()  # donated to the step, which wrote into the same memory
    assert float(np.abs(np.asarray(after)).sum()) > 0
