"""Running a request's prompts through the engine for a route: submission, merged outputs, streaming, disconnects.

A route submits every prompt first (`submit`), so a bad one fails the whole request with nothing left running, and
then either streams (`EventStream` over `guard_stream`) or collects (`collect_until_disconnect`).
Either way, a client that leaves aborts its requests in the engine: a stream's body iterator is cancelled and closed,
which closes the engine iterators, which abort; a non-streaming request races its collection against the client's
`http.disconnect` and cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from json.encoder import encode_basestring
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from jpaged.async_engine import EngineDeadError, OutputStream, QueueFullError
from jpaged.engine import Prompt
from jpaged.outputs import RequestOutput
from jpaged.request import RequestIdInUseError
from jpaged.sampling_params import SamplingParams
from jpaged.server.errors import APIError, bad_request, internal_error
from jpaged.server.state import ServerState

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


async def submit(
    state: ServerState, request_id: str, prompts: Sequence[Prompt], params: SamplingParams
) -> list[OutputStream]:
    """Queues every prompt (engine id `{request_id}-{i}`); on any failure aborts the ones already queued."""
    arrival = time.monotonic()
    # All of a request's prompts reach the engine together: awaiting each one's acceptance before sending the next
    # would admit one prompt a step, as the engine thread takes in new requests between steps.
    submissions = [asyncio.ensure_future(state.engine.add_request(f"{request_id}-{i}", prompt, params))
                   for i, prompt in enumerate(prompts)]  # fmt: skip
    try:
        results = await asyncio.gather(*submissions, return_exceptions=True)
    except BaseException:  # cancelled: gather cancelled the pending submissions (they abort); close those accepted
        await close_all([task.result() for task in submissions
                         if task.done() and not task.cancelled() and task.exception() is None])  # fmt: skip
        raise
    streams = [state.metrics.track(r, arrival) for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await close_all(streams)
        exc = failures[0]  # the first prompt's, in order
        if isinstance(exc, RequestIdInUseError):  # named as the client sent it, not as the engine's `{id}-{i}`
            raise bad_request(f"request_id {request_id!r} is already in use by a running request.",
                              param="request_id") from None  # fmt: skip
        if isinstance(exc, ValueError):
            param = "prompt" if "prompt" in str(exc) else None
            raise bad_request(sentence(str(exc)), param=param) from None
        if isinstance(exc, QueueFullError):
            raise APIError(503, sentence(f"{exc}; retry later"), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if isinstance(exc, EngineDeadError):
            raise APIError(503, sentence(str(exc)), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        raise exc
    return streams


async def merge(streams: Sequence[OutputStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with their position; closes all when closed early."""
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: OutputStream) -> None:
        try:
            async for output in stream:
                await queue.put((i, output, None))
            await queue.put((i, None, None))
        except Exception as exc:
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


async def close_all(streams: Sequence[OutputStream]) -> None:
    """Closes engine iterators (aborting the requests still running); a closed or finished one is left as it is."""
    for stream in streams:
        await stream.aclose()


async def collect(streams: Sequence[OutputStream]) -> list[RequestOutput]:
    """The final output of each request, in order."""
    final: list[RequestOutput | None] = [None] * len(streams)
    async for i, output in merge(streams):
        final[i] = output
    if any(out is None or not out.finished for out in final):
        raise RuntimeError("a request ended without a finished output")
    return final  # type: ignore[return-value]


class ClientDisconnected(Exception):
    pass


async def collect_until_disconnect(request: Request, streams: Sequence[OutputStream]) -> list[RequestOutput]:
    """`collect` cancelled if the client disconnects first (then raises ClientDisconnected). The streams are closed
    here whatever happens: a collection cancelled before it first ran never reaches `merge`, which would close them."""
    try:
        return await until_disconnect(request, collect(streams))
    finally:
        await close_all(streams)


async def until_disconnect[T](request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client disconnects first (then raises ClientDisconnected)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """A response's or chunk's `usage`."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def usage_options(stream_options: Any) -> tuple[bool, bool]:
    """(include_usage, continuous usage): the usage chunk at a stream's end; and, as vLLM's
    continuous_usage_stats (with include_usage), each chunk's own choice's usage so far."""
    include = bool(stream_options and stream_options.include_usage)
    return include, include and bool(stream_options.continuous_usage_stats)


def _dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else _dumps(payload)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")

_MARK = "\x00jpaged-text\x00"  # stands for the variable string while a text-choice template is made


class ChunkEncoder:
    """One stream's events, each byte for byte what `sse` makes of the chunk dict (tests/test_server_generation.py).

    A chunk is `{**head, "choices": [...]}`, plus `"usage"` when the request asked for usage: null but on the last
    chunk, or on every chunk the usage so far with `stream_options.continuous_usage_stats` (the callers pass it).
    `head` (id, object, created, model) does not change within a stream, so it is serialized once; and the chunk of
    nearly every token — one choice whose only variable part is its text (no logprobs, not finished) — is made by
    `text` from a template per choice index, at the cost of one string escape instead of a `json.dumps` of nested
    dicts. Every other chunk goes through `event`, the general path.
    """

    def __init__(
        self, head: dict[str, Any], *, include_usage: bool, text_choice: Callable[[int, str], dict[str, Any]]
    ) -> None:
        self._head = head
        self._include_usage = include_usage
        self._text_choice = text_choice  # (choice index, text) -> the choice dict `text` serializes
        self._prefix = f'data: {_dumps(head)[:-1]},"choices":['  # the head without its closing brace
        self._suffix = ',"usage":null}\n\n' if include_usage else "}\n\n"
        self._templates: dict[int, tuple[str, str]] = {}  # choice index -> its JSON before and after the text

    def event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        chunk = self._head | {"choices": choices}
        if self._include_usage:
            chunk["usage"] = usage
        return sse(chunk)

    def text(self, index: int, text: str, usage: dict[str, Any] | None = None) -> bytes:
        """The event of `text_choice(index, text)` (with `usage`, when the request asked for usage)."""
        template = self._templates.get(index)
        if template is None:
            before, after = _dumps(self._text_choice(index, _MARK)).split(_dumps(_MARK))
            template = self._templates[index] = (self._prefix + before, after + "]" + self._suffix)
        tail = template[1]
        if usage is not None and self._include_usage:  # the usage so far in place of the null
            tail = f'{tail[: -len(self._suffix)]},"usage":{_dumps(usage)}}}\n\n'
        return f"{template[0]}{encode_basestring(text)}{tail}".encode()


async def guard_stream(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An error after the headers went out becomes an error event (EventStream then ends the stream as always)."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        error = exc if isinstance(exc, APIError) and exc.status < 500 else None
        if error is None:
            if not isinstance(exc, EngineDeadError):
                logger.error("error while streaming a response", exc_info=exc)
            error = internal_error()
            if isinstance(exc, EngineDeadError):
                error = APIError(500, sentence(f"The request failed: {exc}"))
        yield sse(error.envelope())
    finally:
        await events.aclose()  # type: ignore[attr-defined]


class EventStream(Response):
    """A `text/event-stream` response whose body iterator is always closed, and cancelled if the client leaves.

    Each item of `events` is sent as it comes (one write); `data: [DONE]` goes out with the end of the body.
    `streams`, the engine iterators the events come from, are closed after it: a client that leaves while the
    response's start is being sent cancels the body before it first ran, and closing a generator that never ran does
    not run its cleanup."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], streams: Sequence[OutputStream] = ()) -> None:
        self.events = events
        self.streams = streams
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": DONE, "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        sender, watcher = asyncio.ensure_future(stream()), asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher):
                task.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            await self.events.aclose()  # type: ignore[attr-defined]
            await close_all(self.streams)
        if sender in done and not sender.cancelled() and sender.exception() is not None:
            exc = sender.exception()
            if not isinstance(exc, OSError):  # OSError: the client went away mid-send
                raise exc  # type: ignore[misc]


def sentence(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
