"""Streamed chunks without a server: `ChunkEncoder`'s fast path against its general path, and the completions and chat
views' events against the pydantic response models (byte for byte), with logprobs, echo, finish reasons and usage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from pydantic import BaseModel
from test_server_support import MODEL_NAME, FakeLLMEngine, _bundled_tokenizer

from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.request import Logprob
from jpaged.server import chat, completions
from jpaged.server.generation import ChunkEncoder, guard_stream
from jpaged.server.logprobs import TokenStrings, text_offsets
from jpaged.server.metrics import ServerMetrics
from jpaged.server.protocol import ChatCompletionChunk, ChatCompletionRequest, CompletionChunk, CompletionRequest
from jpaged.server.state import ServerState

TRICKY_TEXTS = [
    "",
    " a",
    'quote " and backslash \\ and slash /',
    "new\nline, tab\t, return\r, bell\x07, nul\x00, escape\x1b, del\x7f",
    "é, 中文, emoji 🙂, line separator \u2028, BOM \ufeff",
    "</script><!--",
    "\x00jpaged-text\x00",  # the encoder's own template marker, as text
]
TEXT_CHOICES = {"completions": completions.text_choice, "chat": chat.text_choice}


@pytest.mark.parametrize("api", sorted(TEXT_CHOICES))
@pytest.mark.parametrize("include_usage", [False, True])
def test_the_text_fast_path_equals_the_general_path(api: str, include_usage: bool):
    head = {"id": 'cmpl-"x"', "object": "chunk", "created": 1767225600, "model": "mödel \\ 1"}
    encoder = ChunkEncoder(head, include_usage=include_usage, text_choice=TEXT_CHOICES[api])
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": None}
    for index in (0, 1, 17, 0):  # templates are made per index, then reused
        for text in TRICKY_TEXTS:
            fast = encoder.text(index, text)
            assert fast == encoder.event([TEXT_CHOICES[api](index, text)]), (index, text)
            assert json.loads(fast.removeprefix(b"data: "))["choices"][0]["index"] == index
            # continuous usage stats: the usage so far on the fast path's chunk too
            assert encoder.text(index, text, usage) == encoder.event([TEXT_CHOICES[api](index, text)], usage)


@pytest.mark.parametrize(
    "text, tokens, expected",
    [
        ("Once upon", ["<s>", " Once", " upon"], [0, 0, 4]),  # a special token left out; the first space dropped
        ("<s> Once upon", ["<s>", " Once", " upon"], [0, 3, 8]),  # the special token in the text
        ("a\u2019b c", ["a", "\ufffd", "\ufffd", "\ufffd", "b", " c"], [0, 1, 1, 1, 2, 3]),  # a character in bytes
        ("ab", ["a", "b", "cd", " e"], [0, 1, 2, 4]),  # tokens a stop string cut: where their text would have been
        (" there was a little", [" there", " was", " a", " little"], [0, 6, 10, 12]),
    ],
)
def test_text_offsets_find_each_token_in_the_text(text: str, tokens: list[str], expected: list[int]):
    assert text_offsets(text, tokens)[0] == expected
    # Over a stream's growing text the scan gives the same offsets, also where the stream holds back the end of
    # the generated text (the detokenizer does while it could be the start of a stop string) by 1 or 3 characters,
    # in the cases of plain words (a held-back tail here is text, not a special token or part of a character).
    plain_words = all(t.strip(" ").isalpha() for t in tokens)
    for held_back in (0, 1, 3) if plain_words else (0,):
        scan, streamed = 0, []
        for k, token in enumerate(tokens):
            shown = text[: max(0, expected[k] + len(token) - held_back)]
            got, scan = text_offsets(shown, [token], scan)
            streamed += got
        assert streamed == expected, held_back


# -- the views, driven by made-up engine outputs ------------------------------------------------------------------
def _tokens(text: str) -> list[int]:
    return list(_bundled_tokenizer()(text, add_special_tokens=False).input_ids)


def _state() -> ServerState:
    fake: Any = FakeLLMEngine()
    tokenizer = _bundled_tokenizer()
    return ServerState(fake, (MODEL_NAME,), ServerMetrics(fake, MODEL_NAME), TokenStrings(tokenizer))


def _outputs(
    ids: Sequence[int], *, n: int = 1, logprobs: bool, steps: Sequence[int], finish: str = "length"
) -> list[RequestOutput]:
    """Cumulative outputs after `steps` tokens each (a step of several tokens is what a slow reader sees); every
    sample generates `ids`; the last output finishes with `finish`."""
    strings = TokenStrings(_bundled_tokenizer())
    prompt = _tokens("Once upon a time")
    result = []
    for k, count in enumerate(steps):
        done = k == len(steps) - 1
        lps = [Logprob(t, -0.5 - j, ((t, -0.5 - j), (t + 1, -1.25), (t + 2, -9999.0))) for j, t in enumerate(ids)]
        samples = [
            CompletionOutput(
                index=i,
                text="".join(strings.text(t) for t in ids[:count]),  # as the engine decodes it, in context
                token_ids=list(ids[:count]),
                cumulative_logprob=None,
                logprobs=lps[:count] if logprobs else None,
                finish_reason=finish if done else None,
                stop_reason=None,
            )
            for i in range(n)
        ]
        prompt_lps: list[Logprob | None] = [None, *(Logprob(t, -2.0, ((t, -2.0),)) for t in prompt[1:])]
        result.append(RequestOutput("r-0", "Once upon a time", prompt, prompt_lps, samples, done, num_cached_tokens=3))
    return result


async def _events(view: Any, outputs: list[RequestOutput]) -> list[bytes]:
    async def engine_stream() -> AsyncIterator[RequestOutput]:
        for output in outputs:
            yield output

    writes = [write async for write in guard_stream(view.stream([engine_stream()]))]
    events = [event + b"\n\n" for write in writes for event in write.split(b"\n\n") if event]
    assert b"".join(events) == b"".join(writes)
    return events


def _round_trip(event: bytes, model: type[BaseModel]) -> dict[str, Any]:
    """Checks that the event is exactly what the pydantic model makes of it; returns it parsed."""
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    payload = event.removeprefix(b"data: ").removesuffix(b"\n\n").decode()
    again = model.model_validate_json(payload).model_dump_json(exclude_unset=True)
    assert again == payload
    parsed: dict[str, Any] = json.loads(payload)
    return parsed


COMPLETION_CASES = {
    "plain": {},
    "usage": {"stream_options": {"include_usage": True}},
    "logprobs": {"logprobs": 2, "stream_options": {"include_usage": True}},
    "echo and prompt logprobs": {"echo": True, "prompt_logprobs": 1},
    "echo and logprobs": {"echo": True, "logprobs": 1},
    "two samples": {"n": 2, "stream_options": {"include_usage": True}},
    "continuous usage, two samples": {
        "n": 2,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    },
}


@pytest.mark.parametrize("case", sorted(COMPLETION_CASES))
@pytest.mark.parametrize("steps", [(1, 2, 3, 4, 5, 6), (1, 4, 5, 6), (6,)], ids=["per token", "coalesced", "one"])
def test_completion_chunks_match_the_models_and_carry_the_whole_text(case: str, steps: tuple[int, ...]):
    extra = COMPLETION_CASES[case]
    body = CompletionRequest.model_validate({"prompt": "Once upon a time", "stream": True} | extra)
    ids = _tokens(" there was a little girl")[:6]
    outputs = _outputs(ids, n=body.n, logprobs=body.logprobs is not None, steps=steps)
    prompt = outputs[0].prompt_token_ids
    view = completions._View(_state(), body, "cmpl-1", MODEL_NAME, [("Once upon a time", prompt)], False)
    events = asyncio.run(_events(view, outputs))
    chunks = [_round_trip(e, CompletionChunk) for e in events]
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    final = outputs[-1].outputs[0].text
    assert texts == {i: ("Once upon a time" if body.echo else "") + final for i in range(body.n)}
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert finishes == ["length"] * body.n
    if body.stream_options:
        _check_usage(chunks, continuous=body.stream_options.continuous_usage_stats, prompt=len(prompt), n=body.n)
    else:
        assert all("usage" not in c for c in chunks)
    if body.logprobs is not None:
        tokens = [t for chunk in chunks for c in chunk["choices"] if c["index"] == 0 for t in c["logprobs"]["tokens"]]
        assert len(tokens) == 6 + body.echo * len(prompt) and "".join(tokens).endswith(final)
        # text_offset: each token's place in the choice's text, the same streamed as whole
        streamed = [
            o for chunk in chunks for c in chunk["choices"] if c["index"] == 0 for o in c["logprobs"]["text_offset"]
        ]
        whole = view.response([outputs[-1]])["choices"][0]
        assert whole["logprobs"]["text_offset"] == streamed
        for offset, token in zip(streamed, tokens, strict=True):
            assert whole["text"][offset:].startswith((token, token.lstrip(" "))) or token == "<s>", (offset, token)


CHAT_CASES = {
    "plain": {},
    "usage": {"stream_options": {"include_usage": True}},
    "logprobs": {"logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}},
    "two samples, stopped": {"n": 2, "stream_options": {"include_usage": True}},
    "continuous usage": {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
}


def _check_usage(chunks: list[dict[str, Any]], *, continuous: bool, prompt: int, n: int) -> None:
    """Usage on the last chunk only (the request's, with no choices), or with continuous usage stats also on every
    chunk before it: its choice's prompt and that choice's tokens so far, as vLLM reports them."""
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6 * n
    if not continuous:
        assert [c["usage"] is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
        return
    per_choice: dict[int, list[int]] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        per_choice.setdefault(choice["index"], []).append(chunk["usage"]["completion_tokens"])
        assert chunk["usage"]["prompt_tokens"] == prompt
        assert chunk["usage"]["total_tokens"] == prompt + chunk["usage"]["completion_tokens"]
    assert sorted(per_choice) == list(range(n))
    assert all(counts == sorted(counts) and counts[-1] == 6 for counts in per_choice.values()), per_choice


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
@pytest.mark.parametrize("steps", [(1, 2, 3, 4, 5, 6), (1, 4, 5, 6), (6,)], ids=["per token", "coalesced", "one"])
def test_chat_chunks_match_the_models_and_carry_the_whole_text(case: str, steps: tuple[int, ...]):
    extra = CHAT_CASES[case]
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Hi"}], "stream": True} | extra
    )
    ids = _tokens(" there was a little girl")[:6]
    finish = "stop" if "stopped" in case else "length"
    outputs = _outputs(ids, n=body.n, logprobs=body.logprobs, steps=steps, finish=finish)
    prompt = outputs[0].prompt_token_ids
    view = chat._View(_state(), body, "chatcmpl-1", MODEL_NAME, num_prompt_tokens=len(prompt))
    events = asyncio.run(_events(view, outputs))
    chunks = [_round_trip(e, ChatCompletionChunk) for e in events]
    roles = [c["delta"]["role"] for chunk in chunks for c in chunk["choices"] if "role" in c["delta"]]
    assert roles == ["assistant"] * body.n
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"].get("content", "")
    assert texts == {i: outputs[-1].outputs[0].text for i in range(body.n)}
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert finishes == [finish] * body.n
    if body.stream_options:
        _check_usage(chunks, continuous=body.stream_options.continuous_usage_stats, prompt=len(prompt), n=body.n)
    if body.logprobs:
        tokens = [
            t["token"] for chunk in chunks for c in chunk["choices"] if c["logprobs"] for t in c["logprobs"]["content"]
        ]
        assert len(tokens) == 6 and "".join(tokens) == outputs[-1].outputs[0].text


def test_a_chunk_per_token_when_the_reader_keeps_up_one_per_wakeup_when_it_lags():
    body = CompletionRequest.model_validate({"prompt": "x", "stream": True})
    ids = _tokens(" there was a little girl")[:6]
    for steps, expected in (((1, 2, 3, 4, 5, 6), 6), ((2, 6), 2)):
        view = completions._View(_state(), body, "cmpl-1", MODEL_NAME, [("x", [1])], False)
        events = asyncio.run(_events(view, _outputs(ids, logprobs=False, steps=steps)))
        assert len(events) == expected
