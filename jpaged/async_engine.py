"""The engine behind the server: one thread owns the `LLMEngine`, asyncio talks to it through a queue and callbacks.

Who owns what
- The engine thread (`AsyncEngine.start` creates it) owns the `LLMEngine`: every call into it — `add_request`,
  `abort_request`, `step` — happens on that thread, because the engine is not thread-safe and a step is a blocking JAX
  call. It also writes the heartbeat fields and the `EngineStats` snapshot (one reference swap, read from any thread).
- The event-loop thread owns `_streams` (request id → `_Stream`), the futures of pending submissions, and
  `_unstarted` (the admission count). Nothing on it ever blocks on the engine (`_handoff_lock` is held for a dict
  swap or update only).

How a request flows
1. `add_request` (loop) registers a `_Stream`, puts `_Add` on `_inbox` (a thread-safe `queue.SimpleQueue`) and awaits
   a future.
2. The engine thread drains `_inbox` before every step. It calls `engine.add_request` for each submission and then
   resolves all their futures in one `loop.call_soon_threadsafe` call — with the `ValueError` if validation failed,
   which the server answers with a 400.
3. After each step the thread puts the step's outputs in `_handoff` (request id → newest output, under a lock) and,
   only when `_handoff` was empty, schedules `_dispatch` on the loop with one `call_soon_threadsafe`. So the loop wakes
   at most once per step for all requests, and a loop that fell behind takes several steps' outputs in one wake-up.
   `_dispatch` gives each output to its request's `_Stream`, which keeps only the newest one: outputs are cumulative,
   so a slow reader skips intermediate ones without losing anything (it sends their tokens in one chunk). Each output
   travels with the stream of the submission it belongs to, so one of an aborted request never reaches a later
   submission of the same id.
4. When a reader stops early (client gone, task cancelled), the stream's iterator puts `_Abort` on `_inbox`; the
   thread aborts before its next step, so the request's pages are free within one step.

Failures
- A `ValueError` from `add_request` fails that request only. Any other exception there is a bug: that request fails
  with it (the server answers 500), the engine's half-made request is aborted, and the loop carries on.
- An exception from `step` kills the loop: after a failed step the engine's state is unknown (the KV pages were
  donated to it), so every in-flight request fails with `EngineDeadError`, new requests are refused, and `health()`
  says so. The traceback goes to the log, never to a client.
- `health()` is also unhealthy when the thread has work but has shown no progress for `stall_timeout_s` (a hung step).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from jpaged.outputs import RequestOutput
from jpaged.request import RequestIdInUseError
from jpaged.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from jpaged.engine import LLMEngine, Prompt

logger = logging.getLogger(__name__)

_STATS_INTERVAL_S = 0.1  # the stats snapshot is refreshed at most this often while stepping (and always when idle)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (a step raised, or the engine was shut down); no request can be served."""


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_waiting_requests` requests already; the client should retry later."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What /metrics reports about the engine, as of the engine thread's last snapshot."""

    num_running: int = 0  # sequences in the running batch
    num_waiting: int = 0  # sequences waiting to be scheduled (new or preempted)
    kv_cache_usage: float = 0.0  # fraction of KV pages held by requests (cached free pages count as free)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preemptions: int = 0  # since start


@dataclasses.dataclass(frozen=True)
class Health:
    healthy: bool
    reason: str = ""  # why not, for the 503's message


class OutputStream(Protocol):
    """A request's outputs: an async iterator that the reader closes, which aborts the request if unfinished."""

    def __aiter__(self) -> OutputStream: ...

    async def __anext__(self) -> RequestOutput: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    """What the HTTP server needs from an engine; `AsyncEngine` is the real one, tests pass fakes."""

    tokenizer: PreTrainedTokenizerBase | None  # None when the engine runs without one (token-id prompts only)
    max_model_len: int
    model_path: str

    def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None,
        add_generation_prompt: bool,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> tuple[str, list[int]]: ...

    async def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> OutputStream: ...

    def abort(self, request_id: str) -> None: ...

    def health(self) -> Health: ...

    def stats(self) -> EngineStats: ...


@dataclasses.dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: Any
    params: SamplingParams
    accepted: asyncio.Future[None]
    stream: _Stream  # whose outputs these will be (the engine thread only compares it, never touches it)


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str
    stream: _Stream  # the submission to abort: the id may have been submitted again since


_STOP = object()


class _Aborted(Exception):
    """Ends a stream that `AsyncEngine.abort` stopped."""


class _Stream:
    """One request's outputs on the loop side: the newest output, or the error that ended it.

    One reader at a time. A reader that finds an output waiting takes it without suspending; otherwise it waits on a
    bare future, made only then (an `asyncio.Event` costs more per token).
    """

    __slots__ = ("error", "latest", "waiter")

    def __init__(self) -> None:
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def put(self, output: RequestOutput) -> None:
        self.latest = output
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        if self.latest is None and self.error is None:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if self.latest is not None:
            output, self.latest = self.latest, None
            return output
        assert self.error is not None
        raise self.error


class RequestStream:
    """One request's outputs as an async iterator (`AsyncEngine.add_request`); each read takes the newest.

    Closing it before the request finished aborts the request, as do cancelling a read and dropping it unclosed.
    Unlike an async generator's cleanup, that holds for an iterator closed before its first read (a client that
    leaves while its response starts).
    """

    __slots__ = ("_closed", "_engine", "_finished", "_request_id", "_stream")

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self._engine, self._request_id, self._stream = engine, request_id, stream
        self._finished = False
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed or self._finished:
            raise StopAsyncIteration
        try:
            output = await self._stream.get()
        except _Aborted:
            self._closed = True
            raise StopAsyncIteration from None
        except BaseException:  # cancelled, or the engine died: the request ends with its reader
            await self.aclose()
            raise
        if output.finished:
            self._finished = True
            self._engine._release(self._request_id, self._stream, finished=True)
        return output

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._release(self._request_id, self._stream, finished=self._finished)

    def __del__(self) -> None:
        loop = self._engine._loop
        if not self._closed and not self._finished and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the engine is gone with it
                loop.call_soon_threadsafe(self._engine._release, self._request_id, self._stream, False)


class AsyncEngine:
    """Runs an `LLMEngine`'s step loop on its own thread and serves it to asyncio (see the module docstring)."""

    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_waiting_requests: int | None = None,
        stall_timeout_s: float = 120.0,
    ) -> None:
        from transformers import AutoTokenizer

        self.engine = engine
        self.max_model_len: int = engine.max_model_len
        self.model_path: str = str(engine.config.model)
        # The loop thread tokenizes with its own copy: the engine thread decodes with the engine's concurrently.
        self.tokenizer: PreTrainedTokenizerBase | None = (
            None
            if engine.tokenizer is None
            else AutoTokenizer.from_pretrained(engine.config.tokenizer or engine.config.model)
        )
        self.max_waiting_requests = max_waiting_requests
        self.stall_timeout_s = stall_timeout_s

        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Outputs the engine thread has handed over and the loop has not taken yet (see the module docstring, 3.),
        # each with the stream of the submission it belongs to:
        self._handoff: dict[str, tuple[_Stream | None, RequestOutput]] = {}
        # Engine thread only: the stream of each request id the engine holds. An id aborted and submitted again can
        # have outputs of its first submission still on their way to the loop; they must not reach the second's
        # stream, so outputs travel with their owner and `_dispatch` compares it.
        self._owners: dict[str, _Stream] = {}
        self._handoff_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop thread only:
        self._streams: dict[str, _Stream] = {}
        self._unstarted: set[str] = set()  # accepted requests that have not produced an output yet
        self._accepting: dict[str, asyncio.Future[None]] = {}  # submissions the engine thread has not answered
        # Written by the engine thread, read anywhere:
        self._dead: BaseException | None = None
        self._idle = True  # blocked on an empty inbox with no unfinished requests
        self._heartbeat = time.monotonic()
        self._stats = EngineStats()
        self._stats_time = 0.0

    # -- lifecycle (loop thread) ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread; call from the event loop that will consume the outputs."""
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._fail_all(EngineDeadError("the server is shutting down"))

    # -- requests (loop thread) ----------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> RequestStream:
        """Queues a request and waits until the engine accepted it; returns the iterator of its outputs.

        Raises ValueError (the engine rejected it), QueueFullError or EngineDeadError. The iterator aborts the
        request if it is closed or cancelled before the request finished.
        """
        if self._dead is not None or self._thread is None or self._loop is None:
            raise EngineDeadError(self._death_reason())
        if self.max_waiting_requests is not None and len(self._unstarted) >= self.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
        if request_id in self._streams:
            raise RequestIdInUseError(f"request id {request_id!r} is already in use")
        stream = _Stream()
        self._streams[request_id] = stream
        self._unstarted.add(request_id)
        accepted: asyncio.Future[None] = self._loop.create_future()
        self._accepting[request_id] = accepted
        self._inbox.put(_Add(request_id, prompt, params, accepted, stream))
        try:
            await accepted
        except BaseException as exc:
            if self._streams.get(request_id) is stream:  # else aborted meanwhile, and maybe submitted again
                self._forget(request_id)
            if isinstance(exc, asyncio.CancelledError):
                self._inbox.put(_Abort(request_id, stream))  # it may already be in the engine
            raise
        finally:
            if self._accepting.get(request_id) is accepted:
                del self._accepting[request_id]
        return RequestStream(self, request_id, stream)

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """`add_request` and its outputs in one async generator (errors surface at the first iteration)."""
        outputs = await self.add_request(request_id, prompt, params)
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()

    def abort(self, request_id: str) -> None:
        """Stops a request; its output iterator ends without a finished output."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._unstarted.discard(request_id)
            stream.fail(_Aborted())
            self._inbox.put(_Abort(request_id, stream))

    def _release(self, request_id: str, stream: _Stream, finished: bool) -> None:
        """A reader is done with `stream`: forget a finished request, abort an unfinished one (unless it was aborted
        already, or its id was reused since)."""
        if self._streams.get(request_id) is stream:
            if finished:
                self._forget(request_id)
            else:
                self.abort(request_id)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._unstarted.discard(request_id)

    # -- status (any thread) -------------------------------------------------------------------------------------
    def health(self) -> Health:
        if self._dead is not None or self._thread is None or not self._thread.is_alive():
            return Health(False, self._death_reason())
        silent_for = time.monotonic() - self._heartbeat
        if not self._idle and silent_for > self.stall_timeout_s:
            return Health(False, f"the engine loop has made no progress for {silent_for:.0f} s")
        return Health(True)

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_unstarted(self) -> int:
        return len(self._unstarted)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None,
        add_generation_prompt: bool,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> tuple[str, list[int]]:
        from jpaged.llm import render_chat

        # render_chat reads only `.config` and `.tokenizer`; the view gives it the loop thread's tokenizer.
        view: Any = _ChatView(self.engine.config, self.tokenizer)
        return render_chat(view, messages, chat_template, add_generation_prompt, chat_template_kwargs)

    def _death_reason(self) -> str:
        if self._thread is None:
            return "the engine loop has not started"
        if self._dead is not None:
            return (
                "the engine loop has stopped"
                if isinstance(self._dead, EngineDeadError)
                else (f"the engine loop died ({type(self._dead).__name__}); see the server log")
            )
        return "the engine loop has stopped"

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while self._drain(block=not engine.has_unfinished_requests()):
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    self._heartbeat = time.monotonic()
                    if outputs:
                        self._hand_over(outputs)
                self._snapshot_stats(force=False)
            self._dead = EngineDeadError("the engine loop has stopped")
        except BaseException as exc:
            logger.exception("the engine loop died; failing every in-flight request")
            self._dead = exc
            self._call_soon(self._fail_all, EngineDeadError(self._death_reason()))

    def _drain(self, *, block: bool) -> bool:
        """Applies every queued submission and abort; blocks for the first one when idle. False on shutdown.

        The submissions' futures are resolved together, in one call to the loop, once the inbox is empty."""
        if block:
            self._snapshot_stats(force=True)
            self._idle = True
            item = self._inbox.get()
            self._heartbeat = time.monotonic()
            self._idle = False
        else:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
        answers: list[tuple[asyncio.Future[None], BaseException | None]] = []
        try:
            while True:
                if item is _STOP:
                    return False
                if isinstance(item, _Abort):
                    if self._owners.get(item.request_id) is item.stream:  # else it finished, or never got in
                        del self._owners[item.request_id]
                        self.engine.abort_request(item.request_id)
                else:
                    answers.append((item.accepted, self._add(item)))
                self._heartbeat = time.monotonic()
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    return True
        finally:
            if answers:
                self._call_soon(_resolve_all, answers)

    def _add(self, item: _Add) -> BaseException | None:
        """Adds a submission to the engine; the error to answer it with, or None."""
        try:
            self.engine.add_request(item.request_id, item.prompt, item.params)
        except ValueError as exc:
            return exc
        except Exception as exc:
            logger.exception("add_request(%r) failed", item.request_id)
            self.engine.abort_request(item.request_id)
            return exc
        self._owners[item.request_id] = item.stream
        return None

    def _hand_over(self, outputs: list[RequestOutput]) -> None:
        with self._handoff_lock:
            wake = not self._handoff  # else a `_dispatch` is scheduled already and will take these too
            for output in outputs:
                owner = (self._owners.pop if output.finished else self._owners.get)(output.request_id, None)
                self._handoff[output.request_id] = (owner, output)
        if wake:
            self._call_soon(self._dispatch)

    def _snapshot_stats(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._stats_time < _STATS_INTERVAL_S:
            return
        pool, scheduler = self.engine.pool.stats(), self.engine.scheduler
        self._stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=pool.usage,
            prefix_cache_queries=pool.prefix_cache_queries,
            prefix_cache_hits=pool.prefix_cache_hits,
            num_preemptions=scheduler.num_preemptions,
        )
        self._stats_time = now

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(fn, *args)

    # -- loop-thread callbacks -------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        with self._handoff_lock:
            outputs, self._handoff = self._handoff, {}
        for owner, output in outputs.values():
            stream = self._streams.get(output.request_id)
            if stream is not None and stream is owner:  # else aborted from this side (and maybe submitted again)
                self._unstarted.discard(output.request_id)
                stream.put(output)

    def _fail_all(self, error: BaseException) -> None:
        for future in self._accepting.values():
            _resolve(future, error)
        for stream in self._streams.values():
            stream.fail(error)
        self._unstarted.clear()


@dataclasses.dataclass(frozen=True)
class _ChatView:
    config: Any
    tokenizer: Any


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the submitter was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _resolve_all(answers: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for future, error in answers:
        _resolve(future, error)
