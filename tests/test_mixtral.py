"""Mixtral's sparse feed-forward: the grouped path (ragged_dot or the Pallas grouped matmul) equals the dense
definition for any routing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_MODELS, STORIES, assert_pool_clean

from jpaged import LLM, SamplingParams
from jpaged.models.config import ModelConfig, RopeConfig
from jpaged.models.mixtral import moe, moe_dense_reference, route


def tiny_config(num_experts: int, top_k: int) -> ModelConfig:
    return ModelConfig(
        architecture="MixtralForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5, rope=RopeConfig(), max_position_embeddings=64,
        tie_word_embeddings=True, num_experts=num_experts, num_experts_per_tok=top_k,
    )  # fmt: skip


def random_layer(cfg: ModelConfig, key: jax.Array) -> dict[str, jax.Array]:
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    k = jax.random.split(key, 3)
    return {
        "router": jax.random.normal(k[0], (d, e)),
        "expert_gate_up": jax.random.normal(k[1], (e, d, 2 * f)) * 0.3,
        "expert_down": jax.random.normal(k[2], (e, f, d)) * 0.3,
    }


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (8, 2), (8, 8)])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_grouped_equals_dense(num_experts, top_k, num_tokens):
    cfg = tiny_config(num_experts, top_k)
    layer = random_layer(cfg, jax.random.key(num_experts * 100 + top_k))
    x = jax.random.normal(jax.random.key(num_tokens), (num_tokens, cfg.hidden_size))
    np.testing.assert_allclose(moe(layer, x, cfg), moe_dense_reference(layer, x, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_pallas_grouped_matmul_equals_ragged_dot(num_tokens):
    """The expert matmuls through the Pallas kernel (interpreted here) give ragged_dot's result."""
    cfg = dataclasses.replace(tiny_config(8, 2), intermediate_size=32)  # the kernel tiles F in multiples of 16
    layer = random_layer(cfg, jax.random.key(num_tokens))
    x = jax.random.normal(jax.random.key(num_tokens + 1), (num_tokens, cfg.hidden_size))
    with jax.default_matmul_precision("highest"):
        xla = moe(layer, x, cfg, impl="xla")
        np.testing.assert_allclose(moe(layer, x, cfg, impl="pallas"), xla, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(moe(layer, x, cfg, impl="reference"), xla, rtol=1e-5, atol=1e-5)
    if jax.default_backend() != "gpu":  # auto is ragged_dot off GPU: the CPU path is unchanged
        np.testing.assert_array_equal(moe(layer, x, cfg), xla)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_padding_rows_route_to_no_expert(monkeypatch, impl):
    """Rows past num_tokens (a step's padding) are no expert's rows: the real rows are unchanged, the padding comes
    back as zeros, and the grouped matmuls see only the real rows' assignments (so they read no expert for them)."""
    from jpaged.models import mixtral

    cfg = tiny_config(8, 2)
    layer = random_layer(cfg, jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (16, cfg.hidden_size))
    seen = []
    real_grouped_matmul = mixtral.grouped_matmul

    def spy(lhs, rhs, group_sizes, **kwargs):
        seen.append(int(jnp.sum(group_sizes)))
        return real_grouped_matmul(lhs, rhs, group_sizes, **kwargs)

    monkeypatch.setattr(mixtral, "grouped_matmul", spy)
    out = moe(layer, x, cfg, jnp.int32(3), impl=impl)
    np.testing.assert_allclose(out[:3], moe(layer, x[:3], cfg, impl=impl), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[3:], 0)
    assert seen[:3] == [3 * 2] * 3  # gate, up, down: the real rows' 6 assignments, none of the 26 padding ones
    np.testing.assert_allclose(moe(layer, x, cfg, jnp.int32(16), impl=impl), moe(layer, x, cfg, impl=impl))


def test_uneven_routing_one_expert_takes_all_another_none():
    cfg = tiny_config(4, 2)
    layer = random_layer(cfg, jax.random.key(0))
    # A router that always prefers experts 3 then 1: experts 0 and 2 get no tokens at all.
    layer["router"] = jnp.zeros_like(layer["router"]).at[:, 3].set(1.0).at[:, 1].set(0.5)
    x = jnp.abs(jax.random.normal(jax.random.key(1), (33, cfg.hidden_size)))
    _, experts = route(jnp.einsum("td,de->te", x, layer["router"]), 2)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=4)
    assert counts[3] == 33 and counts[0] == counts[2] == 0
    np.testing.assert_allclose(moe(layer, x, cfg), moe_dense_reference(layer, x, cfg), rtol=1e-5, atol=1e-5)


def test_router_weights_are_renormalised_top_k():
    weights, experts = route(jnp.array([[0.0, 1.0, 2.0, 3.0]]), 2)
    p = np.exp([3.0, 2.0]) / np.exp([3.0, 2.0]).sum()
    np.testing.assert_allclose(weights[0], p, rtol=1e-6)
    assert experts[0].tolist() == [3, 2]


def test_identical_experts_give_the_dense_models_text():
    identical = SHARED_MODELS / "stories260K-moe-identical"
    if not identical.is_dir():
        pytest.skip("shared/ is not beside the repository")
    params = SamplingParams(temperature=0.0, max_tokens=60)
    dense = LLM(str(STORIES)).generate("Once upon a time", params)[0].outputs[0]
    moe_llm = LLM(str(identical))
    sparse = moe_llm.generate("Once upon a time", params)[0].outputs[0]
    assert sparse.text == dense.text and sparse.token_ids == dense.token_ids
    assert_pool_clean(moe_llm)


PERTURBED = SHARED_MODELS / "stories260K-moe-perturbed"
PROMPTS = [{"prompt_token_ids": [1, *range(10 + i, 30 + 2 * i)]} for i in range(12)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def alone() -> list[list[int]]:
    if not PERTURBED.is_dir():
        pytest.skip("shared/ is not beside the repository")
    llm = LLM(str(PERTURBED), max_model_len=64)
    return [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mixtral_serves_with_tensor_parallelism_and_preemption(tp, alone):
    llm = LLM(str(PERTURBED), max_model_len=64, tensor_parallel_size=tp, num_pages=10, page_size=8)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert_pool_clean(llm)


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (8, 8)])
def test_one_token_path_equals_the_sorted_path(num_experts, top_k):
    """A step of one token skips the sort, gather and scatter: it gives the general path's result for that token (the
    same token as the real row of a two-row step), and a padding-only step reads no expert and returns zeros."""
    from jpaged.models import mixtral

    cfg = tiny_config(num_experts, top_k)
    layer = random_layer(cfg, jax.random.key(top_k))
    x = jax.random.normal(jax.random.key(5), (2, cfg.hidden_size))
    one = moe(layer, x[:1], cfg)
    np.testing.assert_allclose(one, moe(layer, x, cfg, jnp.int32(1))[:1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(one, moe_dense_reference(layer, x[:1], cfg), rtol=1e-5, atol=1e-5)
    # bitwise in bf16 too (both combines add in float32 and round once), so a lone sequence's tokens do not depend on
    # its step's bucket
    bf16, xb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), layer), x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(moe(bf16, xb[:1], cfg), moe(bf16, xb, cfg, jnp.int32(1))[:1])
    seen = []
    real_grouped_matmul = mixtral.grouped_matmul

    def spy(lhs, rhs, group_sizes, **kwargs):
        seen.append(int(jnp.sum(group_sizes)))
        return real_grouped_matmul(lhs, rhs, group_sizes, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mixtral, "grouped_matmul", spy)
        np.testing.assert_array_equal(moe(layer, x[:1], cfg, jnp.int32(0)), 0)
    assert seen == [0, 0]  # gate/up and down: no assignment, so no expert's weights
