"""Where a decode step's time goes: host step times and a jax.profiler trace of steady decode, summarised.

    python benchmarks/profile_step.py --model llama2-7b --batches 128 1 --trace-dir /tmp/jpaged-trace
    python benchmarks/profile_step.py --model jpaged/bundled/stories260K --batches 4 1 --input-len 16

For each batch size B: B requests with random --input-len prompts (greedy, ignore_eos, long enough outputs) are
stepped through prefill and --settle steps of decode (compiling what they need), then --steps steps are timed on
the host (Python's cyclic collector paused, as `LLM.generate` runs its loop, unless --collector-on), each split into
the parts of an engine step (scheduling, packing the step's inputs, the jitted call's
dispatch, waiting for and fetching the samples, turning them into outputs), and --trace-steps more are traced with
`jax.profiler` (a Perfetto trace per batch under --trace-dir). With --replay N, one decode step's jitted call is
then captured and called N times back-to-back in four ways (`replay_step`), which separates the device's own step time
from what the engine's loop adds around it, with no profiler attached. With --hlo-dir, XLA dumps the step's optimised
HLO there and `hlo_inventory` counts each compiled step variant's kernel launches by the source lines that emit them
(a fresh process: XLA reads its dump flags when JAX starts).
The summary reads the trace: device busy time (the sum of kernel durations on the GPU's streams) against the wall
time of the traced steps, the kernels that take the most of it, and the longest idle gaps between consecutive device
events with what came before and after them (an idle gap after a device-to-host copy is the host's turn). The
requests are aborted afterwards, so the pool ends empty.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import itertools
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/profile_step.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
    hlo_inventory,
)
from benchmarks.throughput import make_llm

ENGINE_DEFAULTS = {
    "model": "llama2-7b",
    "load_format": "dummy",
    "dtype": "bfloat16",
    "skip_tokenizer_init": True,
    "warmup": False,  # the settle steps compile what the traced steps run
    "max_num_seqs": 128,
    "max_num_batched_tokens": 8192,
}


HOST_LAUNCH_EVENTS = ("PjRtCApiLoadedExecutable::Execute", "command_buffer::update", "cuGraphLaunch")


def summarise_trace(path: Path, *, num_steps: int, top: int = 15, gap_us: float = 300.0) -> dict[str, Any]:
    """Device busy time, top kernels and idle gaps from a Perfetto JSON trace written by jax.profiler."""
    with gzip.open(path) if path.suffix == ".gz" else path.open() as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in processes.items() if "/device:" in name}
    kernels = sorted(
        (e["ts"], e["dur"], e["name"]) for e in events if e.get("ph") == "X" and e.get("pid") in device_pids
    )
    if not kernels:
        return {"available": False, "processes": sorted(processes.values())}
    busy: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for _, dur, name in kernels:
        busy[name] += dur
        count[name] += 1
    gaps = []
    end = kernels[0][0] + kernels[0][1]
    for (_, _, before), (ts, dur, after) in itertools.pairwise(kernels):
        if ts - end > gap_us:
            gaps.append({"idle_ms": (ts - end) / 1e3, "after": before[:60], "before": after[:60]})
        end = max(end, ts + dur)
    span_ms = (end - kernels[0][0]) / 1e3
    total_ms = sum(busy.values()) / 1e3
    # The host's side of a launch (XLA runs a step as CUDA graphs: each is updated for the step's buffers, then
    # launched, and the device starts it only once the launch returns).
    host_pids = {pid for pid, name in processes.items() if name.startswith("/host:")}
    launch_ms: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in host_pids:
            for prefix in HOST_LAUNCH_EVENTS:
                if e["name"].startswith(prefix):
                    launch_ms[prefix] += e["dur"] / 1e3 / num_steps
    return {
        "available": True,
        "steps": num_steps,
        "device_span_ms_per_step": span_ms / num_steps,
        "device_busy_ms_per_step": total_ms / num_steps,
        "busy_fraction": total_ms / span_ms,
        "idle_gaps_over_threshold_ms_per_step": sum(g["idle_ms"] for g in gaps) / num_steps,
        "gap_threshold_us": gap_us,
        "h2d_copies_per_step": count["MemcpyH2D"] / num_steps,
        "host_launch_ms_per_step": dict(launch_ms),
        "top_kernels": [
            {"name": name[:100], "ms_per_step": us / 1e3 / num_steps, "calls_per_step": count[name] / num_steps}
            for name, us in busy.most_common(top)
        ],
        "longest_gaps": sorted(gaps, key=lambda g: -g["idle_ms"])[:top],
    }


@contextlib.contextmanager
def host_parts(engine: Any) -> Iterator[dict[str, float]]:
    """Seconds spent in each part of the engine's host loop while active (wrappers on the engine's own objects and on
    the runner module's jitted step, removed on exit). "fetch" includes waiting for the device."""
    from jpaged import runner as runner_module
    from jpaged import transfer

    seconds: dict[str, float] = collections.defaultdict(float)
    targets = [(engine.scheduler, "schedule", "schedule"), (engine.runner, "_pack", "pack"), (transfer, "pack", "pack"),
               (runner_module, "_jitted_step", "dispatch"), (engine.runner, "fetch", "fetch"),
               (engine, "_postprocess", "postprocess")]  # fmt: skip

    def timed(fn: Any, part: str) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[part] += time.perf_counter() - t0

        return wrapper

    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    for obj, name, part in targets:
        setattr(obj, name, timed(getattr(obj, name), part))
    try:
        yield seconds
    finally:
        for obj, name, fn in saved:
            if isinstance(obj, types.ModuleType):
                setattr(obj, name, fn)
            else:  # the instance attribute shadowed the method: remove it
                delattr(obj, name)


def decode_tokens(args: argparse.Namespace, batch: int) -> int:
    """Tokens each request may generate: enough that none finishes before the last measured step. With chunked
    prefill the first requests start decoding while the last are still prefilling, one step per chunk (an
    earlier version ran out at --max-num-batched-tokens 2048, and the batch shrank under the timed steps)."""
    prefill_steps = -(-batch * args.input_len // args.max_num_batched_tokens)
    return prefill_steps + args.settle + args.steps + args.trace_steps + 8 + 1 + len(REPLAY_MODES)


def profile_batch(engine: Any, batch: int, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    import jax
    import numpy as np

    from jpaged import SamplingParams
    from jpaged.llm import collector_paused

    rng = np.random.default_rng(args.seed + batch)
    total = decode_tokens(args, batch)
    params = SamplingParams(max_tokens=total, ignore_eos=True, temperature=0.0)
    ids = [f"profile-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, rng.integers(3, vocab, args.input_len).tolist(), params)
    started: set[str] = set()
    while len(started) < batch:  # prefill (possibly chunked) until every request has its first token
        started |= {o.request_id for o in engine.step() if o.outputs[0].token_ids}
    # Compiles are counted in each phase: one in the timed or traced steps (a variant the settle steps did not reach;
    # XLA's GEMM autotuning shows in a trace as redzone and comparison kernels) makes their figures a compile's.
    compiles = {phase: common.CompileCounter() for phase in ("settle", "timed", "traced", "replay")}
    with compiles["settle"]:
        for _ in range(args.settle):
            engine.step()
    times: list[float] = []
    live: list[int] = []  # sequences running after each timed step: the batch measured

    # the cyclic collector paused as `LLM.generate` runs its loop (--collector-on: as a hand-written loop runs)
    def paused() -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if args.collector_on else collector_paused()

    with paused(), host_parts(engine) as parts, compiles["timed"]:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
            live.append(len(engine.scheduler.running))
    trace_dir = Path(args.trace_dir) / f"batch{batch}"
    traced_s = 0.0
    if args.trace_steps:
        options = jax.profiler.ProfileOptions()
        # Python's tracer costs the host several times its own work per step and so stretches exactly the host gaps
        # this trace is read for: off unless asked.
        options.python_tracer_level = 1 if args.python_trace else 0
        jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True, profiler_options=options)
        t0 = time.perf_counter()
        with compiles["traced"]:
            for _ in range(args.trace_steps):
                engine.step()
        traced_s = time.perf_counter() - t0
        jax.profiler.stop_trace()
    with compiles["replay"], paused():
        replay = replay_step(engine, args.replay) if args.replay else None
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    if replay:  # the replays rewrote KV slots of pages the prefix cache may hold: nothing may find them again
        engine.pool.reset_prefix_cache()
    traces = sorted(trace_dir.rglob("*perfetto_trace.json.gz")) if args.trace_steps else []
    result: dict[str, Any] = {
        "batch": batch,
        "input_len": args.input_len,
        "host_step_ms_median": statistics.median(times) * 1e3,
        "host_step_ms_min": min(times) * 1e3,
        "running_min_max": [min(live), max(live)],
        "host_parts_ms_per_step": {part: s * 1e3 / args.steps for part, s in parts.items()},
        "traced_step_ms": traced_s / args.trace_steps * 1e3 if args.trace_steps else None,
        "compiles": {phase: counter.count for phase, counter in compiles.items()},
        "trace": str(traces[-1]) if traces else None,
        "replay": replay,
    }
    if traces:
        result["summary"] = summarise_trace(traces[-1], num_steps=args.trace_steps)
    return result


# How replay_step calls a captured step again: where its packed input comes from, and what the host does per call.
REPLAY_MODES = {
    "resident": "the packed input already on the device; calls back-to-back, one wait at the end",
    "upload": "the packed input from host memory each call (one host-to-device copy, as the runner does)",
    "upload+fetch": "as upload, and each call's samples copied to the host once the next call is dispatched",
    "engine": "as upload+fetch, plus the runner's early copy_to_host_async of the samples",
}


def replay_step(engine: Any, calls: int) -> dict[str, Any]:
    """Captures the jitted call of the engine's next step and calls it `calls` times in each of REPLAY_MODES, each
    call fed the KV pages (donated) and last samples of the one before, as the engine does. Returns ms per call by
    mode. The steady step's period in the engine against "resident" is what the host loop costs the device; the
    modes in between say which part. The replays rewrite the captured step's own KV slots; the caller aborts the
    requests afterwards."""
    import jax
    import numpy as np

    from jpaged import runner as runner_module

    runner = engine.runner
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    original = runner_module._jitted_step

    def capture(*a: Any, **k: Any) -> Any:
        captured.append((a, k))
        return original(*a, **k)

    runner_module._jitted_step = capture  # type: ignore[assignment]  # a spy, removed below
    try:
        engine.step()
    finally:
        runner_module._jitted_step = original
    (args, kwargs), *_ = captured
    params, _, packed, _ = args
    host_packed = np.asarray(packed)
    # Uncommitted, as jit treats a numpy argument: no new compile. With tensor parallelism this single-device copy is
    # moved to the mesh on each call, so "resident" is only resident on one device.
    device_packed = jax.device_put(host_packed)
    result: dict[str, Any] = {"calls": calls, "modes": REPLAY_MODES, "ms_per_call": {}}
    kv, last = runner.kv_pages, runner._last_samples
    try:
        for mode in REPLAY_MODES:
            engine.step()  # the engine's next step in flight; the untimed call below queues behind it
            kv, last = runner.kv_pages, runner._last_samples
            packed_in = device_packed if mode == "resident" else host_packed
            pending = None
            with jax.set_mesh(runner.mesh):  # one untimed call (a compile would show in the caller's count)
                kv, _, _, last = original(params, kv, packed_in, last, **kwargs)
            jax.block_until_ready((kv, last))  # the clock starts with nothing queued
            t0 = time.perf_counter()
            with jax.set_mesh(runner.mesh):
                for _ in range(calls):
                    kv, sampled, _, last = original(params, kv, packed_in, last, **kwargs)
                    if mode == "engine":
                        sampled.token_ids.copy_to_host_async()
                    if mode in ("upload+fetch", "engine"):
                        if pending is not None:
                            np.asarray(pending)
                        pending = sampled.token_ids
                jax.block_until_ready((kv, last))
            result["ms_per_call"][mode] = (time.perf_counter() - t0) / calls * 1e3
            runner.kv_pages, runner._last_samples = kv, last
    finally:  # the pages the engine holds must be live ones: each call donated the ones before
        runner.kv_pages, runner._last_samples = kv, last
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 1])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--settle", type=int, default=8, help="decode steps before timing (compiles the bucket)")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed on the host")
    parser.add_argument("--trace-steps", type=int, default=10, help="decode steps traced")
    parser.add_argument("--trace-dir", default="/tmp/jpaged-trace")
    parser.add_argument(
        "--python-trace",
        action="store_true",
        help="also trace Python function calls (slows the host several times over)",
    )
    parser.add_argument("--replay", type=int, default=0,
                        help="then call one captured decode step N times in each replay mode (0: none)")  # fmt: skip
    parser.add_argument("--hlo-dir", default=None,
                        help="dump the step's optimised HLO here; count its launches by source line")  # fmt: skip
    parser.add_argument("--collector-on", action="store_true",
                        help="time the host steps with Python's cyclic collector running (default: paused, as in "
                             "LLM.generate)")  # fmt: skip
    common.add_output_arguments(parser)
    common.add_engine_arguments(parser, ENGINE_DEFAULTS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replay < 0:
        parser.error(f"--replay must be >= 0, got {args.replay}")
    if args.hlo_dir:
        import jax
        from jax._src import xla_bridge  # no public way to ask whether the backends have started

        if Path(args.hlo_dir).exists() and any(Path(args.hlo_dir).iterdir()):
            parser.error(f"--hlo-dir {args.hlo_dir} is not empty: its old dumps would be counted")
        if xla_bridge.backends_are_initialized():
            parser.error("--hlo-dir needs a fresh process: XLA reads its dump flags when JAX starts")
        dump = f'--xla_dump_to="{args.hlo_dir}" --xla_dump_hlo_as_text --xla_dump_hlo_module_re=_step'
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {dump}".strip()  # later flags win
        jax.config.update("jax_enable_compilation_cache", False)  # the dump flags are not in its key
    model_dir = common.resolve_model(args.model)
    shape = common.ModelShape.from_config(model_dir, "bfloat16" if args.dtype == "auto" else args.dtype)
    longest = args.input_len + max(decode_tokens(args, batch) for batch in args.batches)
    overrides = argparse.Namespace(**vars(args))
    overrides.max_num_seqs = max(args.max_num_seqs, max(args.batches))
    llm, info = make_llm(overrides, -(-longest // args.page_size) * args.page_size)
    record: dict[str, Any] = {
        "benchmark": "profile_step",
        "env": common.env_info(jax_devices=True),
        "model": shape.summary(),
        "args": vars(args),
        "engine_info": info,
        "runs": [],
    }
    for batch in args.batches:
        run = profile_batch(llm.engine, batch, args, shape.vocab)
        record["runs"].append(run)
        common.save(args, record)
        s = run.get("summary") or {}
        host, traced = run["host_step_ms_median"], run["traced_step_ms"]
        traced_text = f", {traced:.2f} ms while traced" if traced is not None else ""
        print(f"### batch {batch}: host step {host:.2f} ms (median){traced_text}; per step, "
              + ", ".join(f"{part} {ms:.2f} ms" for part, ms in run["host_parts_ms_per_step"].items()))  # fmt: skip
        if run["replay"]:
            print(f"replayed step, ms per call ({run['replay']['calls']} calls): "
                  + ", ".join(f"{mode} {ms:.2f}" for mode, ms in run["replay"]["ms_per_call"].items()))  # fmt: skip
        if run["running_min_max"][0] < batch:
            print(f"WARNING: only {run['running_min_max'][0]} of {batch} sequences ran through the timed steps")
        if run["compiles"]["timed"] or run["compiles"]["traced"] or run["compiles"]["replay"]:
            print(f"WARNING: compiles during the measured steps ({run['compiles']}): raise --settle")
        if s.get("available"):
            print(f"device busy {s['device_busy_ms_per_step']:.2f} ms of a {s['device_span_ms_per_step']:.2f} ms span "
                  f"per step ({s['busy_fraction']:.0%}); idle gaps > {s['gap_threshold_us']:.0f} us: "
                  f"{s['idle_gaps_over_threshold_ms_per_step']:.2f} ms per step")  # fmt: skip
            print(f"host-to-device copies per step: {s['h2d_copies_per_step']:.1f}; host launch ms per step: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in s["host_launch_ms_per_step"].items()))  # fmt: skip
            print(common.table(s["top_kernels"], [("kernel", "name"), ("ms/step", "ms_per_step"),
                                                  ("calls/step", "calls_per_step")]))  # fmt: skip
            print(common.table(s["longest_gaps"][:6], [("idle ms", "idle_ms"), ("after", "after"),
                                                       ("before", "before")]))  # fmt: skip
    if args.hlo_dir:
        dumps = sorted(Path(args.hlo_dir).glob("*_step*after_optimizations.txt"))
        if not dumps:
            print(f"WARNING: no step HLO dumped under {args.hlo_dir}")
        record["hlo_inventory"] = hlo_inventory.main([*map(str, dumps), "--top", "25"])["modules"] if dumps else []
        common.save(args, record)
    return record


if __name__ == "__main__":
    main()
