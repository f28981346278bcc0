"""Prometheus metrics with vLLM's names under `jpaged:` (`jpaged:num_requests_running` ↔ `vllm:num_requests_running`).

Two sources:
- the engine's state (running/waiting sequences, KV usage, prefix-cache counters, preemptions) is read from the
  engine's latest `EngineStats` snapshot when /metrics is scraped (`_EngineCollector`);
- per-request latencies and token counts are observed on the way out, by wrapping each request's output iterator
  (`ServerMetrics.track`), so they measure what the HTTP client experiences.

Each app gets its own registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jpaged.async_engine import EngineClient, OutputStream
from jpaged.outputs import RequestOutput

PREFIX = "jpaged:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds), so dashboards built for vLLM read jpaged's histograms the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self._engine = engine
        self._labels = {"model_name": model_name}

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        gauges = (
            ("num_requests_running", "Sequences in the running batch.", stats.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = full).", stats.kv_cache_usage),
        )
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=list(self._labels))
            family.add_metric(list(self._labels.values()), value)
            yield family
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            ("num_preemptions", "Sequences preempted to free KV pages.", stats.num_preemptions),
        )
        for name, doc, value in counters:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=list(self._labels))
            counter.add_metric(list(self._labels.values()), value)
            yield counter


class ServerMetrics:
    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, label = self.registry, ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefill tokens processed.", label, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", label, registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Requests finished, by reason.", [*label, "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token.", label, buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Time per output token after the first.",
            label,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "End-to-end request latency.",
            label,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens", "Prompt tokens per request.", label, buckets=TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            PREFIX + "request_generation_tokens",
            "Generated tokens per request.",
            label,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.registry.register(_EngineCollector(engine, model_name))
        # The children for this model, bound once: `.labels()` per observation costs a lock and a dict lookup.
        m = model_name
        self._prompt_tokens, self._generation_tokens = self.prompt_tokens.labels(m), self.generation_tokens.labels(m)
        self._ttft, self._tpot, self._e2e = self.ttft.labels(m), self.tpot.labels(m), self.e2e.labels(m)
        self._request_prompt_tokens = self.request_prompt_tokens.labels(m)
        self._request_generation_tokens = self.request_generation_tokens.labels(m)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, outputs: OutputStream, arrival: float) -> OutputStream:
        """Passes `outputs` through, observing TTFT, time per output token, end-to-end latency and token counts;
        closing the result closes `outputs` (read or not)."""
        return _Tracked(self, outputs, arrival)


class _Tracked:
    """`Metrics.track`'s pass-through: a class, not an async generator, so that closing it before its first read
    still closes (and so aborts) the request's outputs."""

    __slots__ = ("_arrival", "_generated", "_last_time", "_longest", "_metrics", "_outputs", "_prompt_len")

    def __init__(self, metrics: ServerMetrics, outputs: OutputStream, arrival: float) -> None:
        self._metrics, self._outputs, self._arrival = metrics, outputs, arrival
        self._last_time: float | None = None
        self._generated = 0  # tokens of all samples
        self._longest = 0  # tokens of the longest sample: the n samples of a request decode side by side
        self._prompt_len = 0

    def __aiter__(self) -> _Tracked:
        return self

    async def __anext__(self) -> RequestOutput:
        output = await self._outputs.__anext__()
        m, now = self._metrics, time.monotonic()
        count = sum(len(c.token_ids) for c in output.outputs)
        steps = max(len(c.token_ids) for c in output.outputs) - self._longest
        if self._last_time is None:
            self._prompt_len = len(output.prompt_token_ids)
            m._prompt_tokens.inc(self._prompt_len)
            m._ttft.observe(now - self._arrival)
        elif steps > 0:
            m._tpot.observe((now - self._last_time) / steps)
        if count > self._generated:
            m._generation_tokens.inc(count - self._generated)
        self._generated, self._longest, self._last_time = count, self._longest + max(steps, 0), now
        if output.finished:
            m._e2e.observe(now - self._arrival)
            m._request_prompt_tokens.observe(self._prompt_len)
            m._request_generation_tokens.observe(self._generated)
            for completion in output.outputs:
                m.request_success.labels(m.model_name, completion.finish_reason or "abort").inc()
        return output

    async def aclose(self) -> None:
        await self._outputs.aclose()
