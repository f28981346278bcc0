"""Load generator for an OpenAI-compatible server, like `vllm bench serve`.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --num-requests 200 --request-rate inf \\
        --input-len 32 --output-len 32 --json-out result.json

Sends N streaming `/v1/completions` requests, either all at once (`--request-rate inf`) or with Poisson arrivals at
R requests/s, and reports request throughput, output and total tokens/s, and time to first token (TTFT), time per
output token after the first (TPOT) and inter-token latency (ITL) at p50/p90/p99, plus end-to-end latency.

Prompts are random token ids of exactly `--input-len` tokens (sent as a token-id prompt, so no tokenizer round trip
changes their length), or one fixed text with `--prompt`. Every request asks for exactly `--output-len` tokens
(`max_tokens` plus vLLM's `ignore_eos`), so runs are comparable whatever the model writes.

Timing follows vLLM's definitions: TTFT is from sending the request to the first chunk with text; ITL is the gap
between consecutive chunks with text; TPOT is (latency - TTFT) / (output tokens - 1) per request. Output tokens are
the server's `usage.completion_tokens` (asked for with `stream_options.include_usage`), else the count of text chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PERCENTILES = (50, 90, 99)
BACKENDS = ("openai", "http", "aiohttp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchRequest:
    prompt: list[int] | str  # token ids, or text
    prompt_len: int  # tokens in the prompt (for text prompts: as the server counted them, else 0)
    output_len: int  # max_tokens, with ignore_eos


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchRun:
    results: list[RequestResult]  # in request order
    duration_s: float  # wall time from the first send to the last reply
    client_cpu_s: float  # CPU time this process (the load generator) spent meanwhile
    model: str  # the model name sent


@dataclasses.dataclass(kw_only=True)
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from send to the first chunk with text
    itl: list[float] = dataclasses.field(default_factory=list)  # seconds between consecutive chunks with text
    latency: float = 0.0  # seconds from send to the end of the stream


def random_token_prompts(
    num_requests: int, input_len: int, output_len: int, *, vocab_size: int, seed: int, first_id: int = 3
) -> list[BenchRequest]:
    """`num_requests` prompts of `input_len` uniform token ids in [first_id, vocab_size): no special tokens (the
    bundled llama2.c tokenizer has <unk>, <s>, </s> at 0-2)."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be >= 1, got {input_len} and {output_len}")
    if vocab_size <= first_id:
        raise ValueError(f"vocab_size must be > {first_id}, got {vocab_size}")
    rng = random.Random(seed)
    return [
        BenchRequest(
            prompt=[rng.randrange(first_id, vocab_size) for _ in range(input_len)],
            prompt_len=input_len,
            output_len=output_len,
        )
        for _ in range(num_requests)
    ]


def text_prompts(num_requests: int, text: str, output_len: int) -> list[BenchRequest]:
    return [BenchRequest(prompt=text, prompt_len=0, output_len=output_len) for _ in range(num_requests)]


def request_body(model: str, req: BenchRequest) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class _Clock:
    """Collects one request's chunk arrival times into a RequestResult."""

    def __init__(self, req: BenchRequest) -> None:
        self.result = RequestResult(prompt_len=req.prompt_len)
        self.start = time.perf_counter()
        self.last = 0.0
        self.text_chunks = 0

    def on_text(self) -> None:
        now = time.perf_counter()
        if self.text_chunks == 0:
            self.result.ttft = now - self.start
        else:
            self.result.itl.append(now - self.last)
        self.last = now
        self.text_chunks += 1

    def on_usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.result.output_tokens = int(usage.get("completion_tokens") or 0)
            self.result.prompt_len = int(usage.get("prompt_tokens") or self.result.prompt_len)

    def finish(self) -> RequestResult:
        self.result.latency = time.perf_counter() - self.start
        self.result.output_tokens = self.result.output_tokens or self.text_chunks
        self.result.ok = self.text_chunks > 0
        if not self.result.ok:
            self.result.error = "the stream carried no text"
        return self.result


async def _read_stream(clock: _Clock, req: BenchRequest, lines: AsyncIterator[str]) -> RequestResult:
    """Reads a completions stream's `data: {...}` lines by hand: times the text chunks, takes the usage, stops at
    `data: [DONE]`; an error event ends the request with its message."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        event = json.loads(payload)
        if "error" in event:
            return RequestResult(error=f"stream error: {event['error']}", prompt_len=req.prompt_len)
        if any(choice.get("text") for choice in event.get("choices") or ()):
            clock.on_text()
        clock.on_usage(event.get("usage"))
    return clock.finish()


async def send_http(client: httpx.AsyncClient, model: str, req: BenchRequest) -> RequestResult:
    """One request over plain HTTP with httpx, reading the events by hand."""
    clock = _Clock(req)
    try:
        async with client.stream("POST", "/v1/completions", json=request_body(model, req)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                return RequestResult(error=f"HTTP {resp.status_code}: {body[:300]}", prompt_len=req.prompt_len)
            return await _read_stream(clock, req, resp.aiter_lines())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(error=f"{type(e).__name__}: {e}", prompt_len=req.prompt_len)


async def send_aiohttp(session: Any, model: str, req: BenchRequest) -> RequestResult:
    """One request over plain HTTP with aiohttp (the client of vLLM's load generator), reading the events by hand."""
    import aiohttp

    clock = _Clock(req)
    try:
        async with session.post("/v1/completions", json=request_body(model, req)) as resp:
            if resp.status != 200:
                body = (await resp.read()).decode(errors="replace")
                return RequestResult(error=f"HTTP {resp.status}: {body[:300]}", prompt_len=req.prompt_len)
            return await _read_stream(clock, req, (raw.decode() async for raw in resp.content))  # a line each
    except (aiohttp.ClientError, json.JSONDecodeError) as e:
        return RequestResult(error=f"{type(e).__name__}: {e}", prompt_len=req.prompt_len)


async def send_openai(client: Any, model: str, req: BenchRequest) -> RequestResult:
    """One request through the official async `openai` client."""
    import openai

    clock = _Clock(req)
    try:
        stream = await client.completions.create(
            model=model,
            prompt=req.prompt,
            max_tokens=req.output_len,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if any(choice.text for choice in chunk.choices):
                clock.on_text()
            clock.on_usage(chunk.usage.model_dump() if chunk.usage else None)
    except openai.OpenAIError as e:
        return RequestResult(error=f"{type(e).__name__}: {e}", prompt_len=req.prompt_len)
    return clock.finish()


async def _arrivals(requests: Sequence[BenchRequest], request_rate: float, seed: int) -> AsyncIterator[BenchRequest]:
    """Yields the requests at Poisson arrival times (exponential gaps of mean 1/rate); all at once for rate inf."""
    rng = random.Random(seed)
    for req in requests:
        yield req
        if math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))


async def run_benchmark(
    base_url: str,
    requests: Sequence[BenchRequest],
    *,
    model: str | None = None,
    backend: str = "openai",
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    seed: int = 0,
) -> BenchRun:
    """Sends every request (at `request_rate` per second, Poisson; inf: all at once) and times the replies."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    base_url = base_url.rstrip("/")
    connections = max_concurrency or max(len(requests), 1)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    http = httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(None, connect=30.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(http)
        if model is None:
            resp = await http.get("/v1/models")
            resp.raise_for_status()
            model = str(resp.json()["data"][0]["id"])
        if backend == "aiohttp":
            import aiohttp

            session = await stack.enter_async_context(
                aiohttp.ClientSession(
                    base_url=base_url,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, connect=30.0),
                    connector=aiohttp.TCPConnector(limit=connections),
                )
            )
            send = lambda req: send_aiohttp(session, model, req)
        elif backend == "openai":
            import openai

            # The client brings its own connection pool (up to 1000 connections), so it gets no `http` here.
            client: Any = openai.AsyncOpenAI(
                base_url=base_url + "/v1", api_key=api_key or "EMPTY", max_retries=0, timeout=None
            )
            send = lambda req: send_openai(client, model, req)
        else:
            send = lambda req: send_http(http, model, req)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(req: BenchRequest) -> RequestResult:
            if gate is None:
                return await send(req)
            async with gate:
                return await send(req)

        start, cpu_start = time.perf_counter(), time.process_time()
        tasks = [asyncio.create_task(one(req)) async for req in _arrivals(requests, request_rate, seed)]
        results = list(await asyncio.gather(*tasks))
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return BenchRun(results=results, duration_s=duration, client_cpu_s=cpu, model=model)


def _stats_ms(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    return {
        "mean": float(arr.mean()),
        **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES},
    }


def summarize(run: BenchRun, requests: Sequence[BenchRequest]) -> dict[str, Any]:
    """The run's numbers as a JSON-able dict (the `--json-out` file)."""
    results, duration = run.results, run.duration_s
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": errors[:10],
        "output_len_mismatches": sum(
            r.output_tokens != req.output_len for r, req in zip(results, requests, strict=True) if r.ok
        ),
        "duration_s": duration,
        # The load generator's own CPU time: where it shares few cores with the server, this is taken from it.
        "client_cpu_s": run.client_cpu_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": _stats_ms([r.ttft for r in done]),
        "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": _stats_ms([r.latency for r in done]),
    }


def format_table(summary: dict[str, Any], title: str = "Serving benchmark") -> str:
    rows: list[tuple[str, str]] = [
        ("Successful requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Load generator CPU time (s)", f"{summary['client_cpu_s']:.2f}"),
        ("Total input tokens", f"{summary['total_input_tokens']}"),
        ("Total generated tokens", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    for key, name in (
        ("ttft_ms", "Time to first token"),
        ("tpot_ms", "Time per output token (excl. 1st)"),
        ("itl_ms", "Inter-token latency"),
        ("e2el_ms", "End-to-end latency"),
    ):
        rows.append((f"-- {name} --", ""))
        rows += [
            (f"{stat.capitalize() if stat == 'mean' else stat.upper()} (ms)", f"{value:.2f}")
            for stat, value in summary[key].items()
        ]
    width = max(len(k) for k, _ in rows) + 2 + max(len(v) for _, v in rows)
    lines = [f" {title} ".center(width, "="), *(f"{k:<{width - len(v)}}{v}" for k, v in rows), "=" * width]
    if summary["errors"]:
        lines += ["Errors (first distinct ones):", *(f"  {e}" for e in summary["errors"])]
    return "\n".join(lines)


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    if args.prompt is not None:
        return text_prompts(args.num_requests, args.prompt, args.output_len)
    return random_token_prompts(
        args.num_requests, args.input_len, args.output_len, vocab_size=args.vocab_size, seed=args.seed
    )


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The request-shape flags, shared with offline_vs_server.py."""
    parser.add_argument("--num-requests", type=int, default=100, help="requests to send")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (random token ids)")
    parser.add_argument("--output-len", type=int, default=32, help="generated tokens per request (ignore_eos)")
    parser.add_argument("--prompt", default=None, help="send this text as every prompt instead of random token ids")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="random token ids are drawn below this (default 512: the bundled stories260K)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the prompts and the arrival times")


def parse_rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf, got {text}")
    return rate


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="openai",
        help="the async openai client, or plain HTTP reading the SSE lines with httpx or with aiohttp (the lightest)",
    )
    parser.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    parser.add_argument(
        "--request-rate",
        type=parse_rate,
        default=math.inf,
        help="requests per second, Poisson arrivals; inf sends all at once (default)",
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    parser.add_argument("--json-out", type=Path, default=None, help="write the summary here as JSON")
    add_load_arguments(parser)
    args = parser.parse_args(argv)

    requests = build_requests(args)
    run = asyncio.run(
        run_benchmark(
            args.base_url,
            requests,
            model=args.model,
            backend=args.backend,
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency,
            api_key=args.api_key,
            seed=args.seed,
        )
    )
    summary = summarize(run, requests) | {
        "backend": args.backend,
        "model": run.model,
        "base_url": args.base_url,
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(format_table(summary))
    if args.json_out is not None:
        # json can't write inf; keep the file strict JSON.
        args.json_out.write_text(json.dumps(summary | {"request_rate": str(args.request_rate)}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(1 if summary["failed"] else 0)
