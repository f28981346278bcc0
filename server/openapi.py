"""GET /openapi.json: an OpenAPI 3.1 document generated from the route table and the pydantic schemas."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import Route

import jpaged
from jpaged.server import protocol as p

# path -> (summary, request schema, response schema); routes not listed here are documented without bodies.
_DOCS: dict[str, tuple[str, type[BaseModel] | None, type[BaseModel] | None]] = {
    "/v1/models": ("List the served models", None, p.ModelList),
    "/v1/models/{model}": ("Describe one served model", None, p.ModelCard),
    "/v1/completions": ("Create a completion (text/event-stream when stream is true)", p.CompletionRequest,
                        p.CompletionResponse),
    "/v1/chat/completions": ("Create a chat completion (text/event-stream when stream is true)",
                             p.ChatCompletionRequest, p.ChatCompletionResponse),
    "/health": ("200 while the engine loop is alive and making progress, else 503", None, None),
    "/metrics": ("Prometheus metrics (jpaged:*)", None, None),
    "/version": ("Server version", None, p.VersionResponse),
    "/tokenize": ("Tokenize a prompt or a conversation", p.TokenizeRequest, p.TokenizeResponse),
    "/detokenize": ("Turn token ids back into text", p.DetokenizeRequest, p.DetokenizeResponse),
    "/": ("The playground page", None, None),
    "/openapi.json": ("This document", None, None),
}  # fmt: skip
# path -> the schema of each `data:` event when the request streams.
_STREAMS: dict[str, type[BaseModel]] = {
    "/v1/completions": p.CompletionChunk,
    "/v1/chat/completions": p.ChatCompletionChunk,
}
_ERRORS = {
    "400": "Invalid request",
    "401": "Missing or wrong API key",
    "404": "Unknown model or route",
    "413": "Request body too large",
    "500": "Internal error",
    "503": "Engine unhealthy or waiting queue full (see Retry-After)",
}


@functools.cache
def _schemas() -> dict[str, Any]:
    models = {m for _, req, resp in _DOCS.values() for m in (req, resp) if m is not None}
    models |= {p.ErrorResponse, *_STREAMS.values()}
    _, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    return defs.get("$defs", {})


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        path = route.path.replace("{model:path}", "{model}")
        summary, request_schema, response_schema = _DOCS.get(path, (route.name, None, None))
        for method in sorted((route.methods or set()) - {"HEAD"}):
            op: dict[str, Any] = {"summary": summary, "operationId": f"{method.lower()}_{route.name}"}
            if "{model}" in path:
                op["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
            if request_schema is not None:
                body = {"application/json": {"schema": _ref(request_schema)}}
                op["requestBody"] = {"required": True, "content": body}
            ok: dict[str, Any] = {"description": "OK"}
            if response_schema is not None:
                ok["content"] = {"application/json": {"schema": _ref(response_schema)}}
            if path in _STREAMS:
                ok["content"]["text/event-stream"] = {"schema": _ref(_STREAMS[path])}
            error = {"content": {"application/json": {"schema": _ref(p.ErrorResponse)}}}
            op["responses"] = {"200": ok} | {code: {"description": d, **error} for code, d in _ERRORS.items()}
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "jpaged OpenAI-compatible API", "version": jpaged.__version__},
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
