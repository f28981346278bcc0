"""Every error leaves the server in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

`code` is a string, as OpenAI sends it. Validation problems of any kind (malformed JSON, a wrong type, an out-of-range
value, a prompt too long for the context) are 400s; Starlette's and pydantic's own statuses never reach a client.
A 500 carries a fixed message: the traceback goes to the server log only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client should see, with the status and envelope fields to send."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _CODES.get(status, "error")
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def internal_error() -> APIError:
    return APIError(500, "The server had an error while processing your request; see the server log.")


def from_validation_error(exc: ValidationError) -> APIError:
    """One 400 naming the first bad field; a union's per-branch errors are folded into one message."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("The request body must be a JSON object.")
    loc = _field_path(first["loc"])
    tags = [i for i, p in enumerate(first["loc"]) if _is_tag(p)]
    union = first["loc"][: tags[0]] if tags else ()
    if union and str(union[-1]) in _UNION_HINTS:  # one message for the field, not one per union branch
        loc = _field_path(union)
        message = f"{loc}: {_UNION_HINTS[str(union[-1])]}"
    elif first["type"] == "missing":
        message = f"{loc}: this field is required"
    else:
        message = f"{loc}: {first['msg']}"
        if "input" in first and first["type"] not in ("missing", "extra_forbidden"):
            message += f" (got {_short(first['input'])})"
    return bad_request(message, param=loc)


_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids, or a list of token-id lists (none empty; "
    "token ids >= 0)",
    "stop": "must be a string or a list of strings",
    "content": "must be a string, a list of text parts, or null",
}


def _is_tag(part: Any) -> bool:
    """A union-branch tag pydantic puts in an error's location ("str", "list[int]", "TextContentPart")."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not _is_tag(p)) or "body"


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- Starlette exception handlers ----------------------------------------------------------------------------------
async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message = f"{request.method} {request.url.path} is not a route of this server; see /openapi.json."
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    if status == 422:  # nothing of ours raises it, but a 422 must never reach a client
        status = 400
    return APIError(status, message, headers=dict(exc.headers or {})).response()


async def handle_engine_dead(request: Request, exc: Exception) -> Response:
    """A request in flight when the engine loop died (new requests get a 503 before they start)."""
    return APIError(500, f"The request failed: {exc}.").response()


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """The client left while its request body was arriving: nobody reads an answer, and nothing failed here. 499
    (nginx's "client closed request") for the access log."""
    logger.debug("client left during the upload of %s %s", request.method, request.url.path)
    return Response(status_code=499)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error().response()
