"""Every error the server sends: status, OpenAI's envelope with a string code, and a message that says what to fix.

Validation errors run against the real bundled-model server; failures of the engine itself (500s, a dead or stalled
loop, a full queue) against a real server in front of a fake engine that fails on cue."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from test_server_support import (
    API_KEY,
    MODEL_NAME,
    FakeLLMEngine,
    RunningServer,
    _bundled_tokenizer,
    fake_server,
    shared_server,
    wait_idle,
)

from jpaged.server.routes import ROUTES


@pytest.fixture(scope="module")
def server() -> RunningServer:
    return shared_server()


@pytest.fixture(scope="module")
def chat_server() -> RunningServer:
    return shared_server(chat_template=True)


def post(server: RunningServer, path: str, body: object, **kwargs) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=120,
                      **kwargs)  # fmt: skip


def assert_error(resp: httpx.Response, status: int, *fragments: str, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and isinstance(error["type"], str) and error["message"]
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    if param is not None:
        assert error["param"] == param, error
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    return error


# -- 400: the request itself -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "x",}', "not valid JSON"),
        ("", "empty"),
        ("[1, 2]", "JSON object"),
        ('"a string"', "JSON object"),
        ("null", "JSON object"),
    ],
)
def test_malformed_bodies(server: RunningServer, body: str, fragment: str):
    assert_error(post(server, "/v1/completions", body), 400, fragment)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("temperature", "hot", "valid number"),
        ("n", "2", "valid integer"),
        ("n", 1.5, "valid integer"),
        ("stream", "yes", "valid boolean"),
        ("max_tokens", 2.5, "valid integer"),
        ("prompt", {"text": "x"}, "must be a string, a list of strings"),
        ("prompt", [1, "a"], "must be a string, a list of strings"),
        ("prompt", [1, -5], "token ids >= 0"),
        ("stop", 3, "must be a string or a list of strings"),
        ("logit_bias", [1], "should be an object"),
        ("seed", "1", "valid integer"),
        ("stream_options", {"include_usage": "yes"}, "valid boolean"),
        ("temperature", 2.5, "less than or equal to 2"),
        ("top_p", 0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("n", 0, "greater than or equal to 1"),
        ("n", 1000, "less than or equal to 128"),
        ("logprobs", 6, "less than or equal to 5"),
        ("max_tokens", -1, "greater than or equal to 0"),
        ("presence_penalty", 3, "less than or equal to 2"),
        ("frequency_penalty", -2.5, "greater than or equal to -2"),
        ("seed", 2**64, "less than 18446744073709551616"),
        ("min_p", 2, "less than or equal to 1"),
        ("prompt_logprobs", 21, "less than or equal to 20"),
        ("top_k", -2, "greater than or equal to -1"),
        ("min_tokens", -1, "greater than or equal to 0"),
    ],
)
def test_wrong_types_and_out_of_range_values(server: RunningServer, field: str, value: object, fragment: str):
    body = {"prompt": "Once", "max_tokens": 2} | {field: value}
    error = assert_error(post(server, "/v1/completions", body), 400, fragment)
    assert error["param"].split(".")[0] == field and field in error["message"]


@pytest.mark.parametrize(
    ("body", "fragment", "param"),
    [
        ({"prompt": []}, "prompt must not be empty", "prompt"),
        ({"prompt": [[]]}, "must be a string", "prompt"),
        ({"prompt": [999999]}, "outside the vocabulary", "prompt"),
        ({"prompt": [2**32], "echo": True, "max_tokens": 1}, "outside the vocabulary", "prompt"),  # decoded first
        ({"prompt": "x", "response_format": {"type": "json_object"}}, "not supported", "response_format"),
        ({"prompt": "x", "guided_json": {"type": "object"}}, "guided_json is not supported", "guided_json"),
        ({"prompt": "x", "structured_outputs": {"regex": "a+"}}, "not supported", "structured_outputs"),
        ({"prompt": "x", "allowed_token_ids": [5]}, "allowed_token_ids is not supported", "allowed_token_ids"),
        ({"prompt": "x", "use_beam_search": True}, "use_beam_search is not supported", "use_beam_search"),
        ({"prompt": "x", "stop": [""]}, "stop", "stop"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias keys must be token ids", "logit_bias"),
        ({"prompt": "x", "logit_bias": {"99999": 1}}, "outside the vocabulary", None),
        ({"prompt": "x", "stop_token_ids": [99999]}, "outside the vocabulary", None),
        ({"prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens", "min_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "only with echo", "max_tokens"),
        ({"prompt": "x", "suffix": "y"}, "suffix is not supported", "suffix"),
        ({"prompt": "x", "n": 1, "best_of": 3}, "best_of must equal n", "best_of"),
        ({"prompt": "x", "n": 2, "temperature": 0}, "n must be 1 when sampling greedily", "n"),
        ({}, "prompt: this field is required", "prompt"),
    ],
)
def test_invalid_completion_requests(server: RunningServer, body: dict, fragment: str, param: str | None):
    assert_error(post(server, "/v1/completions", body), 400, fragment, param=param)


def test_prompt_beyond_the_context(server: RunningServer):
    long_prompt = "Once upon a time " * 600  # 10200 characters (tokenized off the loop), ~2400 tokens > 512
    error = assert_error(post(server, "/v1/completions", {"prompt": long_prompt}), 400,
                         "This model's maximum context length is 512 tokens. However, your request has")  # fmt: skip
    assert error["code"] == "context_length_exceeded"
    error = assert_error(post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 510}), 400)
    assert error["message"] == (
        "This model's maximum context length is 512 tokens. However, you requested 515 tokens (5 in the messages, "
        "510 in the completion). Please reduce the length of the messages or completion."
    )


def test_chat_validation(chat_server: RunningServer):
    ok = [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": "hi"}, "messages", "valid array"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role", "required"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "must be a string, a list of text"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None, "text"),
        ({"messages": ok, "logprobs": "yes"}, "logprobs", "valid boolean"),
        ({"messages": ok, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"messages": ok, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"messages": ok, "max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
        ({"messages": ok, "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"messages": ok, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"messages": ok, "stream": True, "prompt_logprobs": 1}, "prompt_logprobs", "not available when stream"),
        ({"messages": ok, "chat_template": "{{ messages }}"}, "chat_template", "--trust-request-chat-template"),
        ({"messages": ok, "chat_template_kwargs": 3}, "chat_template_kwargs", "should be an object"),
    ]
    for body, param, fragment in cases:
        assert_error(post(chat_server, "/v1/chat/completions", body), 400, fragment, param=param)
    long_messages = [{"role": "user", "content": "Once upon a time " * 600}]
    assert_error(post(chat_server, "/v1/chat/completions", {"messages": long_messages}), 400,
                 "maximum context length is 512 tokens. However, your request has", param="messages")  # fmt: skip
    error = assert_error(post(chat_server, "/v1/chat/completions", {"messages": ok, "max_tokens": 600}), 400)
    assert "However, you requested" in error["message"] and "600 in the completion" in error["message"]


def test_chat_without_a_template_is_a_clear_400(server: RunningServer):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 400 and "chat template" in info.value.message
    assert "--chat-template" in info.value.message


def test_the_off_values_of_unsupported_fields_are_accepted(server: RunningServer):
    """What a client sends when it does not use a feature: null, false, empty, or a plain-text response_format."""
    for extra in ({"response_format": {"type": "text"}}, {"use_beam_search": False}, {"bad_words": []},
                  {"guided_json": None}, {"structured_outputs": None}):  # fmt: skip
        resp = post(server, "/v1/completions", {"prompt": "Once", "max_tokens": 1} | extra)
        assert resp.status_code == 200, (extra, resp.text)


def test_an_empty_model_name_means_the_served_model(server: RunningServer):
    """As vLLM: clients that choose no model send "" as often as null."""
    resp = post(server, "/v1/completions", {"model": "", "prompt": "Once", "max_tokens": 1})
    assert resp.status_code == 200 and resp.json()["model"] == MODEL_NAME


def test_unknown_model_is_a_404(server: RunningServer, chat_server: RunningServer):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="hi")
    assert info.value.code == "model_not_found" and "The model `gpt-9` does not exist." in info.value.message
    for srv, path, body in [
        (chat_server, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        (server, "/tokenize", {"model": "gpt-9", "prompt": "x"}),
        (server, "/detokenize", {"model": "gpt-9", "tokens": [1]}),
    ]:
        assert_error(post(srv, path, body), 404, "The model `gpt-9` does not exist.", param="model")
    assert_error(httpx.get(server.base_url + "/models/gpt-9"), 404, "The model `gpt-9` does not exist.")


def test_unknown_routes_and_methods(server: RunningServer):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, "/v1/nothing")
    assert_error(httpx.get(server.base_url + "/completions"), 405, "GET")
    assert_error(post(server, "/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}), 400,
                 "exactly one of prompt and messages")  # fmt: skip
    assert_error(post(server, "/detokenize", {"tokens": [100000]}), 400, "outside the vocabulary")


def test_a_top_k_past_int32_is_off_not_a_dead_engine(server: RunningServer):
    """top_k has no upper bound in the API (any top_k >= the vocabulary is off); one past int32 had raised in the
    engine's step, which stops its loop."""
    body = {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0.7, "seed": 4}
    for top_k in (2**31, 10**15):
        huge = post(server, "/v1/completions", body | {"top_k": top_k})
        assert huge.status_code == 200, huge.text
        assert huge.json()["choices"][0]["text"] == post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_the_server_keeps_serving_after_errors(server: RunningServer):
    ok = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == ", there was"
    assert httpx.get(server.url + "/health").status_code == 200
    values = wait_idle(server)
    assert values["jpaged:kv_cache_usage_perc"] == 0


# -- 401 / 413 / 429-503 / 500 with a fake engine ----------------------------------------------------------------
@pytest.fixture
def fake() -> Iterator[tuple[RunningServer, FakeLLMEngine]]:
    running, engine = fake_server(stall_timeout_s=0.5)
    yield running, engine
    if engine.block is not None:
        engine.block.set()
    running.stop()


def test_every_route_but_health_needs_the_api_key():
    running, _ = fake_server(app_kwargs={"api_key": API_KEY})
    try:
        paths = [(method, route.path.replace("{model:path}", MODEL_NAME)) for route in ROUTES
                 for method in sorted(route.methods - {"HEAD"})]  # fmt: skip
        assert len(paths) >= 11
        basic_wrong = httpx.BasicAuth("user", "wrong")
        for method, path in paths:
            for kwargs in ({}, {"headers": {"Authorization": "Bearer wrong"}}, {"headers": {"Authorization": API_KEY}},
                           {"auth": basic_wrong}):  # fmt: skip
                resp = httpx.request(method, running.url + path, json={}, **kwargs)
                if path == "/health":
                    assert resp.status_code == 200
                    continue
                error = assert_error(resp, 401, "API key")
                # The playground page asks a browser for the key (HTTP Basic); the API routes ask for a bearer token.
                challenge = 'Basic realm="jpaged", charset="UTF-8"' if path == "/" else "Bearer"
                assert error["code"] == "invalid_api_key" and resp.headers["www-authenticate"] == challenge
            resp = httpx.request(method, running.url + path, headers={"Authorization": f"Bearer {API_KEY}"}, json={})
            assert resp.status_code != 401, (method, path)
            basic = httpx.request(method, running.url + path, auth=httpx.BasicAuth("anyone", API_KEY), json={})
            assert (basic.status_code != 401) == (path in ("/health", "/")), (method, path)  # Basic: the page only
        page = httpx.get(running.url + "/", auth=httpx.BasicAuth("", API_KEY))
        assert f'<meta name="jpaged-api-key" content="{API_KEY}">' in page.text  # the page's API calls need it
        garbled = httpx.get(running.url + "/", headers={"Authorization": "Basic %%%"})
        assert_error(garbled, 401, "Incorrect API key")
        good = openai.OpenAI(base_url=running.base_url, api_key=API_KEY, max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL_NAME]
        assert good.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).choices[0].text == " a a"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.base_url, api_key="sk-wrong", max_retries=0).models.list()
    finally:
        running.stop()


def test_oversized_bodies_are_413():
    running, _ = fake_server(app_kwargs={"max_body_bytes": 1000})
    try:
        big = {"prompt": "x" * 2000}
        assert_error(post(running, "/v1/completions", big), 413, "1000 bytes")

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b" " * 300
            yield b'{"prompt": "x"}'

        resp = httpx.post(running.url + "/v1/completions", content=chunks())
        assert_error(resp, 413, "larger than")
        assert post(running, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        running.stop()


def test_a_full_waiting_queue_is_503_with_retry_after():
    running, engine = fake_server(max_waiting_requests=2)
    engine.block = threading.Event()
    try:
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(
                post(running, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code))
            for _ in range(2)
        ]  # fmt: skip
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while running.engine.num_unstarted < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        resp = post(running, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert_error(resp, 503, "waiting queue is full", "retry later")
        assert resp.headers["retry-after"] == "1"
        engine.block.set()
        for t in threads:
            t.join()
        assert results == [200, 200]
        assert post(running, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        engine.block.set()
        running.stop()


def test_a_request_id_in_use_is_a_400_naming_the_clients_id(fake):
    running, engine = fake
    engine.never_finish = True
    engine.step_delay_s = 0.01
    body = {"prompt": "x", "stream": True, "max_tokens": 400, "request_id": "mine"}
    with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept: a dropped generator closes the response, and the server aborts the request
        next(line for line in lines if line)  # the first request is running
        again = post(running, "/v1/completions", {"prompt": "y", "max_tokens": 1, "request_id": "mine"})
        error = assert_error(again, 400, "request_id 'mine' is already in use", param="request_id")
        assert "mine-0" not in error["message"]  # not the engine's internal id
        engine.never_finish = False  # (else a non-streamed request never returns)
        other = post(running, "/v1/completions", {"prompt": "y", "max_tokens": 1, "request_id": "other"})
        assert other.status_code == 200
        assert next(line for line in lines if line).startswith("data: ")  # the first one still streams


def test_a_requests_prompts_reach_the_engine_in_one_step(fake):
    """Eight prompts of one completion request are all taken in between the same two engine steps (awaiting each
    acceptance before sending the next admitted one a step)."""
    running, engine = fake
    engine.step_delay_s = 0.05
    added_at: list[int] = []
    add = engine.add_request

    def recording_add(request_id, prompt, params):
        added_at.append(engine.num_steps)
        return add(request_id, prompt, params)

    engine.add_request = recording_add  # type: ignore[method-assign]
    resp = post(running, "/v1/completions", {"prompt": [[1, 2]] * 8, "max_tokens": 3})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 8
    assert len(added_at) == 8 and len(set(added_at)) == 1, added_at


def test_a_prompt_the_engine_refuses_aborts_the_others_of_its_request(fake):
    running, engine = fake
    engine.never_finish = True
    add = engine.add_request

    def refusing_add(request_id, prompt, params):
        if prompt["prompt_token_ids"] == [3]:
            raise ValueError("prompt holds token ids outside the vocabulary (size 3): [3]")
        return add(request_id, prompt, params)

    engine.add_request = refusing_add  # type: ignore[method-assign]
    resp = post(running, "/v1/completions", {"prompt": [[1, 2], [3], [1]], "max_tokens": 3})
    assert_error(resp, 400, "outside the vocabulary", param="prompt")
    deadline = time.monotonic() + 10
    while engine.requests and time.monotonic() < deadline:  # the two accepted with it are aborted
        time.sleep(0.01)
    assert not engine.requests and sorted(a.rsplit("-", 1)[1] for a in engine.aborted) == ["0", "2"]
    engine.never_finish = False


def test_an_unexpected_error_is_a_500_without_internals(fake):
    running, engine = fake

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    engine.add_request = explode  # type: ignore[method-assign]
    resp = post(running, "/v1/completions", {"prompt": "x"})
    error = assert_error(resp, 500)
    assert "secret" not in resp.text and error["type"] == "server_error"
    client = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL_NAME, prompt="x")
    assert httpx.get(running.url + "/health").status_code == 200  # a failed request is not a dead engine


def test_an_engine_failure_mid_stream_sends_an_error_event_then_done(fake):
    running, engine = fake
    engine.never_finish = True
    engine.step_delay_s = 0.01
    body = {"prompt": "x", "stream": True, "max_tokens": 400}
    with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"]
        engine.fail_step = RuntimeError("device lost: secret")
        rest = [line for line in lines if line]
    events = [line.removeprefix("data: ") for line in rest]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal_error" and "engine loop died" in error["message"]
    assert "secret" not in error["message"]
    health = httpx.get(running.url + "/health")
    assert_error(health, 503, "RuntimeError")
    assert_error(post(running, "/v1/completions", {"prompt": "x"}), 503, "engine loop died")


def test_an_engine_failure_fails_waiting_non_streaming_requests_with_500(fake):
    running, engine = fake
    engine.never_finish = True
    engine.step_delay_s = 0.01
    timer = threading.Timer(0.3, lambda: setattr(engine, "fail_step", RuntimeError("boom")))
    timer.start()
    resp = post(running, "/v1/completions", {"prompt": "x", "max_tokens": 400})
    assert_error(resp, 500, "engine loop died")


def test_health_is_503_while_the_engine_is_stalled_with_work(fake):
    running, engine = fake
    assert httpx.get(running.url + "/health").status_code == 200
    engine.block = threading.Event()
    worker = threading.Thread(target=lambda: post(running, "/v1/completions", {"prompt": "x", "max_tokens": 2}))
    worker.start()
    time.sleep(0.8)  # > stall_timeout_s
    assert_error(httpx.get(running.url + "/health"), 503, "no progress")
    assert httpx.get(running.url + "/metrics").status_code == 200  # the HTTP side stays responsive
    engine.block.set()
    worker.join()
    assert httpx.get(running.url + "/health").status_code == 200


def test_client_disconnect_aborts_non_streaming_requests(fake):
    running, engine = fake
    engine.never_finish = True
    engine.step_delay_s = 0.01
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(running.url + "/v1/completions", json={"prompt": "x", "max_tokens": 400}, timeout=0.3)
    deadline = time.monotonic() + 5
    while not engine.aborted:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.01)
    assert not engine.requests


def test_client_disconnect_aborts_streams(fake):
    running, engine = fake
    engine.never_finish = True
    engine.step_delay_s = 0.01
    with httpx.stream("POST", running.url + "/v1/completions", json={"prompt": "x", "max_tokens": 400, "stream": True},
                      timeout=30) as resp:  # fmt: skip
        lines = resp.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
    deadline = time.monotonic() + 5
    while not engine.aborted:
        assert time.monotonic() < deadline, "the stream's request was not aborted"
        time.sleep(0.01)
    assert not engine.requests and running.engine.num_unstarted == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 400, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
    ],
    ids=["completions", "chat"],
)
def test_a_client_leaving_as_the_response_starts_aborts_its_requests(path, body, monkeypatch):
    """The client disconnects while the server's first send is still pending (write back-pressure, a middleware that
    awaits): the body never ran, and the request must still be aborted and forgotten by the response itself (the
    output stream's own last resort when dropped unclosed is turned off here)."""
    import asyncio

    from test_server_support import template_file

    from jpaged import async_engine
    from jpaged.async_engine import AsyncEngine

    monkeypatch.setattr(async_engine.RequestStream, "__del__", lambda self: None)
    from jpaged.config import EngineConfig
    from jpaged.server.app import build_app

    fake = FakeLLMEngine()
    fake.never_finish, fake.step_delay_s = True, 0.01
    fake.config = EngineConfig(chat_template=str(template_file()))

    async def run() -> None:
        engine = AsyncEngine(fake)
        app = build_app(engine, served_model_name=MODEL_NAME)
        engine.start()
        data, left = json.dumps(body).encode(), asyncio.Event()
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": data, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                left.set()
                await asyncio.sleep(0.05)  # the send is pending when the client goes

        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json")],
                 "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("test", 80),
                 "client": ("test", 1), "root_path": "", "app": app}  # fmt: skip
        await app(scope, receive, send)
        deadline = time.monotonic() + 5
        while fake.requests or engine._streams:
            assert time.monotonic() < deadline, (list(fake.requests), list(engine._streams))
            await asyncio.sleep(0.01)
        await engine.shutdown()

    asyncio.run(run())
    assert fake.aborted


def test_a_client_leaving_mid_upload_logs_no_error(fake, caplog):
    """A body cut short by the client is no server error: no traceback in the log, and the server serves on."""
    import logging
    import socket
    from urllib.parse import urlparse

    running, _ = fake
    url = urlparse(running.url)
    with caplog.at_level(logging.DEBUG):
        with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "x", ')  # fmt: skip
            time.sleep(0.2)
        time.sleep(0.5)  # the server notices the close
        assert httpx.post(running.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("client left during the upload" in r.getMessage() for r in caplog.records)


def test_request_chat_templates_run_only_when_trusted_and_fail_as_400():
    running, _ = fake_server(app_kwargs={"trust_request_chat_template": True})
    ok = [{"role": "user", "content": "hi"}]
    try:
        for template, fragment in [
            ("{% for %}", "chat template"),
            ("{{ raise_exception('no tools here') }}", "no tools here"),
            ("{{ 1 / 0 }}", "division by zero"),
            ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
            ("{{ messages[7].content }}", "chat template"),
        ]:
            body = {"messages": ok, "chat_template": template, "max_tokens": 1}
            assert_error(post(running, "/v1/chat/completions", body), 400, fragment, param="messages")
        body = {"messages": ok, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}", "max_tokens": 2}
        resp = post(running, "/v1/chat/completions", body)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == " a a"
        assert resp.json()["usage"]["prompt_tokens"] == 2  # "hi", no BOS: the template writes none
    finally:
        running.stop()


def test_tool_call_history_reaches_the_chat_template():
    """An assistant turn's tool_calls and a tool message's tool_call_id go to the template (as in vLLM)."""
    running, _ = fake_server(app_kwargs={"trust_request_chat_template": True})
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[{{ c.function.name }}]{% endfor %}"
                "{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}|{% endfor %}")  # fmt: skip
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]  # fmt: skip
    try:
        body = {"messages": messages, "chat_template": template, "add_special_tokens": False}
        resp = post(running, "/tokenize", body)
        assert resp.status_code == 200, resp.text
        text = _bundled_tokenizer().decode(resp.json()["tokens"])
        assert text == "user:weather?|assistant:[lookup]|tool:sunny(c1)|", text
    finally:
        running.stop()


def test_heavy_tokenizer_work_leaves_the_event_loop(fake, monkeypatch):
    """Rendering many (even empty) chat messages, tokenizing many (even empty) prompts, decoding many ids
    (/detokenize, an echoed id prompt) run on a worker thread, as long texts do: on the loop, 200,000 empty messages
    had stalled every other stream for 7.8 s."""
    from jpaged.server import state as state_module

    running, _ = fake
    on_threads: list[str] = []
    to_thread = state_module.asyncio.to_thread

    async def recording(fn, *args, **kwargs):
        on_threads.append(fn.__qualname__)
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(state_module.asyncio, "to_thread", recording)
    many_ids = [5] * 3000
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": ""}] * 300, "max_tokens": 1}
    assert post(running, "/v1/chat/completions", chat).status_code == 400  # the fake's tokenizer has no template
    assert post(running, "/tokenize", {"messages": chat["messages"]}).status_code == 400
    assert post(running, "/detokenize", {"tokens": many_ids}).json()["prompt"]
    echo = {"model": MODEL_NAME, "prompt": many_ids, "max_tokens": 0, "echo": True}
    assert post(running, "/v1/completions", echo).status_code == 400  # longer than the fake's context
    empty_prompts = {"model": MODEL_NAME, "prompt": [""] * 300, "max_tokens": 1}  # a tokenizer call each
    resp = post(running, "/v1/completions", empty_prompts)
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 300
    assert len(on_threads) == 5, on_threads
    assert post(running, "/detokenize", {"tokens": many_ids[:10]}).status_code == 200  # short: on the loop
    assert post(running, "/v1/completions", {"prompt": ["", "x"], "max_tokens": 1}).status_code == 200
    assert len(on_threads) == 5
