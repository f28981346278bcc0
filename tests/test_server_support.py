"""What the server tests share (no tests here): real uvicorn servers on free loopback ports, one per configuration
and per test process, so the bundled model's step is compiled once for the whole server suite."""

from __future__ import annotations

import dataclasses
import functools
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from jpaged.async_engine import AsyncEngine
from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.request import RequestIdInUseError
from jpaged.server.app import build_app

MODEL_NAME = "stories260K"
API_KEY = "sk-test-key"
# A minimal Llama-2-style template: enough to check that chat goes through the template and the model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} {% endif %}"
)
GREEDY_60 = (
    ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. "
    "She wanted to play with it, but it was too high.\nLily"
)
# Small batches keep the compiled step buckets few (T ∈ {16, 32, 64}); every engine here shares them.
ENGINE_KWARGS: dict[str, Any] = {"max_num_seqs": 32, "max_num_batched_tokens": 64}


@dataclasses.dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    server: uvicorn.Server
    thread: threading.Thread
    app: Starlette
    engine: Any  # the EngineClient the app serves

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(app: Starlette, engine: Any, *, timeout: float = 60.0) -> RunningServer:
    """Runs `app` under uvicorn on a free loopback port in a daemon thread; returns once it accepts requests."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", server, thread, app, engine)


@functools.cache
def template_file() -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="jpaged-chat-")) / "template.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


@functools.cache
def shared_server(*, chat_template: bool = False, api_key: str | None = None, **async_kwargs: Any) -> RunningServer:
    """The bundled model behind a real server; one per distinct configuration, kept for the whole test process."""
    config = EngineConfig(**ENGINE_KWARGS, chat_template=str(template_file()) if chat_template else None)
    engine = AsyncEngine(LLMEngine(config), **async_kwargs)
    app = build_app(engine, served_model_name=MODEL_NAME, api_key=api_key)
    return serve(app, engine)


def wait_idle(server: RunningServer, timeout: float = 30.0) -> dict[str, float]:
    """Polls /metrics until no request runs or waits and the KV pages are all free; returns the last values."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {API_KEY}"}
    while True:
        values = metric_values(httpx.get(server.url + "/metrics", headers=headers).text)
        idle = (
            values["jpaged:num_requests_running"] == 0
            and values["jpaged:num_requests_waiting"] == 0
            and values["jpaged:kv_cache_usage_perc"] == 0
        )
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text → {name: value}, summing over labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


# -- a fake LLMEngine: the AsyncEngine's and the HTTP layer's behaviour without JAX -------------------------------
class FakeLLMEngine:
    """Duck-types the parts of `LLMEngine` that `AsyncEngine` uses. Each step appends one token (" a", id 261) to
    every request until its max_tokens. Knobs: `fail_step` (raise this from step), `block` (a step waits on it),
    `never_finish` (requests run until aborted), `step_delay_s`."""

    TOKEN = 261

    def __init__(self, *, max_model_len: int = 512) -> None:
        from jpaged.outputs import CompletionOutput, RequestOutput
        from jpaged.page_pool import PoolStats

        self._completion_cls, self._output_cls, self._stats_cls = CompletionOutput, RequestOutput, PoolStats
        self.config = EngineConfig()
        self.max_model_len = max_model_len
        self.tokenizer = _bundled_tokenizer()
        self.requests: dict[str, dict[str, Any]] = {}
        self.aborted: list[str] = []
        self.fail_step: BaseException | None = None
        self.block: threading.Event | None = None
        self.never_finish = False
        self.step_delay_s = 0.0
        self.num_steps = 0
        self.pool = self
        self.scheduler = self
        self.num_preemptions = 0

    # scheduler / pool views
    @property
    def running(self) -> list[str]:
        return list(self.requests)

    waiting: list[str] = []  # noqa: RUF012 - read-only

    def stats(self) -> Any:
        used = min(len(self.requests), 100)
        return self._stats_cls(num_pages=100, num_free=100 - used, num_cached=0, prefix_cache_queries=0,
                               prefix_cache_hits=0)  # fmt: skip

    def add_request(self, request_id: str, prompt: Any, params: Any) -> str:
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        if not ids:
            raise ValueError("the prompt is empty")
        if request_id in self.requests:
            raise RequestIdInUseError(f"request id {request_id!r} is already in use")
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        self.requests[request_id] = {"ids": list(ids), "n": params.n, "max": max_tokens, "out": 0}
        return request_id

    def abort_request(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[Any]:
        self.num_steps += 1
        if self.block is not None:
            self.block.wait()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fail_step is not None:
            raise self.fail_step
        outputs = []
        for rid, req in list(self.requests.items()):
            req["out"] += 1
            done = req["out"] >= req["max"] and not self.never_finish
            completions = [
                self._completion_cls(
                    index=i,
                    text=" a" * req["out"],
                    token_ids=[self.TOKEN] * req["out"],
                    cumulative_logprob=None,
                    logprobs=None,
                    finish_reason="length" if done else None,
                )
                for i in range(req["n"])
            ]
            outputs.append(self._output_cls(request_id=rid, prompt=None, prompt_token_ids=req["ids"],
                                            prompt_logprobs=None, outputs=completions, finished=done))  # fmt: skip
            if done:
                del self.requests[rid]
        return outputs


@functools.cache
def _bundled_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EngineConfig().model)


def fake_server(
    *,
    api_key: str | None = None,
    max_body_bytes: int | None = None,
    app_kwargs: dict[str, Any] | None = None,
    **async_kwargs: Any,
) -> tuple[RunningServer, Any]:
    """A real uvicorn server in front of an `AsyncEngine` over a `FakeLLMEngine`: (server, fake engine).
    `api_key`, `max_body_bytes` and `app_kwargs` go to `build_app`, the rest to `AsyncEngine`."""
    fake = FakeLLMEngine()
    engine = AsyncEngine(fake, **async_kwargs)  # type: ignore[arg-type]
    kwargs = dict(app_kwargs or {})
    if api_key is not None:
        kwargs["api_key"] = api_key
    if max_body_bytes is not None:
        kwargs["max_body_bytes"] = max_body_bytes
    return serve(build_app(engine, served_model_name=MODEL_NAME, **kwargs), engine), fake
