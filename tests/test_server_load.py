"""200 concurrent streaming clients against the bundled model, a third of them leaving mid-stream: every stream that
finishes is complete and well-formed, and afterwards nothing runs, no KV page is held and /health is 200."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
from test_server_support import MODEL_NAME, shared_server, wait_idle

NUM_CLIENTS = 200
MAX_TOKENS = 8


def test_200_streaming_clients_with_a_third_disconnecting():
    server = shared_server(chat_template=True)
    llm_engine = server.engine.engine

    async def raw_completion(http: httpx.AsyncClient, i: int) -> dict:
        """Reads the raw event stream: every event is JSON, the last is [DONE], usage arrives last."""
        body = {"model": MODEL_NAME, "prompt": f"Once upon a time {i}", "max_tokens": MAX_TOKENS, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            events = [line async for line in resp.aiter_lines() if line]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
        *deltas, usage = chunks
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == MAX_TOKENS
        assert len({c["id"] for c in chunks}) == 1
        assert [c["choices"][0]["finish_reason"] for c in deltas][-1] == "length"
        return {"text": "".join(c["choices"][0]["text"] for c in deltas)}

    async def chat(client: openai.AsyncOpenAI, i: int) -> dict:
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": f"Tell story {i}"}], max_tokens=MAX_TOKENS,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        *deltas, usage = chunks
        assert deltas[0].choices[0].delta.role == "assistant"
        assert deltas[-1].choices[0].finish_reason == "length"
        assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == MAX_TOKENS
        return {"text": "".join(c.choices[0].delta.content or "" for c in deltas)}

    async def leaver(client: openai.AsyncOpenAI, i: int) -> dict:
        stream = await client.completions.create(model=MODEL_NAME, prompt=f"Lily and Ben {i}", max_tokens=480,
                                                 stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.close()  # drops the connection: the server must abort the request
        return {"left": True}

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 10, max_keepalive_connections=NUM_CLIENTS + 10)
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http,
            openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120,
                               http_client=httpx.AsyncClient(limits=limits, timeout=120)) as client,
        ):  # fmt: skip
            jobs = []
            for i in range(NUM_CLIENTS):
                if i % 3 == 2:
                    jobs.append(leaver(client, i))
                elif i % 3 == 1:
                    jobs.append(chat(client, i))
                else:
                    jobs.append(raw_completion(http, i))
            return await asyncio.gather(*jobs)

    start = time.monotonic()
    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    elapsed = time.monotonic() - start
    assert sum("left" in r for r in results) == NUM_CLIENTS // 3
    assert all(r["text"] for r in results if "text" in r)
    # Only the leavers' requests can be left, and they were aborted: idle at once, not after their 480 tokens
    # (67 x 480 tokens would take seconds more).
    left_at = time.monotonic()
    values = wait_idle(server)
    assert time.monotonic() - left_at < 5
    assert values["jpaged:num_requests_running"] == 0
    assert values["jpaged:num_requests_waiting"] == 0
    assert values["jpaged:kv_cache_usage_perc"] == 0
    assert httpx.get(server.url + "/health").status_code == 200
    assert not llm_engine.has_unfinished_requests() and llm_engine.pool.all_free()
    assert elapsed < 60, elapsed
