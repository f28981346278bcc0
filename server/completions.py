"""POST /v1/completions: the legacy text-completion API, streamed or not, for one prompt or a batch.

Choice `i * n + j` is sample j of prompt i. `max_tokens` defaults to 16; `max_tokens: 0` with `echo` scores the prompt
(the engine generates one token, which is dropped). `text_offset` counts characters of the returned text.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.async_engine import OutputStream
from jpaged.engine import Prompt
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.server.errors import bad_request
from jpaged.server.generation import (
    ChunkEncoder,
    ClientDisconnected,
    EventStream,
    collect_until_disconnect,
    guard_stream,
    merge,
    submit,
    usage,
    usage_options,
)
from jpaged.server.logprobs import completion_logprobs, prompt_logprobs, text_offsets
from jpaged.server.protocol import CompletionRequest
from jpaged.server.sampling import resolve_max_tokens, sampling_params
from jpaged.server.state import (
    CHARS_PER_MESSAGE,
    CHARS_PER_TOKEN,
    ServerState,
    get_state,
    off_loop_if_long,
    read_body,
    require_in_vocabulary,
)


async def create_completion(request: Request) -> Response:
    state = get_state(request)
    body = await read_body(request, CompletionRequest)
    model = state.resolve_model(body.model)
    if body.suffix is not None:
        raise bad_request("suffix is not supported", param="suffix")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
    prompts = await _prompts(state, body)
    score_only = body.max_tokens == 0
    longest = max(len(ids) for _, ids in prompts)
    max_tokens = resolve_max_tokens(body.max_tokens, longest, state.engine.max_model_len, "prompt")
    want_prompt_lps = [k for k in (body.prompt_logprobs, body.logprobs if body.echo else None) if k is not None]
    params = sampling_params(
        body,
        max_tokens=max(max_tokens, 1),
        logprobs=body.logprobs,
        prompt_logprobs=max(want_prompt_lps) if want_prompt_lps else None,
    )
    if body.logprobs is not None or body.echo:
        state.require_tokenizer("logprobs and echo")
    request_id = body.request_id or f"cmpl-{uuid.uuid4().hex}"
    view = _View(state, body, request_id, model, prompts, score_only)
    engine_prompts: list[Prompt] = [{"prompt": text, "prompt_token_ids": ids} for text, ids in prompts]
    streams = await submit(state, request_id, engine_prompts, params)
    if body.stream:
        return EventStream(guard_stream(view.stream(streams)), streams)
    try:
        outputs = await collect_until_disconnect(request, streams)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(view.response(outputs))


async def _prompts(state: ServerState, body: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) per prompt. Token-id prompts are decoded only for echo (the text is otherwise unused)."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        texts: list[str] = [prompt] if isinstance(prompt, str) else list(prompt)
        if not texts:
            raise bad_request("prompt must not be empty", param="prompt")
        tokenizer = state.engine.tokenizer
        if tokenizer is None:
            raise bad_request("text prompts need a tokenizer; this server runs with --skip-tokenizer-init", "prompt")
        special = body.add_special_tokens
        # each prompt costs a tokenizer call whatever its length: many empty ones are heavy work too
        size = sum(map(len, texts)) + CHARS_PER_MESSAGE * len(texts)
        return await off_loop_if_long(
            size, lambda: [(t, list(tokenizer(t, add_special_tokens=special).input_ids)) for t in texts]
        )
    id_lists: list[list[int]] = [prompt] if prompt and isinstance(prompt[0], int) else list(prompt)
    if not id_lists:
        raise bad_request("prompt must not be empty", param="prompt")
    tokenizer = state.engine.tokenizer
    if not (body.echo and tokenizer is not None):
        return [(None, list(ids)) for ids in id_lists]
    require_in_vocabulary((t for ids in id_lists for t in ids), tokenizer, "prompt")  # echo decodes before the engine
    return await off_loop_if_long(
        CHARS_PER_TOKEN * sum(map(len, id_lists)), lambda: [(tokenizer.decode(ids), list(ids)) for ids in id_lists]
    )


class _View:
    """Turns engine outputs into this request's response or stream chunks."""

    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest,
        request_id: str,
        model: str,
        prompts: list[tuple[str | None, list[int]]],
        score_only: bool,
    ) -> None:
        self.state, self.body, self.id, self.model = state, body, request_id, model
        self.prompts = prompts
        self.score_only = score_only
        self.created = int(time.time())

    def _echo_part(self, i: int, output: RequestOutput) -> tuple[str, list[int], list[Any]]:
        text, ids = self.prompts[i]
        lps: list[Any] = list(output.prompt_logprobs or [None] * len(ids))
        return text or "", ids, lps

    def _logprobs(
        self, ids: list[int], lps: list[Any], text: str, scan: int
    ) -> tuple[dict[str, list[Any]] | None, int]:
        """The tokens' logprobs, their offsets found in the choice's `text` (so far) from `scan`; and the new scan."""
        if self.body.logprobs is None:
            return None, scan
        strings = self.state.token_strings
        assert strings is not None
        k = self.body.logprobs
        lps = [None if lp is None else _trim(lp, k) for lp in lps]
        offsets, scan = text_offsets(text, [strings.text(t) for t in ids], scan)
        return completion_logprobs(strings, ids, lps, offsets), scan

    def _generated(self, c: CompletionOutput) -> tuple[str, list[int], list[Any]]:
        if self.score_only:
            return "", [], []
        lps: list[Any] = list(c.logprobs) if c.logprobs is not None else [None] * len(c.token_ids)
        return c.text, list(c.token_ids), lps

    def _prompt_logprobs(self, output: RequestOutput) -> list[Any] | None:
        if self.body.prompt_logprobs is None or output.prompt_logprobs is None or self.state.token_strings is None:
            return None
        k = self.body.prompt_logprobs
        lps = [None if lp is None else _trim(lp, k) for lp in output.prompt_logprobs]
        return prompt_logprobs(self.state.token_strings, output.prompt_token_ids, lps)

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for i, output in enumerate(outputs):
            for c in output.outputs:
                text, ids, lps = self._generated(c)
                if self.body.echo:
                    p_text, p_ids, p_lps = self._echo_part(i, output)
                    text, ids, lps = p_text + text, p_ids + ids, p_lps + lps
                choices.append(
                    {
                        "index": i * self.body.n + c.index,
                        "text": text,
                        "logprobs": self._logprobs(ids, lps, text, 0)[0],
                        "finish_reason": "length" if self.score_only else c.finish_reason,
                        "stop_reason": c.stop_reason,
                        "prompt_logprobs": self._prompt_logprobs(output),
                    }
                )
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self._usage(outputs),
            "system_fingerprint": None,
        }

    def _usage(self, outputs: Sequence[RequestOutput | None]) -> dict[str, Any]:
        prompt = sum(len(ids) for _, ids in self.prompts)
        completion = 0 if self.score_only else sum(len(c.token_ids) for o in outputs if o for c in o.outputs)
        return usage(prompt, completion, sum(o.num_cached_tokens for o in outputs if o))

    def _choice_usage(self, i: int, c: CompletionOutput, output: RequestOutput) -> dict[str, Any]:
        """Continuous usage stats: the choice's prompt and its tokens so far."""
        return usage(len(self.prompts[i][1]), 0 if self.score_only else len(c.token_ids), output.num_cached_tokens)

    @property
    def include_usage(self) -> bool:
        return usage_options(self.body.stream_options)[0]

    def chunk_encoder(self) -> ChunkEncoder:
        head = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        return ChunkEncoder(head, include_usage=self.include_usage, text_choice=text_choice)

    async def stream(self, streams: list[OutputStream]) -> AsyncIterator[bytes]:
        """The chunks of each engine output in one write: one chunk per choice with news; the usage chunk joins the
        last output's. A token's chunk without logprobs, echo or finish takes the encoder's fast path."""
        n, body, chunks, include_usage = self.body.n, self.body, self.chunk_encoder(), self.include_usage
        want_logprobs = body.logprobs is not None
        sent_chars: dict[int, int] = {}  # choice index -> generated characters sent
        sent_tokens: dict[int, int] = {}  # choice index -> generated tokens sent
        scans: dict[int, int] = {}  # choice index -> where the next token's text_offset is looked for (text_offsets)
        finished: set[int] = set()
        last: list[RequestOutput | None] = [None] * len(streams)
        usage_sent = False
        continuous = usage_options(body.stream_options)[1]
        async for i, output in merge(streams):
            last[i] = output
            events: list[bytes] = []
            for c in output.outputs:
                running = self._choice_usage(i, c, output) if continuous else None
                index = i * n + c.index
                if index in finished:
                    continue
                first = index not in sent_chars
                sent = sent_tokens.get(index, 0)
                text, num_tokens = ("", 0) if self.score_only else (c.text, len(c.token_ids))
                delta = text[sent_chars.get(index, 0) :]
                done = c.finish_reason is not None
                if not (delta or done or first or (num_tokens > sent and want_logprobs)):
                    continue
                sent_chars[index], sent_tokens[index] = len(text), num_tokens
                if not (done or want_logprobs or (first and (body.echo or body.prompt_logprobs is not None))):
                    events.append(chunks.text(index, delta, running))
                    continue
                _, ids, lps = self._generated(c)
                new_ids, new_lps = ids[sent:], lps[sent:]
                echoed = (self.prompts[i][0] or "") if body.echo else ""
                if first and body.echo:
                    _, p_ids, p_lps = self._echo_part(i, output)
                    delta, new_ids, new_lps = echoed + delta, p_ids + new_ids, p_lps + new_lps
                logprobs, scans[index] = self._logprobs(new_ids, new_lps, echoed + text, scans.get(index, 0))
                choice: dict[str, Any] = {
                    "index": index,
                    "text": delta,
                    "logprobs": logprobs,
                    "finish_reason": ("length" if self.score_only else c.finish_reason) if done else None,
                    "stop_reason": c.stop_reason if done else None,
                }
                if first and body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._prompt_logprobs(output)
                if done:
                    finished.add(index)
                events.append(chunks.event([choice], running))
            if output.finished and include_usage and all(out is not None and out.finished for out in last):
                events.append(chunks.event([], self._usage(last)))
                usage_sent = True
            if events:
                yield b"".join(events)
        if include_usage and not usage_sent:
            yield chunks.event([], self._usage(last))


def text_choice(index: int, text: str) -> dict[str, Any]:
    """A streamed choice that carries text only."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None}


def _trim(lp: Any, k: int) -> Any:
    return lp if len(lp.top) <= k else dataclasses.replace(lp, top=lp.top[:k])
