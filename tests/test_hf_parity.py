"""jpaged against HF transformers (float32, eager attention) on recorded fixtures: greedy tokens equal, prompt
logprobs and first-token logprobs within 1e-3. The fixtures come from tests/fixtures/make_hf_fixtures.py (torch is
not needed here)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import HF_FIXTURES, REPO, SHARED_MODELS, assert_pool_clean, one_prompt_metadata

from jpaged import LLM, SamplingParams

# Greedy steps whose top-1/top-2 logit gap in HF is below this are numerically ambiguous; the comparison stops there.
NEAR_TIE = 1e-4

FIXTURES = sorted(p.name for p in HF_FIXTURES.iterdir() if (p / "reference.json").is_file())
SHARED = ["stories260K", "stories260K-moe-identical", "stories260K-moe-perturbed"]


def load_reference(name: str) -> tuple[Path, dict]:
    if name in SHARED:
        ref = json.loads((HF_FIXTURES / f"ref-{name}.json").read_text())
        model = SHARED_MODELS / name
        if not model.is_dir():
            pytest.skip(f"{model} is not present (shared/ lies beside the repository)")
        return model, ref
    return REPO / "tests" / "fixtures" / "hf" / name, json.loads((HF_FIXTURES / name / "reference.json").read_text())


def trusted_prefix(tokens: list[int], margins: list[float]) -> list[int]:
    for i, margin in enumerate(margins):
        if margin < NEAR_TIE:
            return tokens[: i + 1]  # the token at a near-tie may differ, so nothing after it is compared
    return tokens


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


@pytest.mark.parametrize("name", FIXTURES + SHARED)
def test_matches_hf_transformers(name):
    model, ref = load_reference(name)
    llm = LLM(str(model), dtype="float32", max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=len(ref["greedy"][0]), ignore_eos=True, prompt_logprobs=0,
                            logprobs=20)  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": p} for p in ref["prompts"]], params)
    for out, want_tokens, margins, want_lps, last_logits in zip(
        outs, ref["greedy"], ref["greedy_margins"], ref["prompt_logprobs"], ref["last_logits"], strict=True
    ):
        got = out.outputs[0].token_ids
        want = trusted_prefix(want_tokens, margins)
        assert got[: len(want)] == want, f"{name}: greedy tokens differ for prompt {out.prompt_token_ids[:8]}"
        got_lps = [lp.logprob for lp in out.prompt_logprobs[1:]]
        np.testing.assert_allclose(got_lps, want_lps, atol=1e-3, rtol=0, err_msg=f"{name}: prompt logprobs")
        first = out.outputs[0].logprobs[0]
        want_first = log_softmax(np.asarray(last_logits, np.float64))
        top_ids = [t for t, _ in first.top]
        np.testing.assert_allclose([lp for _, lp in first.top], want_first[top_ids], atol=1e-3, rtol=0)
    assert_pool_clean(llm)


def test_stories_story_matches_hf():
    model, ref = load_reference("stories260K")
    llm = LLM(str(model), dtype="float32")
    out = llm.generate({"prompt_token_ids": ref["story_prompt"]}, SamplingParams(temperature=0, max_tokens=60))[0]
    assert out.outputs[0].token_ids == ref["story_greedy"]
    assert "Once upon a time" + out.outputs[0].text == ref["story_text"]


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("name", "impls"),
    [
        ("llama-gqa4", {"matmul_impl": "pallas"}),
        ("mixtral-e4-top2", {"matmul_impl": "pallas"}),
        ("llama-gqa2", {"matmul_impl": "pallas"}),  # gqa2: F = 172, XLA for the MLP
        ("llama-gqa4", {"norm_impl": "pallas"}),
        ("mixtral-e4-top2", {"norm_impl": "pallas"}),
    ],
)
def test_kernels_of_the_gpu_path_match_hf(name, impls):
    """The step's kernels a GPU takes (every weight matmul through the Pallas dense kernel; every residual add and
    norm through the fused one), interpreted here, give HF's prompt logprobs for the fixture's longest prompt."""
    check_forward_matches_hf(name, impls)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_fused_norm_under_tensor_parallelism_matches_hf():
    """Over two devices the fused add + norm kernel runs whole on each (XLA cannot partition a kernel) and the
    logits stay HF's."""
    check_forward_matches_hf("llama-gqa4", {"norm_impl": "pallas"}, tensor_parallel_size=2)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("name", "tp"),
    [("llama-gqa4", 1), ("mixtral-e4-top2", 1), ("mistral-window", 1), ("llama-gqa4", 2), ("llama-mqa", 2)],
)
def test_fused_rope_and_kv_write_match_hf(monkeypatch, name, tp):
    """The rope + KV write kernel a GPU takes ("auto" on a GPU; interpreted here), on one device and per device over
    two (llama-mqa: its one KV head repeated onto both), gives HF's prompt logprobs."""
    rope_write_kv = importlib.import_module("jpaged.kernels.rope_write_kv")  # the package re-exports the function

    calls = []
    kernel = rope_write_kv._rope_write_pallas
    monkeypatch.setattr(rope_write_kv, "on_gpu", lambda: True)
    monkeypatch.setattr(rope_write_kv, "_rope_write_pallas",
                        lambda *a, interpret, **k: calls.append(1) or kernel(*a, interpret=True, **k))  # fmt: skip
    rope_write_kv.rope_write_kv.clear_cache()  # an earlier test's trace of the same shapes took the unfused path
    try:
        check_forward_matches_hf(name, {}, tensor_parallel_size=tp)
    finally:
        rope_write_kv.rope_write_kv.clear_cache()  # nor may a later test reuse this one's
    assert calls  # traced once per layer


def check_forward_matches_hf(name: str, impls: dict[str, str], tensor_parallel_size: int = 1) -> None:
    import jax
    import jax.numpy as jnp

    from jpaged.models import get_forward

    model, ref = load_reference(name)
    llm = LLM(str(model), dtype="float32", max_model_len=128, skip_tokenizer_init=True,
              tensor_parallel_size=tensor_parallel_size)  # fmt: skip
    runner, page_size = llm.engine.runner, llm.engine.config.page_size
    prompt = ref["prompts"][-1]  # the longest: multi-row tiles, attention across tokens
    n = len(prompt)
    meta = one_prompt_metadata(n, page_size)
    forward = jax.jit(get_forward(llm.engine.model_config, **impls))
    with jax.set_mesh(runner.mesh), jax.default_matmul_precision("highest"):
        logits, _ = forward(runner.params, jnp.array(prompt, jnp.int32), jnp.arange(n, dtype=jnp.int32),
                            runner.kv_pages, meta)  # fmt: skip
    logits = np.asarray(logits, np.float64)
    got = [log_softmax(logits[i])[prompt[i + 1]] for i in range(n - 1)]
    assert len(got) >= 16
    np.testing.assert_allclose(got, ref["prompt_logprobs"][-1], atol=1e-3, rtol=0)
    np.testing.assert_allclose(log_softmax(logits[-1]), log_softmax(np.asarray(ref["last_logits"][-1])), atol=1e-3)
