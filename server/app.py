"""The app factory (`build_app`), API-key check, and `jpaged serve`'s flags and entry point (`run_server`).

`build_app` takes anything that implements `EngineClient`, so tests can serve a fake engine; `run_server` builds the
real one: an `LLMEngine` (step buckets compiled at start-up) behind an `AsyncEngine` thread, served by uvicorn.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import gc
import hmac
import html
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from jpaged.async_engine import EngineClient, EngineDeadError
from jpaged.config import BUNDLED_MODEL, add_cli_arguments, config_from_args
from jpaged.server.errors import (
    APIError,
    handle_api_error,
    handle_client_disconnect,
    handle_engine_dead,
    handle_http_exception,
    handle_unexpected,
)
from jpaged.server.logprobs import TokenStrings
from jpaged.server.metrics import ServerMetrics
from jpaged.server.routes import ROUTES, load_playground
from jpaged.server.state import DEFAULT_MAX_BODY_BYTES, ServerState

logger = logging.getLogger(__name__)

# /health is what a load balancer probes without credentials.
UNAUTHENTICATED_PATHS = frozenset({"/health"})
# The playground page: a browser's navigation cannot send a bearer token, so this page also takes HTTP Basic auth
# (any user name, the API key as the password), and its 401 asks the browser to prompt for it.
BASIC_AUTH_PATHS = frozenset({"/"})


class APIKeyMiddleware:
    """401 on every route but /health unless the request carries `Authorization: Bearer KEY` (or, for the playground
    page, HTTP Basic auth with KEY as the password)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def _accepts(self, scheme: str, token: str, *, basic: bool) -> bool:
        if scheme == "bearer":
            given = token.encode()
        elif scheme == "basic" and basic:
            try:
                _, _, password = base64.b64decode(token, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            given = password.encode()
        else:
            return False
        return hmac.compare_digest(given, self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS:
            await self.app(scope, receive, send)
            return
        basic = scope["path"] in BASIC_AUTH_PATHS
        auth = Headers(scope=scope).get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            message = (
                "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
                "(Authorization: Bearer YOUR_KEY)."
            )
        elif not self._accepts(scheme.lower(), token.strip(), basic=basic):
            message = "Incorrect API key provided."
        else:
            await self.app(scope, receive, send)
            return
        challenge = 'Basic realm="jpaged", charset="UTF-8"' if basic else "Bearer"
        response = APIError(401, message, headers={"WWW-Authenticate": challenge}).response()
        await response(scope, receive, send)


def _with_api_key(page: str, api_key: str) -> str:
    """The playground page for a server with a key: only requests that proved they know the key get the page, so
    it may carry the key for its own API calls (the page's key field starts with it)."""
    meta = f'<meta name="jpaged-api-key" content="{html.escape(api_key, quote=True)}">'
    return page.replace("<head>", "<head>\n" + meta, 1)


def build_app(
    engine: EngineClient,
    *,
    served_model_name: str | Sequence[str],
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    trust_request_chat_template: bool = False,
    playground_html: str | None = None,
) -> Starlette:
    names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name)
    if not names:
        raise ValueError("served_model_name needs at least one name")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    middleware = [Middleware(APIKeyMiddleware, api_key=api_key)] if api_key else []
    app = Starlette(
        routes=ROUTES,
        middleware=middleware,
        exception_handlers={
            APIError: handle_api_error,
            ClientDisconnect: handle_client_disconnect,
            HTTPException: handle_http_exception,
            EngineDeadError: handle_engine_dead,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.server = ServerState(
        engine=engine,
        served_model_names=names,
        metrics=ServerMetrics(engine, names[0]),
        token_strings=TokenStrings(engine.tokenizer) if engine.tokenizer is not None else None,
        max_body_bytes=max_body_bytes,
        trust_request_chat_template=trust_request_chat_template,
    )
    page = playground_html if playground_html is not None else load_playground()
    app.state.playground_html = _with_api_key(page, api_key) if api_key else page
    return app


# -- jpaged serve ----------------------------------------------------------------------------------------------------
def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """`jpaged serve [MODEL]`: the engine's flags (from EngineConfig) plus vLLM's server flags."""
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="Hugging Face model folder (default: the bundled stories260K)")  # fmt: skip
    add_cli_arguments(parser, exclude=("model", "warmup"))
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients use for the model; the first is used in responses "
                             "(default: the MODEL argument, or stories260K)")  # fmt: skip
    server.add_argument("--api-key", default=os.environ.get("JPAGED_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health (the playground "
                             "page also takes HTTP Basic auth with KEY as the password, so a browser can open it) "
                             "(default: $JPAGED_API_KEY, else none)")  # fmt: skip
    server.add_argument("--max-waiting-requests", type=int, default=None,
                        help="answer 503 with Retry-After when this many requests wait for the engine "
                             "(default: no cap)")  # fmt: skip
    server.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="answer 413 to larger request bodies")  # fmt: skip
    server.add_argument("--engine-stall-timeout", type=float, default=120.0,
                        help="seconds without progress, while the engine has work, after which "
                             "/health is 503 (default: 120)")  # fmt: skip
    server.add_argument("--trust-request-chat-template", action="store_true",
                        help="let requests bring their own chat_template (a template is code that runs "
                             "on the server)")  # fmt: skip
    server.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per request")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])  # fmt: skip


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from jpaged.async_engine import AsyncEngine
    from jpaged.engine import LLMEngine

    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    model = args.model or str(BUNDLED_MODEL)
    # Compile every step bucket before listening, so no request waits on a compile.
    engine = LLMEngine(config_from_args(args, model=model, warmup=True))
    async_engine = AsyncEngine(
        engine, max_waiting_requests=args.max_waiting_requests, stall_timeout_s=args.engine_stall_timeout
    )
    names = args.served_model_name or [args.model or Path(model).name]
    app = build_app(
        async_engine,
        served_model_name=names,
        api_key=args.api_key,
        max_body_bytes=args.max_request_body_bytes,
        trust_request_chat_template=args.trust_request_chat_template,
    )
    # What exists now (the engine, the model's arrays, every imported module: ~270k objects on the bundled model)
    # lives as long as the server. Freezing it keeps the garbage collector from scanning it again: the full
    # collections that streaming's allocations trigger now and then took 130 ms unfrozen (8 ms frozen) on the 2-core
    # box, holding the GIL the engine thread needs to launch the next step. vLLM's API server freezes its start-up
    # heap too.
    gc.collect()
    gc.freeze()
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"jpaged: serving {names[0]!r}; playground at http://{host}:{args.port}/ "
          f"(OpenAI API at http://{host}:{args.port}/v1)", flush=True)  # fmt: skip
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_graceful_shutdown=5,
    )
    return 0
