from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
import pytest
from conftest import assert_pool_clean

from jpaged import LLM, SamplingParams
from jpaged import runner as runner_module
from jpaged.kernels import platform
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
                seed=i if i % 4 else None, n=1 + (i % 5 == 0 and i % 3 > 0), max_tokens=int(rng.integers(1, 30)),
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


def _mixed_workload(seed: int) -> tuple[list, list[SamplingParams]]:
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": [1, *rng.integers(3, 500, int(rng.integers(1, 60))).tolist()]} for _ in range(12)]
    return prompts, [SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 25))) for _ in prompts]


def test_decode_only_steps_get_their_own_variant(monkeypatch):
    """Where attention has a decode kernel (the Mosaic GPU one, on Hopper), steps of one token per sequence compile
    a variant of their own: warm-up covers it, the engine picks it for exactly those steps, and outputs stay the same.
    On CPU the variant runs the same reference attention, so the greedy tokens must match the plain engine's."""
    prompts, params = _mixed_workload(2)
    plain = LLM(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=12)
    assert not plain.engine.runner.decode_steps  # no decode kernel off Hopper
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    lone = SamplingParams(temperature=0.0, max_tokens=6)
    want_lone = plain.generate([prompts[0]], lone)[0].outputs[0].token_ids

    monkeypatch.setattr(runner_module, "has_decode_kernel", lambda impl, *shapes: True)
    llm = LLM(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=12, warmup=True)
    runner = llm.engine.runner
    assert runner.decode_steps and runner.token_buckets == [16, 32, 64]
    packed: list[tuple[tuple[int, ...], bool]] = []
    rows: dict[bool, set[int]] = {True: set(), False: set()}  # token rows of the steps with one sequence or more
    pack = runner._pack

    def spy(sched, *args, **kwargs):
        out = pack(sched, *args, **kwargs)
        packed.append((tuple(sched.num_new_tokens), out[0].attn.decode_only))
        if out[0].attn.decode_only:
            rows[len(sched.num_new_tokens) == 1].add(out[0].tokens.shape[0])
        # every request is greedy: decode-only steps skip the filter stage, steps with a prefill chunk keep it
        assert out[1].sampling_filters == (not out[0].attn.decode_only)
        return out

    monkeypatch.setattr(runner, "_pack", spy)
    with count_compilations() as compiles:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        got_lone = llm.generate([prompts[0]], lone)[0].outputs[0].token_ids
    # the decode variants of bucket 16 (the only one 12 sequences reach) and of one row came from warm-up
    assert compiles == []
    assert got == want and got_lone == want_lone
    assert {decode for counts, decode in packed} == {True, False}
    assert all(decode == all(n == 1 for n in counts) for counts, decode in packed)
    assert rows == {True: {1}, False: {16}}  # a lone sequence decodes in one row, several in the padded bucket
    assert_pool_clean(llm)


def test_decode_steps_skip_the_filter_stage_only_without_filtering_rows(monkeypatch):
    """Decode-only steps compile a variant without the sampler's top-k/top-p/min-p stage, picked exactly when no
    row of the step uses one; warm-up covers both, so a workload mixing filtered and greedy requests compiles
    nothing, and seeded draws are the plain engine's."""
    rng = np.random.default_rng(5)
    prompts = [{"prompt_token_ids": [1, *rng.integers(3, 500, int(rng.integers(1, 40))).tolist()]} for _ in range(12)]
    # Greedy requests; filtering ones (top-p, top-k or min-p), which end early so that the last decode steps hold
    # none; sampled ones that do not filter, seeded: plain, top_k at or past the vocabulary (512; a huge one too),
    # top_p that is 1 in float32. The unfiltered sampled rows draw in the variant without the stage.
    filtering = [dict(top_p=0.9), dict(top_k=7), dict(min_p=0.1)]
    unfiltered = [{}, dict(top_k=512), dict(top_k=10**12), dict(top_p=0.99999999)]
    params = []
    for i in range(12):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=20))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0.8, seed=i, max_tokens=4, **filtering[(i // 3) % 3]))
        else:
            params.append(SamplingParams(temperature=0.9, seed=i, max_tokens=20, **unfiltered[(i // 3) % 4]))
    plain = LLM(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=12)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]

    monkeypatch.setattr(runner_module, "has_decode_kernel", lambda impl, *shapes: True)
    llm = LLM(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=12, warmup=True)
    runner = llm.engine.runner
    seen: set[tuple[bool, bool, bool]] = set()  # (decode-only, some row filters, filter stage compiled in)
    sampled_without_stage: list[int] = []  # steps drawing sampled (not greedy) rows without the stage
    pack = runner._pack

    def spy(sched, *args, **kwargs):
        batch, switches = pack(sched, *args, **kwargs)
        filtering = any(
            r.params.temperature > 1e-5
            and (np.float32(r.params.top_p) < 1 or 0 < r.params.top_k < 512 or r.params.min_p > 0)
            for r in sched.requests
        )
        seen.add((batch.attn.decode_only, filtering, switches.sampling_filters))
        if not switches.sampling_filters and any(r.params.temperature > 1e-5 for r in sched.requests):
            sampled_without_stage.append(len(sched.requests))
        return batch, switches

    monkeypatch.setattr(runner, "_pack", spy)
    with count_compilations() as compiles:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert compiles == [] and got == want
    # decode steps with and without filtering rows, each in its variant; steps with a prefill chunk keep the stage
    assert {(True, True, True), (True, False, False)} <= seen
    assert all(filters == (filtering or not decode) for decode, filtering, filters in seen)
    assert sampled_without_stage  # and their seeded draws were the plain engine's (got == want above)
    assert_pool_clean(llm)


def test_steps_that_compile_on_first_use_keep_the_filter_stage(monkeypatch):
    """Decode steps with logprobs (a variant warm-up does not compile) keep the filter stage whether or not a row
    filters, so such traffic compiles each bucket once, not once with the stage and once without."""
    monkeypatch.setattr(runner_module, "has_decode_kernel", lambda impl, *shapes: True)
    llm = LLM(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=12, warmup=True)
    prompts = [{"prompt_token_ids": [1, 50 + i, 60 + i]} for i in range(3)]
    llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=6, logprobs=2))
    with count_compilations() as compiles:
        out = llm.generate(prompts, SamplingParams(temperature=0.8, seed=1, max_tokens=6, logprobs=2))
    assert compiles == [] and all(len(o.outputs[0].logprobs) == 6 for o in out)
    assert_pool_clean(llm)


def test_warm_up_with_more_sequences_than_tokens_a_step(monkeypatch):
    """max_num_seqs above max_num_batched_tokens: a step still holds at most one sequence per token, so warm-up's
    decode variants stop at the largest token bucket (it asked for a bucket of max_num_seqs, and failed)."""
    monkeypatch.setattr(runner_module, "has_decode_kernel", lambda impl, *shapes: True)
    llm = LLM(max_model_len=64, max_num_batched_tokens=16, max_num_seqs=64, warmup=True)
    prompts = [{"prompt_token_ids": [1, 40 + i]} for i in range(20)]
    with count_compilations() as compiles:
        out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3))
    assert compiles == [] and all(len(o.outputs[0].token_ids) == 3 for o in out)
    assert_pool_clean(llm)


def test_warm_up_surfaces_a_failed_lowering(monkeypatch):
    """A variant that fails to lower stops the warm-up with its own error (the compiles queued behind it dropped)."""
    llm = LLM(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=12, warmup=False)
    jitted = runner_module._jitted_step
    lowered = []

    class Failing:
        def lower(self, *args, **kwargs):
            lowered.append(kwargs["layout"])
            if len(lowered) == 2:
                raise RuntimeError("lowering failed")
            return jitted.lower(*args, **kwargs)

    monkeypatch.setattr(runner_module, "_jitted_step", Failing())
    with pytest.raises(RuntimeError, match="lowering failed"):
        llm.engine.runner.warm_up(workers=1)
    assert len(lowered) == 2  # nothing lowered after the failure


def test_mixed_buckets_pad_prefill_steps_only(monkeypatch):
    """With decode variants, steps holding a prefill chunk may use coarser token buckets (`mixed_buckets`): warm-up
    compiles exactly those, decode-only steps keep the fine ones, and the greedy tokens do not change."""
    prompts, params = _mixed_workload(2)
    plain = LLM(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=12)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]

    monkeypatch.setattr(runner_module, "has_decode_kernel", lambda impl, *shapes: True)
    llm = LLM(max_model_len=96, max_num_batched_tokens=64, max_num_seqs=12, warmup=False)
    runner = llm.engine.runner
    runner.mixed_buckets = [64]
    runner.warm_up()
    shapes: list[tuple[bool, int]] = []
    pack = runner._pack

    def spy(sched, *args, **kwargs):
        out = pack(sched, *args, **kwargs)
        shapes.append((out[0].attn.decode_only, out[0].tokens.shape[0]))
        return out

    monkeypatch.setattr(runner, "_pack", spy)
    with count_compilations() as compiles:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert compiles == [] and got == want
    assert {t for decode, t in shapes if not decode} == {64}  # every step with a prefill chunk: the one mixed bucket
    assert {t for decode, t in shapes if decode} <= {1, 16}
    assert_pool_clean(llm)


@pytest.mark.gpu
def test_mosaic_decode_steps_match_the_triton_kernel(tmp_path):
    """On a Hopper GPU, a bf16 model of head_dim 128 decodes through the Mosaic GPU kernel: every greedy token is the
    Triton-kernel engine's argmax at that position, up to bf16 noise (teacher-forced through prompt logprobs)."""
    if not platform.on_hopper():
        pytest.skip("needs a Hopper GPU")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
        "vocab_size": 512, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    common = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=512, num_pages=256, max_num_seqs=16,
                  max_num_batched_tokens=256, seed=3)  # fmt: skip
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in (1, 15, 16, 17, 100, 300)]
    mosaic = LLM(str(tmp_path), attn_impl="auto", **common)
    assert mosaic.engine.runner.decode_steps
    outs = mosaic.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    )
    assert_pool_clean(mosaic)
    del mosaic
    triton = LLM(str(tmp_path), attn_impl="pallas", **common)
    for prompt, out in zip(prompts, outs, strict=True):
        tokens = list(out.outputs[0].token_ids)
        [check] = triton.generate(
            {"prompt_token_ids": prompt + tokens}, SamplingParams(max_tokens=1, prompt_logprobs=1)
        )
        for pos, token in enumerate(tokens, start=len(prompt)):
            entry = check.prompt_logprobs[pos]
            assert entry.token_id == token
            best = entry.top[0][1]
            assert entry.logprob >= best - 0.05, f"prompt {len(prompt)} tokens, position {pos}: {entry} vs best {best}"


def test_a_token_without_a_page_is_refused_before_the_step():
    """Packing checks the scheduler's promise: a scheduled token whose position has no page would write its K/V into
    the null page and attend to it, so it is an error, not a quiet slot."""
    from jpaged.request import Request
    from jpaged.scheduler import SchedulerOutput

    runner = LLM().engine.runner
    page = runner.page_size
    req = Request("r", list(range(1, page + 3)), SamplingParams(), seed=0, max_tokens=4)
    req.pages = [1]  # one page for page + 2 tokens
    with pytest.raises(RuntimeError, match="a scheduled token has no page"):
        runner._pack(SchedulerOutput(requests=(req,), num_new_tokens=(page + 2,), preempted=()))
    req.pages = [1, 2]
    batch, _ = runner._pack(SchedulerOutput(requests=(req,), num_new_tokens=(page + 2,), preempted=()))
    assert batch.attn.slot_mapping[page + 1] == 2 * page + 1  # token page + 1 sits in page 2, offset 1
