"""The API through the official `openai` client (sync and async, streaming and not) against a real uvicorn server
serving the bundled model: every endpoint and parameter, and the response shapes of OpenAI's spec."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from test_server_support import GREEDY_60, MODEL_NAME, RunningServer, shared_server, wait_idle

from jpaged import LLM, SamplingParams
from jpaged.server import protocol, sampling

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server() -> RunningServer:
    return shared_server()


@pytest.fixture(scope="module")
def chat_server() -> RunningServer:
    return shared_server(chat_template=True)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_client(chat_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=chat_server.base_url, api_key="unused", max_retries=0, timeout=120)


def async_client(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def tokenize(server: RunningServer, **body) -> list[int]:
    return httpx.post(server.url + "/tokenize", json=body).json()["tokens"]


# -- completions -------------------------------------------------------------------------------------------------
def test_greedy_completion_equals_offline_generate(client: openai.OpenAI, server: RunningServer):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0)
    protocol.CompletionResponse.model_validate(resp.model_dump())
    assert resp.object == "text_completion" and resp.model == MODEL_NAME and resp.id.startswith("cmpl-")
    [choice] = resp.choices
    assert choice.text == GREEDY_60 and choice.finish_reason == "length" and choice.index == 0
    offline = LLM(max_num_seqs=4, max_num_batched_tokens=64).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=60)
    )
    assert choice.text == offline[0].outputs[0].text
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (5, 60, 65)


def test_completion_defaults_to_16_tokens(client: openai.OpenAI):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert resp.usage is not None and resp.usage.completion_tokens == 16
    assert resp.choices[0].finish_reason == "length"


def test_null_fields_mean_their_defaults_and_seeds_are_64_bit(server: RunningServer, chat_server: RunningServer):
    """OpenAI's schema lets n, stream, echo, logprobs, ... be null (clients write unset fields so): null is the
    default, as in vLLM; a field whose null means something (max_tokens: the rest of the context) keeps it. Seeds
    are OpenAI's signed 64-bit integers (unsigned ones too), a negative one drawing as its two's complement, except -1,
    which means no seed (as in vLLM, where UIs send it for a random draw)."""
    nulls = {
        "n": None,
        "stream": None,
        "echo": None,
        "ignore_eos": None,
        "min_tokens": None,
        "skip_special_tokens": None,
        "include_stop_str_in_output": None,
    }
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **nulls,
            "add_special_tokens": None}  # fmt: skip
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == GREEDY_60[: len(resp.json()["choices"][0]["text"])]
    streamed = body | {"stream": True, "stream_options": {"include_usage": None, "continuous_usage_stats": None}}
    resp = httpx.post(server.url + "/v1/completions", json=streamed, timeout=60)
    assert resp.status_code == 200 and '"usage"' not in resp.text and resp.text.endswith("data: [DONE]\n\n")
    assert protocol.CompletionRequest.model_validate(body | {"max_tokens": None}).max_tokens is None  # rest of context
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **nulls,
            "logprobs": None, "add_generation_prompt": None, "continue_final_message": None}  # fmt: skip
    resp = httpx.post(chat_server.url + "/v1/chat/completions", json=chat, timeout=60)
    assert resp.status_code == 200 and resp.json()["choices"][0]["logprobs"] is None, resp.text
    draws = {}
    for seed in (-1, -2, 2**64 - 2, 2**63 - 1, -(2**63)):
        body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 12, "seed": seed}
        resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        draws[seed] = resp.json()["choices"][0]["text"]
    assert draws[-2] == draws[2**64 - 2] and draws[-2] != draws[2**63 - 1]
    unseeded = protocol.CompletionRequest.model_validate({"model": MODEL_NAME, "prompt": PROMPT, "seed": -1})
    assert sampling.sampling_params(unseeded, max_tokens=12, logprobs=None, prompt_logprobs=None).seed is None
    for seed in (2**64, -(2**63) - 1):
        body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1, "seed": seed}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 400


def test_streamed_completion_equals_the_whole_one(client: openai.OpenAI):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0, stream=True))
    assert len(chunks) > 10 and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == GREEDY_60
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_include_usage_adds_a_final_usage_chunk(client: openai.OpenAI):
    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (5, 10, 15)
    assert all(c.usage is None for c in body)


def test_n_samples_are_seed_reproducible_and_interleave_when_streamed(client: openai.OpenAI):
    kwargs = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 12, "n": 3, "seed": 1234, "temperature": 1.0}
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # distinct samples
    assert first.usage is not None and first.usage.prompt_tokens == 5  # the prompt counts once
    chunks = list(client.completions.create(**kwargs, stream=True))
    texts = ["", "", ""]
    for chunk in chunks:
        [choice] = chunk.choices
        texts[choice.index] += choice.text
    assert texts == [c.text for c in first.choices]
    indices = [c.choices[0].index for c in chunks]
    assert indices[:3] == [0, 1, 2]  # each step's deltas go out in index order
    other_seed = client.completions.create(**(kwargs | {"seed": 99}))
    assert [c.text for c in other_seed.choices] != [c.text for c in first.choices]


def test_stop_strings_cut_the_text(client: openai.OpenAI):
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0, stop=[" girl", "xyz"]
    )
    choice = resp.choices[0]
    assert choice.text == ", there was a little" and choice.finish_reason == "stop"
    assert choice.model_extra is not None and choice.model_extra["stop_reason"] == " girl"
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0, stop=" girl",
        extra_body={"include_stop_str_in_output": True},
    )  # fmt: skip
    assert resp.choices[0].text == ", there was a little girl"
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0, stop=" girl",
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == ", there was a little"


def test_stop_token_ids_min_tokens_and_ignore_eos(client: openai.OpenAI, server: RunningServer):
    [little] = tokenize(server, prompt=" little", add_special_tokens=False)
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0, extra_body={"stop_token_ids": [little]}
    )
    # the stopping token's text is left out unless include_stop_str_in_output (vLLM)
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].text == ", there was a"
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0,
        extra_body={"stop_token_ids": [little], "include_stop_str_in_output": True},
    )  # fmt: skip
    assert resp.choices[0].text == ", there was a little" and resp.choices[0].stop_reason == little  # type: ignore[attr-defined]
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
        extra_body={"min_tokens": 8, "ignore_eos": True, "stop_token_ids": [little]},
    )  # fmt: skip
    assert resp.usage is not None and resp.usage.completion_tokens == 8


def test_echo_returns_the_prompt_first(client: openai.OpenAI):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert resp.choices[0].text == PROMPT + ", there was a little girl"
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, echo=True,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


def _check_completion_logprobs(choice, k: int, num_tokens: int) -> None:
    lp = choice.logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == num_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        if logprob is None:
            assert top is None
            continue
        assert logprob <= 0 and token in top and top[token] == logprob
        assert 1 <= len(top) <= k + 1
        assert all(v <= 0 for v in top.values())


def test_completion_logprobs_shape(client: openai.OpenAI):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    choice = resp.choices[0]
    _check_completion_logprobs(choice, 3, 8)
    assert choice.logprobs is not None
    assert "".join(choice.logprobs.tokens) == choice.text
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and all(choice.text[o:].startswith(t) for o, t in zip(offsets, choice.logprobs.tokens,
                                                                                strict=True))  # fmt: skip
    # greedy: the chosen token is the most likely one
    assert all(max(top.values()) == lp for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs,
                                                          strict=True))  # fmt: skip


def test_echo_with_logprobs_covers_the_prompt(client: openai.OpenAI):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1,
                                     echo=True)  # fmt: skip
    choice = resp.choices[0]
    _check_completion_logprobs(choice, 1, 5 + 4)
    assert choice.logprobs is not None
    assert choice.logprobs.tokens[:5] == ["<s>", " Once", " upon", " a", " time"]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.token_logprobs[1] is not None
    # max_tokens=0 with echo scores the prompt alone
    scored = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].text == PROMPT and scored.usage is not None and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs is not None
    assert scored.choices[0].logprobs.token_logprobs == choice.logprobs.token_logprobs[:5]


def test_streamed_logprobs_cover_every_token(client: openai.OpenAI):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                            stream=True))  # fmt: skip
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    offsets = [o for c in chunks for o in (c.choices[0].logprobs.text_offset if c.choices[0].logprobs else [])]
    text = "".join(c.choices[0].text for c in chunks)
    assert len(tokens) == 8 and "".join(tokens) == text
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_prompt_logprobs_extra(client: openai.OpenAI):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 2})
    plp = resp.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert len(plp) == 5 and plp[0] is None
    assert all(str(t) in entry for t, entry in zip([403, 407, 261, 378], plp[1:], strict=True))
    assert all(1 <= len(entry) <= 3 for entry in plp[1:])
    for t, entry in zip([403, 407, 261, 378], plp[1:], strict=True):  # the prompt token's rank, in the top 2 or not
        at_least_as_likely = [e for e in entry.values() if e["logprob"] >= entry[str(t)]["logprob"]]
        assert entry[str(t)]["rank"] >= len(at_least_as_likely) and (entry[str(t)]["rank"] <= 2) == (len(entry) == 2)


def test_batched_prompts_and_token_ids(client: openai.OpenAI, server: RunningServer):
    ids = tokenize(server, prompt=PROMPT)
    little = ", there was a little"  # 5 tokens
    # top_k 1: each of the n samples is the greedy one (n > 1 at temperature 0 is a 400)
    resp = client.completions.create(
        model=MODEL_NAME, prompt=[PROMPT, "Lily and Ben"], max_tokens=5, n=2, temperature=1.0, extra_body={"top_k": 1}
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text == little
    from_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0)
    assert from_ids.choices[0].text == little
    batch_ids = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:3]], max_tokens=5, temperature=0)
    assert batch_ids.choices[0].text == little and len(batch_ids.choices) == 2
    assert batch_ids.usage is not None and batch_ids.usage.prompt_tokens == 5 + 3
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=[PROMPT, PROMPT], max_tokens=5, temperature=0,
                                              stream=True))  # fmt: skip
    for index in (0, 1):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == index) == little


def test_sampling_knobs_are_accepted_and_act(client: openai.OpenAI, server: RunningServer):
    [lily] = tokenize(server, prompt=" Lily", add_special_tokens=False)
    biased = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias={str(lily): 100})  # fmt: skip
    assert biased.choices[0].text == " Lily" * 4
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, seed=7, user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "skip_special_tokens": True},
    )  # fmt: skip
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.choices[0].text


def test_async_client_streams_completions(server: RunningServer):
    async def main():
        client = async_client(server)
        stream = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0,
                                                 stream=True)  # fmt: skip
        text = "".join([c.choices[0].text async for c in stream])
        whole = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=60, temperature=0)
        await client.close()
        return text, whole.choices[0].text

    assert asyncio.run(main()) == (GREEDY_60, GREEDY_60)


# -- chat --------------------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}]


def test_chat_goes_through_the_template(chat_client: openai.OpenAI, chat_server: RunningServer):
    resp = chat_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    protocol.ChatCompletionResponse.model_validate(resp.model_dump())
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    [choice] = resp.choices
    assert choice.message.role == "assistant" and choice.message.content
    prompt_ids = tokenize(chat_server, messages=MESSAGES)
    assert resp.usage is not None and resp.usage.prompt_tokens == len(prompt_ids)
    # the same tokens through the completions API give the same greedy text
    same = chat_client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=20, temperature=0)
    assert same.choices[0].text == choice.message.content


def test_chat_defaults_to_the_rest_of_the_context(chat_client: openai.OpenAI, chat_server: RunningServer):
    resp = chat_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0,
                                               extra_body={"ignore_eos": True})  # fmt: skip
    prompt_len = len(tokenize(chat_server, messages=MESSAGES))
    assert resp.usage is not None and resp.usage.completion_tokens == 512 - prompt_len
    assert resp.choices[0].finish_reason == "length"
    short = chat_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=3,
                                                extra_body={"ignore_eos": True})  # fmt: skip
    assert short.usage is not None and short.usage.completion_tokens == 3


def test_chat_logprobs_shape(chat_client: openai.OpenAI):
    resp = chat_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                               logprobs=True, top_logprobs=3)  # fmt: skip
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 6 and "".join(e.token for e in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert all(t.bytes is not None for t in entry.top_logprobs)
    plain = chat_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, logprobs=True)
    assert plain.choices[0].logprobs is not None
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content or [])
    none = chat_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_chat_streams_role_then_content_with_usage(chat_client: openai.OpenAI):
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 10, "n": 2, "seed": 5, "temperature": 1.0}
    whole = chat_client.chat.completions.create(**kwargs)
    chunks = list(chat_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None and c.object == "chat.completion.chunk" for c in body)
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in body[:2]] == [(0, "assistant"), (1, "assistant")]
    texts = ["", ""]
    reasons: dict[int, str | None] = {}
    for chunk in body:
        [choice] = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            reasons[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == {c.index: c.finish_reason for c in whole.choices}


def test_chat_streamed_logprobs(chat_client: openai.OpenAI):
    chunks = list(chat_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0,
                                                      logprobs=True, top_logprobs=2, stream=True))  # fmt: skip
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert len(entries) == 5 and all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(e.token for e in entries) == "".join(c.choices[0].delta.content or "" for c in chunks)


def test_chat_template_extras_and_echo(chat_client: openai.OpenAI, chat_server: RunningServer):
    messages = [*MESSAGES, {"role": "assistant", "content": "There was a"}]
    resp = chat_client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=3, temperature=0,
        extra_body={"add_generation_prompt": False, "echo": True},
    )  # fmt: skip
    assert resp.choices[0].message.content.startswith("There was a")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Once upon"}, {"type": "text", "text": "a time"}]}]
    plain = [{"role": "user", "content": "Once upon\na time"}]  # one part a line, as vLLM joins them
    assert tokenize(chat_server, messages=parts) == tokenize(chat_server, messages=plain)


def test_async_client_chat(chat_server: RunningServer):
    async def main():
        client = async_client(chat_server)
        whole = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0)
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                                      stream=True)  # fmt: skip
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return whole.choices[0].message.content, text

    whole, streamed = asyncio.run(main())
    assert whole == streamed and whole


# -- the other routes --------------------------------------------------------------------------------------------
def test_models(client: openai.OpenAI):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    card = client.models.retrieve(MODEL_NAME)
    assert card.object == "model" and card.owned_by == "jpaged" and card.model_extra["max_model_len"] == 512  # type: ignore[index]


def test_tokenize_detokenize_version_health_playground_openapi(server: RunningServer):
    tok = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert tok == {"count": 5, "max_model_len": 512, "tokens": [1, 403, 407, 261, 378],
                   "token_strs": ["<s>", " Once", " upon", " a", " time"]}  # fmt: skip
    detok = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"][1:]}).json()
    assert detok == {"prompt": PROMPT}
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").status_code == 200
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "<html" in page.text
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                 "/metrics", "/version", "/"):  # fmt: skip
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "CompletionResponse", "ErrorResponse"} <= set(schemas)
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs), refs


def test_metrics_after_traffic(client: openai.OpenAI, server: RunningServer):
    long_prompt = PROMPT + GREEDY_60  # 65 tokens: four full KV pages to share
    for _ in range(2):
        client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "time_to_first_token_seconds_bucket",
                 "time_per_output_token_seconds_bucket", "e2e_request_latency_seconds_bucket"):  # fmt: skip
        assert f"jpaged:{name}" in text, name
    values = wait_idle(server)
    assert values["jpaged:num_requests_running"] == 0 and values["jpaged:kv_cache_usage_perc"] == 0
    assert values["jpaged:generation_tokens_total"] >= 4 and values["jpaged:request_success_total"] >= 1
    assert values["jpaged:prefix_cache_hits_total"] >= 48  # the second run found the first's pages
