"""POST /v1/chat/completions: messages through the chat template, streamed or not.

`max_completion_tokens` (or the older `max_tokens`) defaults to the rest of the context. A model without a chat
template answers 400 unless the server has `--chat-template`, or the request brings `chat_template` and the server
trusts request templates (`--trust-request-chat-template`: a template is code, and a slow one would stall the server).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.async_engine import OutputStream
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.server.errors import bad_request
from jpaged.server.generation import (
    ChunkEncoder,
    ClientDisconnected,
    EventStream,
    collect_until_disconnect,
    guard_stream,
    merge,
    sentence,
    submit,
    usage,
    usage_options,
)
from jpaged.server.logprobs import chat_logprobs, prompt_logprobs
from jpaged.server.protocol import ChatCompletionRequest, ChatMessage
from jpaged.server.sampling import resolve_max_tokens, sampling_params
from jpaged.server.state import CHARS_PER_MESSAGE, ServerState, get_state, off_loop_if_long, read_body


async def create_chat_completion(request: Request) -> Response:
    state = get_state(request)
    body = await read_body(request, ChatCompletionRequest)
    model = state.resolve_model(body.model)
    _reject_unsupported(body)
    text, token_ids = await render_messages(
        state, body.messages, body.chat_template, body.add_generation_prompt, _template_kwargs(body)
    )
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(requested, len(token_ids), state.engine.max_model_len, "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    params = sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        prompt_logprobs=body.prompt_logprobs,
    )
    request_id = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
    view = _View(state, body, request_id, model, num_prompt_tokens=len(token_ids))
    streams = await submit(state, request_id, [{"prompt": text, "prompt_token_ids": token_ids}], params)
    if body.stream:
        return EventStream(guard_stream(view.stream(streams)), streams)
    try:
        [output] = await collect_until_disconnect(request, streams)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(view.response(output))


async def render_messages(
    state: ServerState,
    messages: list[ChatMessage],
    chat_template: str | None,
    add_generation_prompt: bool,
    chat_template_kwargs: dict[str, Any] | None,
) -> tuple[str, list[int]]:
    """The prompt text and token ids of a conversation; 400 for anything the template cannot render."""
    state.require_tokenizer("chat")
    if chat_template is not None and not state.trust_request_chat_template:
        raise bad_request(
            "chat_template in a request is refused; start the server with --trust-request-chat-template to allow it",
            param="chat_template",
        )
    plain = [_plain_message(m) for m in messages]
    size = sum(len(m["content"]) + CHARS_PER_MESSAGE for m in plain)
    try:
        return await off_loop_if_long(
            size, lambda: state.engine.render_chat(plain, chat_template, add_generation_prompt, chat_template_kwargs)
        )
    except ValueError as exc:  # no template, or arguments the tokenizer refused
        raise bad_request(sentence(str(exc)), param="messages") from None
    except Exception as exc:
        # The template runs on the request's messages and kwargs: whatever it raises (raise_exception, a missing
        # key, a sandbox limit) is the request's problem, answered with the template's own words.
        raise bad_request(f"The chat template could not render these messages: {exc}", param="messages") from None


def _plain_message(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):  # text parts, one a line, as vLLM joins them for string-content templates
        content = "\n".join(part.text for part in content)
    plain: dict[str, Any] = {"role": message.role, "content": content if content is not None else ""}
    if message.name is not None:
        plain["name"] = message.name
    # A conversation's earlier tool calls and their results, for templates that render them (as vLLM passes them):
    # dropping them would show the model an empty assistant turn and a tool result with no call.
    for key in ("tool_calls", "tool_call_id"):
        if (value := (message.model_extra or {}).get(key)) is not None:
            plain[key] = value
    return plain


def _template_kwargs(body: ChatCompletionRequest) -> dict[str, Any] | None:
    kwargs = dict(body.chat_template_kwargs or {})
    if body.continue_final_message:
        kwargs["continue_final_message"] = True
    return kwargs or None


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools or body.functions:
        raise bad_request("tools and functions are not supported", param="tools" if body.tools else "functions")
    if body.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported", param="tool_choice")
    if body.stream and body.prompt_logprobs is not None:  # as vLLM: a chat chunk has no place for them
        raise bad_request("prompt_logprobs are not available when stream is true", param="prompt_logprobs")


class _View:
    """Turns engine outputs into this request's response or stream chunks."""

    def __init__(
        self, state: ServerState, body: ChatCompletionRequest, request_id: str, model: str, *, num_prompt_tokens: int
    ) -> None:
        self.state, self.body, self.id, self.model = state, body, request_id, model
        self.num_prompt_tokens = num_prompt_tokens
        self.created = int(time.time())
        last = body.messages[-1]
        echo = body.echo and last.role == "assistant" and last.content is not None
        self.echo = _plain_message(last)["content"] if echo else ""

    def _logprobs(self, c: CompletionOutput, start: int) -> dict[str, Any] | None:
        if not self.body.logprobs or c.logprobs is None or self.state.token_strings is None:
            return None
        ids, lps = c.token_ids[start:], c.logprobs[start:]
        return {"content": chat_logprobs(self.state.token_strings, ids, lps, self.body.top_logprobs or 0)}

    def _usage(self, output: RequestOutput | None) -> dict[str, Any]:
        completion = sum(len(c.token_ids) for c in output.outputs) if output else 0
        return usage(self.num_prompt_tokens, completion, output.num_cached_tokens if output else 0)

    def _prompt_logprobs(self, output: RequestOutput) -> list[Any] | None:
        if self.body.prompt_logprobs is None or output.prompt_logprobs is None or self.state.token_strings is None:
            return None
        return prompt_logprobs(self.state.token_strings, output.prompt_token_ids, output.prompt_logprobs)

    def response(self, output: RequestOutput) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": self.echo + c.text},
                "logprobs": self._logprobs(c, 0),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in output.outputs
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self._usage(output),
            "system_fingerprint": None,
            "prompt_logprobs": self._prompt_logprobs(output),
        }

    @property
    def include_usage(self) -> bool:
        return usage_options(self.body.stream_options)[0]

    def chunk_encoder(self) -> ChunkEncoder:
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        return ChunkEncoder(head, include_usage=self.include_usage, text_choice=text_choice)

    async def stream(self, streams: list[OutputStream]) -> AsyncIterator[bytes]:
        """The chunks of each engine output in one write (see completions' `stream`); content without logprobs
        that does not finish a choice takes the encoder's fast path."""
        n, chunks = self.body.n, self.chunk_encoder()
        want_logprobs = self.body.logprobs
        delta = {"role": "assistant", "content": self.echo}  # the role first, as OpenAI sends it
        continuous = usage_options(self.body.stream_options)[1]
        running = usage(self.num_prompt_tokens, 0, 0) if continuous else None
        yield b"".join(
            chunks.event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}], running)
            for index in range(n)
        )
        sent_chars, sent_tokens = [0] * n, [0] * n
        finished: set[int] = set()
        last: RequestOutput | None = None
        usage_sent = False
        async for _, output in merge(streams):
            last = output
            events: list[bytes] = []
            for c in output.outputs:
                running = (
                    usage(self.num_prompt_tokens, len(c.token_ids), output.num_cached_tokens) if continuous else None
                )
                if c.index in finished:
                    continue
                delta_text = c.text[sent_chars[c.index] :]
                new_tokens = len(c.token_ids) > sent_tokens[c.index]
                done = c.finish_reason is not None
                if not (delta_text or done or (new_tokens and want_logprobs)):
                    continue
                if not (done or want_logprobs):
                    sent_chars[c.index], sent_tokens[c.index] = len(c.text), len(c.token_ids)
                    events.append(chunks.text(c.index, delta_text, running))
                    continue
                logprobs = self._logprobs(c, sent_tokens[c.index])
                sent_chars[c.index], sent_tokens[c.index] = len(c.text), len(c.token_ids)
                choice: dict[str, Any] = {
                    "index": c.index,
                    "delta": {"content": delta_text} if delta_text or not done else {},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason if done else None,
                }
                if done:
                    choice["stop_reason"] = c.stop_reason
                    finished.add(c.index)
                events.append(chunks.event([choice], running))
            if output.finished and self.include_usage:
                events.append(chunks.event([], self._usage(last)))
                usage_sent = True
            if events:
                yield b"".join(events)
        if self.include_usage and not usage_sent:
            yield chunks.event([], self._usage(last))


def text_choice(index: int, text: str) -> dict[str, Any]:
    """A streamed choice whose delta is content only."""
    return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
