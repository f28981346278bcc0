"""Outputs do not depend on what else is in the batch, on how prompts are chunked or paged, on prefix caching, on
preemption, or on tensor parallelism: the same 64 mixed requests give the same tokens alone and together."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_pool_clean

from jpaged import LLM, SamplingParams

MAX_MODEL_LEN = 128


def workload(n: int = 64) -> list[tuple[dict, SamplingParams]]:
    rng = np.random.default_rng(0)
    shared = [1, *rng.integers(3, 512, 40).tolist()]
    requests = []
    for i in range(n):
        length = int(rng.integers(1, 80))
        tail = rng.integers(3, 512, length).tolist()
        prompt = (shared[: int(rng.integers(17, 41))] + tail)[:80] if i % 3 == 0 else [1, *tail][:80]
        max_tokens = int(rng.integers(1, 24))
        if i % 2:
            params = SamplingParams(temperature=0.9, top_p=0.9, seed=1000 + i, max_tokens=max_tokens, ignore_eos=True)
        else:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        requests.append(({"prompt_token_ids": prompt}, params))
    return requests


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone() -> list[list[int]]:
    llm = LLM(max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False)
    results = [token_ids(llm.generate(prompt, params))[0] for prompt, params in workload()]
    assert_pool_clean(llm)
    return results


CONFIGS = {
    "default": {},
    "no-chunked-prefill": {"enable_chunked_prefill": False, "max_num_batched_tokens": 256},
    "page-8": {"page_size": 8},
    "page-32": {"page_size": 32},
    "no-prefix-cache-small-budget": {"enable_prefix_caching": False, "max_num_batched_tokens": 48},
    "preemption": {"num_pages": 20, "page_size": 8},
    "async": {"async_scheduling": True},
    "async-preemption-small-budget": {
        "async_scheduling": True,
        "num_pages": 20,
        "page_size": 8,
        "max_num_batched_tokens": 48,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_together_equals_alone(name, alone):
    llm = LLM(max_model_len=MAX_MODEL_LEN, **CONFIGS[name])
    prompts, params = zip(*workload(), strict=True)
    together = token_ids(llm.generate(list(prompts), list(params)))
    assert together == alone
    assert [len(t) for t in together] == [p.max_tokens for p in params]
    assert_pool_clean(llm)
    if "preemption" in name:
        assert llm.engine.scheduler.num_preemptions > 0
    if name == "default":
        assert llm.engine.pool.stats().prefix_cache_hits > 0


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_single_device(tp, alone):
    llm = LLM(max_model_len=MAX_MODEL_LEN, tensor_parallel_size=tp)
    prompts, params = zip(*workload()[:24], strict=True)
    assert token_ids(llm.generate(list(prompts), list(params))) == alone[:24]
    assert_pool_clean(llm)
