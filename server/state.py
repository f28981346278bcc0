"""What every route needs, made once per app: the engine, the served names, limits, metrics and token strings."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from jpaged.async_engine import EngineClient
from jpaged.server.errors import APIError, bad_request, from_validation_error, model_not_found
from jpaged.server.logprobs import TokenStrings
from jpaged.server.metrics import ServerMetrics

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
OFF_LOOP_CHARS = 8192  # texts longer than this are tokenized on a worker thread, so the event loop keeps streaming
# What a token or a chat message weighs against OFF_LOOP_CHARS: ~4 characters a token, and a message's role markup
# (tens of characters in a template): 200,000 empty messages had rendered on the loop, stalling every stream 7.8 s.
CHARS_PER_TOKEN = 4
CHARS_PER_MESSAGE = 32


@dataclasses.dataclass
class ServerState:
    engine: EngineClient
    served_model_names: tuple[str, ...]  # the first is the one responses name when a request names none
    metrics: ServerMetrics
    token_strings: TokenStrings | None  # None when the engine runs without a tokenizer
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    trust_request_chat_template: bool = False  # a request's own chat_template runs only when True
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def resolve_model(self, model: str | None) -> str:
        """The model name a response carries; 404 when the request names a model this server does not serve."""
        if not model:  # null or "": clients that pick no model send either (vLLM serves its model for both)
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise model_not_found(model)
        return model

    def require_tokenizer(self, what: str) -> TokenStrings:
        if self.token_strings is None:
            raise bad_request(f"{what} needs a tokenizer, but this server runs with --skip-tokenizer-init")
        return self.token_strings


async def off_loop_if_long[T](num_chars: int, fn: Callable[[], T]) -> T:
    """Runs `fn` (tokenizing, rendering a template) here when its input is short, on a worker thread when long."""
    return fn() if num_chars <= OFF_LOOP_CHARS else await asyncio.to_thread(fn)


def require_in_vocabulary(token_ids: Iterable[int], tokenizer: Any, param: str) -> None:
    """400 for ids the tokenizer has no text for (checked before decoding: one past 2**32 makes it raise)."""
    vocab = len(tokenizer)
    bad = [t for t in token_ids if t >= vocab]
    if bad:
        raise bad_request(f"{param} holds token ids outside the vocabulary (size {vocab}): {bad[:5]}", param=param)


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


async def read_body[M: BaseModel](request: Request, schema: type[M]) -> M:
    """Reads and validates a JSON body: 413 beyond the size limit, 400 for anything malformed."""
    limit = get_state(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    except (ValueError, RecursionError, json.JSONDecodeError) as exc:  # e.g. nesting too deep for the parser
        raise bad_request(f"The request body could not be parsed: {exc}") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.")
