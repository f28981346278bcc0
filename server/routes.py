"""The route table, and the small routes: models, health, metrics, version, tokenize, detokenize, playground."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

import jpaged
from jpaged.server.chat import create_chat_completion, render_messages
from jpaged.server.completions import create_completion
from jpaged.server.errors import APIError, bad_request
from jpaged.server.metrics import CONTENT_TYPE
from jpaged.server.protocol import DetokenizeRequest, TokenizeRequest
from jpaged.server.state import CHARS_PER_TOKEN, get_state, off_loop_if_long, read_body, require_in_vocabulary

_PLACEHOLDER = """<!doctype html><html lang="en"><meta charset="utf-8"><title>jpaged</title>
<h1>jpaged</h1><p>The playground page is not installed. The OpenAI-compatible API is at <code>/v1</code>;
see <a href="/openapi.json">/openapi.json</a>.</p></html>"""


async def list_models(request: Request) -> Response:
    state = get_state(request)
    return JSONResponse({"object": "list", "data": [_card(request, name) for name in state.served_model_names]})


async def retrieve_model(request: Request) -> Response:
    name = get_state(request).resolve_model(request.path_params["model"])
    return JSONResponse(_card(request, name))


def _card(request: Request, name: str) -> dict[str, object]:
    state = get_state(request)
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "jpaged",
        "root": state.engine.model_path,
        "parent": None,
        "max_model_len": state.engine.max_model_len,
    }


async def health(request: Request) -> Response:
    status = get_state(request).engine.health()
    if not status.healthy:
        raise APIError(503, f"The engine is not healthy: {status.reason}.", code="engine_unhealthy")
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


async def version(request: Request) -> Response:
    return JSONResponse({"version": jpaged.__version__})


async def tokenize(request: Request) -> Response:
    state = get_state(request)
    body = await read_body(request, TokenizeRequest)
    state.resolve_model(body.model)
    strings = state.require_tokenizer("tokenize")
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        _, tokens = await render_messages(
            state, body.messages, body.chat_template, body.add_generation_prompt, body.chat_template_kwargs
        )
    else:
        tokenizer, prompt, special = state.engine.tokenizer, body.prompt, body.add_special_tokens
        tokens = await off_loop_if_long(
            len(prompt), lambda: list(tokenizer(prompt, add_special_tokens=special).input_ids)
        )
    result: dict[str, object] = {"count": len(tokens), "max_model_len": state.engine.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        result["token_strs"] = [strings.text(t) for t in tokens]
    return JSONResponse(result)


async def detokenize(request: Request) -> Response:
    state = get_state(request)
    body = await read_body(request, DetokenizeRequest)
    state.resolve_model(body.model)
    state.require_tokenizer("detokenize")
    require_in_vocabulary(body.tokens, state.engine.tokenizer, "tokens")
    tokenizer, tokens = state.engine.tokenizer, body.tokens
    text = await off_loop_if_long(CHARS_PER_TOKEN * len(tokens), lambda: tokenizer.decode(tokens))
    return JSONResponse({"prompt": text})


async def playground(request: Request) -> Response:
    return HTMLResponse(request.app.state.playground_html)


def load_playground() -> str:
    page = resources.files("jpaged.server").joinpath("static/playground.html")
    return page.read_text(encoding="utf-8") if page.is_file() else _PLACEHOLDER


async def openapi(request: Request) -> Response:
    from jpaged.server.openapi import openapi_document

    return JSONResponse(openapi_document(ROUTES))


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    Route("/v1/completions", create_completion, methods=["POST"]),
    Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/version", version, methods=["GET"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/", playground, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
