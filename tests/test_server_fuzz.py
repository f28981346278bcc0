"""Hypothesis over request bodies against the real bundled-model server: whatever a client sends, the answer is a
success or a 4xx in OpenAI's envelope — never a 5xx, never a broken stream — and the engine keeps serving.

Bodies mix valid values with arbitrary JSON in every field, plus unknown fields and raw bytes. Generation stays
cheap: `max_tokens` is either 0-4 or invalid (never null, which would mean "the rest of the context"), and `n` is
either 1-2 or out of range."""

from __future__ import annotations

import collections
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_support import MODEL_NAME, RunningServer, shared_server, wait_idle

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
not_null = anything.filter(lambda v: v is not None)
# Values that are never a valid token count: other types, negatives, or huge.
bad_counts = st.one_of(
    st.booleans(), st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.text(max_size=5), st.lists(scalars, max_size=2), st.integers(max_value=-1), st.integers(min_value=10**6),
)  # fmt: skip


short_text = st.text(max_size=8)
token_ids = st.lists(st.integers(min_value=0, max_value=511), min_size=1, max_size=6)
# Valid values, kept cheap to generate: 1-4 tokens, 1-2 samples, short prompts.
SAMPLING = {
    "model": st.just(MODEL_NAME),
    "n": st.integers(1, 2),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 600),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100), max_size=1),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "prompt_logprobs": st.integers(0, 20),
    "echo": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": short_text,
}
COMPLETION = SAMPLING | {
    "prompt": st.one_of(short_text, st.lists(short_text, min_size=1, max_size=2), token_ids,
                        st.lists(token_ids, min_size=1, max_size=2)),
    "logprobs": st.integers(0, 5),
    "add_special_tokens": st.booleans(),
}  # fmt: skip
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"])},
        optional={
            "content": st.one_of(short_text, st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                             "text": short_text}), max_size=2)),
            "name": short_text,
        },
    ),
    min_size=1,
    max_size=3,
)  # fmt: skip
CHAT = SAMPLING | {
    "messages": messages,
    "max_tokens": st.integers(1, 4),
    "logprobs": st.booleans(),
    "add_generation_prompt": st.booleans(),
    "chat_template_kwargs": st.dictionaries(st.text(min_size=1, max_size=5), scalars, max_size=2),
}
# Fields the junk may also land in: ones a valid body leaves out.
EXTRA_KEYS = ["best_of", "suffix", "tools", "tool_choice", "response_format", "top_logprobs", "unknown_field", ""]


@st.composite
def bodies(draw: st.DrawFn, required: dict[str, Any], optional: dict[str, Any]) -> Any:
    """A valid body, then 0-2 fields replaced by junk (anything, or a bad count for a token count) or removed."""
    body = draw(st.fixed_dictionaries(required, optional={k: v for k, v in optional.items() if k not in required}))
    if body.get("n", 1) > 1 and body.get("temperature", 1.0) < 1e-5:  # n > 1 is refused when sampling greedily
        body["n"] = 1
    keys = sorted({*required, *optional, *EXTRA_KEYS})
    for key in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            body.pop(key, None)
        elif key in ("max_tokens", "max_completion_tokens", "n"):
            body[key] = draw(bad_counts)
        else:
            body[key] = draw(anything)
    return body


completion_bodies = bodies({"max_tokens": st.integers(1, 4), "prompt": COMPLETION["prompt"]}, COMPLETION)
chat_bodies = bodies({"max_completion_tokens": st.integers(1, 4), "messages": messages}, CHAT)
STATUSES: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module")
def server() -> RunningServer:
    return shared_server(chat_template=True)


@pytest.fixture(scope="module")
def http(server: RunningServer):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def check(resp: httpx.Response, *, stream: bool) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["code"], str) and isinstance(error["type"], str)
        return
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in resp.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]", events[-3:]
        for event in events[:-1]:
            assert event.startswith("data: ")
            assert "error" not in json.loads(event.removeprefix("data: ")), event
    else:
        assert not stream or resp.status_code != 200 or "choices" not in resp.json()


def send(http: httpx.Client, path: str, body: Any) -> None:
    resp = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    STATUSES[path][resp.status_code] += 1
    check(resp, stream=isinstance(body, dict) and body.get("stream") is True)


@settings(FUZZ, max_examples=150)
@given(body=completion_bodies)
def test_fuzz_completions(http: httpx.Client, body: dict):
    send(http, "/v1/completions", body)


@settings(FUZZ, max_examples=100)
@given(body=chat_bodies)
def test_fuzz_chat(http: httpx.Client, body: dict):
    send(http, "/v1/chat/completions", body)


@settings(FUZZ, max_examples=60)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]),
    body=st.one_of(not_null, bodies({}, {
        "prompt": short_text, "tokens": token_ids, "messages": messages, "add_special_tokens": st.booleans(),
        "return_token_strs": st.booleans(), "model": st.just(MODEL_NAME),
    })),
)  # fmt: skip
def test_fuzz_other_shapes(http: httpx.Client, path: str, body: Any):
    if path.startswith("/v1/") and isinstance(body, dict):
        body = body | {"max_tokens": 2, "max_completion_tokens": 2}
    send(http, path, body)


@settings(FUZZ, max_examples=40)
@given(raw=st.binary(max_size=64), path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]))
def test_fuzz_raw_bytes(http: httpx.Client, raw: bytes, path: str):
    check(http.post(path, content=raw), stream=False)


def test_the_engine_still_serves_after_the_fuzz(http: httpx.Client, server: RunningServer):
    for path in ("/v1/completions", "/v1/chat/completions"):  # the fuzz reached the engine, not only validation
        counts = STATUSES[path]
        assert counts[200] >= 0.3 * sum(counts.values()), (path, counts)
    resp = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == ", there was"
    assert http.get("/health").status_code == 200
    values = wait_idle(server)
    assert values["jpaged:num_requests_running"] == 0 and values["jpaged:kv_cache_usage_perc"] == 0
