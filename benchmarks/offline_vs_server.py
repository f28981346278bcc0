"""Server throughput at saturation as a percentage of offline `LLM.generate` on the same requests.

    python benchmarks/offline_vs_server.py --num-requests 200 --input-len 32 --output-len 32

Runs an offline `LLM(**engine flags)` in this process and starts `python -m jpaged serve` with the same engine flags
on a free loopback port; both compile their step buckets first and take one untimed warm-up round. Then, for each of
`--rounds` rounds, one fresh list of requests (random token-id prompts, greedy, exactly `--output-len` tokens each
with ignore_eos) goes through `LLM.generate` and then, all at once (request rate inf), through the server via
benchmarks/serving.py. It prints each round and the ratio of the median output throughputs (goal: the server at
>= 90% of offline), and writes every round with `--json-out`. Where /proc exists, each round also records the CPU
time of the offline engine and of the server, and the CPU time spent elsewhere on the machine meanwhile: on a small
shared machine, a round with much of the latter measures someone else's load, not jpaged.

Engine flags are EngineConfig's (`--max-num-seqs`, `--max-num-batched-tokens`, ...), generated from it; the same
values reach both sides. The load generator runs in this process while the server runs in its own, so on a machine
with few cores the client's CPU time competes with the server's: the default client is aiohttp, the lightest
(vLLM's load generator uses it too); `--backend http` (httpx) and `openai` cost more CPU per token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # the sibling load generator

from jpaged.config import EngineConfig, add_cli_arguments


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields given on the command line with a non-default value."""
    out = {}
    for field in dataclasses.fields(EngineConfig):
        value = getattr(args, field.name, None)
        if value is not None and value != field.default:
            out[field.name] = value
    return out


def serve_argv(overrides: dict[str, Any]) -> list[str]:
    """`jpaged serve` flags for the same engine settings (its flags are generated from EngineConfig too)."""
    argv: list[str] = []
    for name, value in overrides.items():
        if name == "model":
            argv.insert(0, str(value))  # `jpaged serve [MODEL]`
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system, all threads) of a process, this one by default; None where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid or 'self'}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU time every core of the machine has spent busy (not idle or waiting on I/O); None where /proc is missing."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cpu_meter(server_pid: int) -> Iterator[dict[str, float | None]]:
    """Fills the dict, on exit, with the CPU seconds spent meanwhile by this process (`own_cpu_s`: the offline engine
    or the load generator), by the server (`server_cpu_s`), and by everything else on the machine (`other_cpu_s`:
    on a few cores, load from elsewhere that moves the numbers)."""
    before = (cpu_seconds(), cpu_seconds(server_pid), machine_busy_seconds())
    out: dict[str, float | None] = {}
    yield out
    after = (cpu_seconds(), cpu_seconds(server_pid), machine_busy_seconds())
    if None in before or None in after:
        out.update(own_cpu_s=None, server_cpu_s=None, other_cpu_s=None)
        return
    own, server, machine = (b - a for a, b in zip(before, after, strict=True))  # type: ignore[operator]
    out.update(own_cpu_s=own, server_cpu_s=server, other_cpu_s=max(0.0, machine - own - server))


@contextlib.contextmanager
def running_server(overrides: dict[str, Any], *, startup_timeout: float = 600.0) -> Iterator[tuple[str, int]]:
    """Starts `python -m jpaged serve` on a free loopback port; yields its base URL and pid once /health is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "jpaged", "serve", *serve_argv(overrides), "--host", "127.0.0.1", "--port", str(port)]
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}\n{log.read()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not healthy after {startup_timeout:.0f} s: {' '.join(cmd)}")
                time.sleep(0.25)
            yield base_url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def offline_round(llm: Any, requests: Sequence[serving.BenchRequest]) -> dict[str, Any]:
    """One timed `LLM.generate` over every request."""
    from jpaged import SamplingParams

    prompts: list[Any] = [{"prompt_token_ids": list(req.prompt)} for req in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=req.output_len, ignore_eos=True) for req in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    duration = time.perf_counter() - start
    output_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    input_tokens = sum(len(out.prompt_token_ids) for out in outputs)
    return {
        "duration_s": duration,
        "total_output_tokens": output_tokens,
        "request_throughput": len(outputs) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }


def server_round(base_url: str, requests: Sequence[serving.BenchRequest], backend: str) -> dict[str, Any]:
    """Every request sent at once to the server; the load generator's summary."""
    run = serving.run_benchmark(base_url, requests, backend=backend, request_rate=math.inf)
    return serving.summarize(asyncio.run(run), requests)


def compare(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A warm-up round on each side, then `--rounds` timed rounds, offline and server alternating so that load from
    elsewhere on the machine falls on both. Each round has its own prompts (the same on both sides), so no round
    finds the previous one's prompts in the prefix cache."""
    from jpaged import LLM

    def prompts(seed: int) -> list[serving.BenchRequest]:
        return serving.random_token_prompts(
            args.num_requests, args.input_len, args.output_len, vocab_size=args.vocab_size, seed=seed
        )

    warmup = prompts(args.seed + 10_000)
    rounds = [prompts(args.seed + r) for r in range(args.rounds)]
    llm = LLM(**(overrides | {"warmup": True}))  # the server compiles its step buckets at start-up too
    offline_round(llm, warmup)
    offline: list[dict[str, Any]] = []
    server: list[dict[str, Any]] = []
    with running_server(overrides) as (base_url, pid):
        server_round(base_url, warmup, args.backend)
        for r, requests in enumerate(rounds):
            with cpu_meter(pid) as cpu:
                offline.append(offline_round(llm, requests))
            offline[-1] |= {"cpu_s": cpu["own_cpu_s"], "other_cpu_s": cpu["other_cpu_s"]}
            with cpu_meter(pid) as cpu:
                server.append(server_round(base_url, requests, args.backend))
            server[-1] |= {"server_cpu_s": cpu["server_cpu_s"], "other_cpu_s": cpu["other_cpu_s"]}
            ratio = server[-1]["output_throughput"] / offline[-1]["output_throughput"]
            print(
                f"round {r + 1}/{args.rounds}: offline {offline[-1]['output_throughput']:.1f} tok/s, "
                f"server {server[-1]['output_throughput']:.1f} tok/s ({server[-1]['failed']} failed): {ratio:.1%}"
                f"{_cpu_note(offline[-1], server[-1])}",
                flush=True,
            )
    return offline, server


def _cpu_note(offline: dict[str, Any], server: dict[str, Any]) -> str:
    if server["server_cpu_s"] is None:
        return ""
    return (
        f"; CPU s: server {server['server_cpu_s']:.2f}, load generator {server['client_cpu_s']:.2f}, "
        f"elsewhere {offline['other_cpu_s']:.2f} (offline) / {server['other_cpu_s']:.2f} (server)"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=serving.BACKENDS, default="aiohttp", help="the load generator's client")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds on each side (the median counts)")
    parser.add_argument("--json-out", type=Path, default=None, help="write every round and the ratio here")
    serving.add_load_arguments(parser)
    engine = parser.add_argument_group("engine (both sides)")
    add_cli_arguments(engine, exclude=("seed", "warmup"))  # type: ignore[arg-type]
    args = parser.parse_args(argv)
    if args.prompt is not None:
        parser.error("offline_vs_server compares token-id prompts only; drop --prompt")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    overrides = engine_overrides(args)
    load_before = os.getloadavg()
    offline, server = compare(args, overrides)
    load_after = os.getloadavg()
    # Other work on the machine moves these numbers a lot on a few cores: keep the evidence with them.
    machine = {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after}
    median = lambda rows: statistics.median(row["output_throughput"] for row in rows)
    ratio = median(server) / median(offline)
    middle = sorted(server, key=lambda row: row["output_throughput"])[len(server) // 2]
    print(serving.format_table(middle, title=f"Server, median round ({args.backend} client, all at once)"))
    width = 48
    print(f"{' Offline LLM.generate, median round ':=^{width}}")
    row = sorted(offline, key=lambda row: row["output_throughput"])[len(offline) // 2]
    for key, name in (
        ("duration_s", "Duration (s)"),
        ("request_throughput", "Request throughput (req/s)"),
        ("output_throughput", "Output token throughput (tok/s)"),
        ("total_token_throughput", "Total token throughput (tok/s)"),
    ):
        print(f"{name:<36}{row[key]:>12.2f}")
    print(f"{'Server / offline (median tok/s)':<36}{ratio:>11.1%}")
    if middle.get("server_cpu_s") is not None:
        per_token = f"{row['cpu_s'] / row['total_output_tokens'] * 1e3:.3f} / "
        per_token += f"{middle['server_cpu_s'] / middle['total_output_tokens'] * 1e3:.3f}"
        print(f"{'CPU ms per token, offline / server':<36}{per_token:>12}")
        elsewhere = max(r["other_cpu_s"] for r in [*offline, *server])
        print(f"{'CPU s elsewhere, worst round':<36}{elsewhere:>12.2f}")
    loads = f"{load_before[0]:.2f} / {load_after[0]:.2f}"
    print(f"{'Load average (1 min) before / after':<36}{loads:>12}  ({machine['cpus']} CPUs)")
    print("=" * width)
    record = {
        "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
        "seed": args.seed, "rounds": args.rounds, "backend": args.backend, "engine": overrides,
        "offline": offline, "server": server, "server_vs_offline": ratio,
        "server_vs_offline_per_round": [
            s["output_throughput"] / o["output_throughput"] for s, o in zip(server, offline, strict=True)
        ],
        "machine": machine, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


if __name__ == "__main__":
    record = main()
    sys.exit(1 if any(row["failed"] for row in record["server"]) else 0)
