"""`python -m jpaged serve` end to end in a subprocess (flags, printed playground URL, clean shutdown), and a server
whose engine runs without a tokenizer (token-id prompts only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
from test_server_support import API_KEY, ENGINE_KWARGS, free_port, serve, template_file

from jpaged.async_engine import AsyncEngine
from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.server.app import build_app


def test_jpaged_serve_subprocess():
    port = free_port()
    cmd = [
        sys.executable, "-m", "jpaged", "serve", "--port", str(port), "--max-num-batched-tokens", "16",
        "--max-num-seqs", "4", "--api-key", API_KEY, "--served-model-name", "tiny", "other-name",
        "--chat-template", str(template_file()), "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            lines.append(line)
            if "playground at" in line or time.monotonic() > deadline:
                break
        assert f"playground at http://127.0.0.1:{port}/" in "".join(lines), "".join(lines)
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny", "other-name"]
        chat = client.chat.completions.create(model="other-name", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4)  # fmt: skip
        assert chat.model == "other-name" and chat.usage is not None and chat.usage.completion_tokens <= 4
        resp = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
        assert resp.choices[0].text == ", there was a little"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_server_without_tokenizer_takes_token_ids_only():
    engine = AsyncEngine(LLMEngine(EngineConfig(**ENGINE_KWARGS, skip_tokenizer_init=True)))
    running = serve(build_app(engine, served_model_name="ids-only"), engine)
    try:
        client = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0, timeout=120)
        resp = client.completions.create(model="ids-only", prompt=[1, 403, 407, 261, 378], max_tokens=5, temperature=0)
        assert resp.choices[0].finish_reason == "length" and resp.usage is not None
        assert resp.usage.completion_tokens == 5
        for call in (
            lambda: client.completions.create(model="ids-only", prompt="text", max_tokens=2),
            lambda: client.completions.create(model="ids-only", prompt=[1, 2], max_tokens=2, logprobs=1),
            lambda: client.chat.completions.create(model="ids-only", messages=[{"role": "user", "content": "x"}]),
        ):
            try:
                call()
            except openai.BadRequestError as exc:
                assert "tokenizer" in exc.message
            else:
                raise AssertionError("expected a 400")
    finally:
        running.stop()
