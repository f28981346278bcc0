"""benchmarks/serving.py (the load generator) and benchmarks/offline_vs_server.py: request building, the summary's
arithmetic, and a smoke run of a handful of requests against a real server. No timing assertions."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
from types import ModuleType

import pytest
from conftest import REPO
from test_server_support import shared_server


def _load(name: str) -> ModuleType:
    """Imports benchmarks/<name>.py (benchmarks/ is scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


serving = _load("serving")
offline_vs_server = _load("offline_vs_server")

SUMMARY_FIELDS = {
    "num_requests", "completed", "failed", "errors", "output_len_mismatches", "duration_s", "client_cpu_s",
    "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
    "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms",
}  # fmt: skip
LATENCY_STATS = {"mean", "p50", "p90", "p99"}


def test_random_token_prompts_are_reproducible_and_exact_length():
    a = serving.random_token_prompts(5, 7, 3, vocab_size=512, seed=1)
    b = serving.random_token_prompts(5, 7, 3, vocab_size=512, seed=1)
    c = serving.random_token_prompts(5, 7, 3, vocab_size=512, seed=2)
    assert a == b and a != c
    for req in a:
        assert len(req.prompt) == req.prompt_len == 7 and req.output_len == 3
        assert all(3 <= t < 512 for t in req.prompt)  # no <unk>/<s>/</s>
    with pytest.raises(ValueError, match="input_len"):
        serving.random_token_prompts(1, 0, 3, vocab_size=512, seed=0)


def test_summary_arithmetic():
    reqs = serving.random_token_prompts(3, 4, 5, vocab_size=512, seed=0)
    results = [
        serving.RequestResult(ok=True, prompt_len=4, output_tokens=5, ttft=0.1, itl=[0.1] * 4, latency=0.5),
        serving.RequestResult(ok=True, prompt_len=4, output_tokens=3, ttft=0.3, itl=[0.2, 0.2], latency=0.7),
        serving.RequestResult(error="HTTP 503: busy", prompt_len=4),
    ]
    s = serving.summarize(serving.BenchRun(results=results, duration_s=2.0, client_cpu_s=0.5, model="m"), reqs)
    assert s.keys() >= SUMMARY_FIELDS
    assert (s["completed"], s["failed"], s["errors"], s["output_len_mismatches"]) == (2, 1, ["HTTP 503: busy"], 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (8, 8)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0 and s["total_token_throughput"] == 8.0
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(150.0)  # (0.5-0.1)/4 and (0.7-0.3)/2: 100 and 200 ms
    assert s["itl_ms"]["p99"] == pytest.approx(200.0)
    assert "Failed requests" in serving.format_table(s) and "HTTP 503: busy" in serving.format_table(s)


def test_offline_vs_server_passes_the_same_engine_flags_to_both_sides():
    parser = offline_vs_server.argparse.ArgumentParser()
    offline_vs_server.add_cli_arguments(parser, exclude=("seed",))
    args = parser.parse_args(["--max-num-seqs", "8", "--no-enable-prefix-caching", "--page-size", "16"])
    overrides = offline_vs_server.engine_overrides(args)
    assert overrides == {"max_num_seqs": 8, "enable_prefix_caching": False}  # 16 is the default page size
    assert offline_vs_server.serve_argv(overrides) == ["--max-num-seqs", "8", "--no-enable-prefix-caching"]
    assert offline_vs_server.serve_argv({"model": "/m", "page_size": 8}) == ["/m", "--page-size", "8"]


@pytest.fixture(scope="module")
def server_url() -> str:
    """The bundled model (no chat template, no API key) behind the server suite's shared uvicorn server."""
    return shared_server().url


def test_smoke_run_against_a_real_server(server_url, tmp_path):
    out = tmp_path / "result.json"
    argv = ["--base-url", server_url, "--num-requests", "6", "--input-len", "8", "--output-len", "5", "--seed", "3"]
    serving.main([*argv, "--backend", "http", "--json-out", str(out)])
    summary = json.loads(out.read_text())
    assert summary.keys() >= SUMMARY_FIELDS
    assert (summary["completed"], summary["failed"], summary["output_len_mismatches"]) == (6, 0, 0), summary["errors"]
    assert (summary["total_input_tokens"], summary["total_output_tokens"]) == (6 * 8, 6 * 5)
    assert summary["model"] and summary["request_rate"] == "inf"
    for key in ("duration_s", "request_throughput", "output_throughput", "total_token_throughput"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = summary[key]
        assert stats.keys() == LATENCY_STATS, key
        assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"], key
    assert summary["ttft_ms"]["p50"] <= summary["e2el_ms"]["p50"]

    # The openai client at a finite Poisson rate gets the same tokens.
    again = serving.main([*argv, "--backend", "openai", "--request-rate", "50"])
    assert (again["completed"], again["total_output_tokens"], again["output_len_mismatches"]) == (6, 30, 0)
    assert again["request_rate"] == 50.0 and again["backend"] == "openai"
    # And so does aiohttp, the lightest client (offline_vs_server.py's default).
    light = serving.main([*argv, "--backend", "aiohttp"])
    assert (light["completed"], light["total_output_tokens"], light["output_len_mismatches"]) == (6, 30, 0)
    assert light["ttft_ms"]["p50"] > 0 and light["itl_ms"]["p50"] > 0


def test_aiohttp_backend_reports_http_errors(server_url):
    bad = [serving.BenchRequest(prompt=[1, 2, 3], prompt_len=3, output_len=10**7)]  # beyond the model's context
    run = asyncio.run(serving.run_benchmark(server_url, bad, backend="aiohttp"))
    [result] = run.results
    assert not result.ok and result.error.startswith("HTTP 400:") and "context" in result.error


def test_offline_vs_server_script_parses(capsys):
    with pytest.raises(SystemExit):
        offline_vs_server.main(["--help"])
    assert "--max-num-seqs" in capsys.readouterr().out
