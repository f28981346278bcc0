"""Offline throughput of `LLM.generate`, like `vllm bench throughput`, against HF transformers and the roofline.

    python benchmarks/throughput.py --model llama2-7b --workload fixed --num-requests 128 --engine both
    python benchmarks/throughput.py --model llama2-7b --workload sharegpt-synthetic --num-requests 256
    python benchmarks/throughput.py --model jpaged/bundled/stories260K --num-requests 8 --input-len 16 --output-len 8

Workloads (token-id prompts drawn with a fixed seed, every request `ignore_eos` so it yields exactly the tokens it
asked for; temperature 1, as vLLM's benchmark):
- `fixed`: N requests of --input-len (512) prompt and --output-len (256) output tokens;
- `sharegpt-synthetic`: prompt and output lengths log-normal (sigma --sigma) with the means ShareGPT is reported
  to have (--mean-input-len 202, --mean-output-len 179), clipped to [--min-len 4, --max-len 1024]; mu is solved so
  that the clipped sample's mean is the target.
Several --workload and --num-requests values run one after the other on the same engine (one load, one warm-up);
each run draws its own prompts, so the prefix cache never serves one run from another.

Engines: `jpaged` (in this process; every EngineConfig field is a flag, with benchmark defaults: --load-format dummy,
--dtype bfloat16, --skip-tokenizer-init, --warmup, --max-num-seqs 256, --max-num-batched-tokens 8192, and
--max-model-len the longest request rounded up to a page), `hf` (HF `generate()` in a child process that never
starts JAX: benchmarks/hf_generate.py, static batches of --batch-size), or `both` (HF first, then jpaged, and the
ratio).

Roofline (common.py): while jpaged runs, each scheduled step's sequences are recorded as (new tokens, context
before). The run's floor is the sum over its steps of max((weights + KV read) / 4.28 TB/s, FLOPs / 659 TFLOP/s):
the time the batches the engine actually held would take at the ceilings. `of_roofline` = floor / wall time. Also
given, the decode-dominated shorthand: steps x (weights + mean KV per step) / 4.28 TB/s, and `of_in_sequence_floor`:
the same against the floor with each step's weight matmuls and attention meeting their own rooflines one after the
other (higher than the roofline where decode batches near 256 make the matmuls compute-bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)

WORKLOADS = ("fixed", "sharegpt-synthetic")
# Benchmark defaults for EngineConfig fields (applied only to fields the config has).
ENGINE_DEFAULTS = {
    "model": "llama2-7b",
    "load_format": "dummy",
    "dtype": "bfloat16",
    "skip_tokenizer_init": True,
    "warmup": True,
    "max_num_seqs": 256,
    "max_num_batched_tokens": 8192,
}


# -- workloads --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def longest(self) -> int:
        return max(len(p) + o for p, o in zip(self.prompts, self.output_lens, strict=True))

    def describe(self) -> dict[str, Any]:
        ins = [len(p) for p in self.prompts]
        return {
            "workload": self.name,
            "num_requests": self.num_requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "mean_input_len": self.input_tokens / self.num_requests,
            "mean_output_len": self.output_tokens / self.num_requests,
            "max_input_len": max(ins),
            "max_output_len": max(self.output_lens),
        }


def lognormal_lengths(rng: Any, n: int, mean: float, sigma: float, low: int, high: int) -> list[int]:
    """n log-normal lengths clipped to [low, high] whose sample mean is `mean` (mu found by bisection)."""
    import numpy as np

    z = rng.standard_normal(n)

    def lengths(mu: float) -> Any:
        return np.clip(np.rint(np.exp(mu + sigma * z)), low, high).astype(int)

    lo, hi = math.log(low) - 6 * sigma, math.log(high) + 6 * sigma
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if lengths(mid).mean() < mean else (lo, mid)
    return lengths((lo + hi) / 2).tolist()


def make_workload(kind: str, num_requests: int, *, vocab_size: int, seed: int, args: argparse.Namespace) -> Workload:
    import numpy as np

    # One stream per (kind, size): runs in one process never share prompts (no prefix-cache hits across runs).
    rng = np.random.default_rng([seed, WORKLOADS.index(kind), num_requests])
    if kind == "fixed":
        ins, outs = [args.input_len] * num_requests, [args.output_len] * num_requests
    elif kind == "sharegpt-synthetic":
        ins = lognormal_lengths(rng, num_requests, args.mean_input_len, args.sigma, args.min_len, args.max_len)
        outs = lognormal_lengths(rng, num_requests, args.mean_output_len, args.sigma, args.min_len, args.max_len)
    else:
        raise ValueError(f"unknown workload {kind!r} (choose from {', '.join(WORKLOADS)})")
    low = min(3, vocab_size - 1)  # skip the usual pad/bos/eos ids
    prompts = [rng.integers(low, vocab_size, n).tolist() for n in ins]
    return Workload(kind, prompts, outs)


# -- jpaged -----------------------------------------------------------------------------------------------------------
class StepRecorder:
    """Wraps the engine's `scheduler.schedule` to keep, per step, each sequence's (new tokens, context before), and
    its runner's `fetch` to keep when each step's samples reached the host and whether it was decode-only."""

    def __init__(self, engine: Any) -> None:
        self.steps: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.fetches: list[tuple[bool, float]] = []  # (decode-only, perf_counter() as fetch returned) per step
        self._scheduler: Any = getattr(engine, "scheduler", None)
        self._runner: Any = getattr(engine, "runner", None)
        self.available = callable(getattr(self._scheduler, "schedule", None))
        self._timed = callable(getattr(self._runner, "fetch", None))

    def __enter__(self) -> StepRecorder:
        if self.available:
            original_schedule, steps = self._scheduler.schedule, self.steps

            def schedule(*a: Any, **k: Any) -> Any:
                out = original_schedule(*a, **k)
                if out.requests:
                    steps.append((tuple(out.num_new_tokens), tuple(r.num_computed_tokens for r in out.requests)))
                return out

            self._scheduler.schedule = schedule
        if self._timed:
            original_fetch, fetches = self._runner.fetch, self.fetches

            def fetch(step: Any, *a: Any, **k: Any) -> Any:
                out = original_fetch(step, *a, **k)
                fetches.append((all(n == 1 for n in step.sched.num_new_tokens), time.perf_counter()))
                return out

            self._runner.fetch = fetch
        return self

    def __exit__(self, *exc: object) -> None:
        # the instance attributes go; the classes' methods show through again
        if self.available:
            del self._scheduler.schedule
        if self._timed:
            del self._runner.fetch

    def roofline(self, shape: common.ModelShape, bandwidth: float, peak: float) -> dict[str, Any]:
        if not self.steps:
            return {"available": False}
        floor = mem = compute = in_sequence = 0.0
        decode_batches: list[int] = []
        kv_tokens: list[int] = []
        for new, before in self.steps:
            r = shape.step_floor_s(zip(new, before, strict=True), bandwidth=bandwidth, peak_flops=peak)
            floor += r["floor_s"]
            mem += r["memory_s"]
            compute += r["compute_s"]
            in_sequence += r["in_sequence_s"]
            kv_tokens.append(sum(new) + sum(before))
            if all(n == 1 for n in new):
                decode_batches.append(len(new))
        n_steps = len(self.steps)
        mean_kv = sum(kv_tokens) / n_steps
        shorthand = n_steps * (shape.weight_bytes + mean_kv * shape.kv_bytes_per_token) / bandwidth
        return {
            "available": True,
            "steps": n_steps,
            "decode_steps": len(decode_batches),
            "mean_decode_batch": sum(decode_batches) / len(decode_batches) if decode_batches else None,
            "max_batch": max(len(new) for new, _ in self.steps),
            "mean_kv_tokens_per_step": mean_kv,
            "floor_s": floor,
            "memory_bound_s": mem,
            "compute_bound_s": compute,
            "in_sequence_s": in_sequence,
            "shorthand_s": shorthand,
            "method": "sum over recorded steps of max((weights read + KV of the step's contexts) / bandwidth, "
            "step FLOPs / peak); shorthand = steps x (weights + mean KV per step) / bandwidth; in_sequence = sum "
            "over steps of max(weights / bandwidth, matmul FLOPs / peak) + max(KV / bandwidth, attention FLOPs / "
            "peak), the floor with the matmuls and the attention one after the other (common.ModelShape.step_floor_s)",
        }

    def timeline(self, start: float, end: float) -> dict[str, Any]:
        """Where the wall time went, by the host clock. Each step is charged the interval from the previous step's
        fetch returning to its own (in a steady state, one step's device time, with async scheduling or without);
        the first step also carries the time to add the requests and launch it, and the drain is what follows the
        last fetch. The parts add up to the wall time."""
        return timeline(self.fetches, start, end)


def timeline(fetches: Sequence[tuple[bool, float]], start: float, end: float) -> dict[str, Any]:
    """`StepRecorder.timeline` over (decode-only, time its samples were fetched) per step, in fetch order."""
    import numpy as np

    if not fetches:
        return {"available": False}
    decode = np.asarray([d for d, _ in fetches], dtype=bool)
    times = np.asarray([t for _, t in fetches])
    gaps = np.diff(times, prepend=start)  # step i: from fetch i - 1 (or the start) to fetch i
    d = gaps[1:][decode[1:]]  # the first step's interval also holds the run's start
    return {
        "available": True,
        "first_step_s": float(gaps[0]),
        "prefill_or_mixed_steps": int((~decode[1:]).sum()),
        "prefill_or_mixed_s": float(gaps[1:][~decode[1:]].sum()),
        "decode_steps": int(decode[1:].sum()),
        "decode_s": float(d.sum()),
        "decode_step_ms": {q: float(np.percentile(d, p)) * 1e3 for q, p in (("p10", 10), ("p50", 50), ("p90", 90))}
        if d.size
        else None,
        "drain_s": end - float(times[-1]),
        "method": "host time between consecutive runner.fetch returns, charged to the step fetched; the first step "
        "from the start of the run",
    }


class LogCapture(logging.Handler):
    """Keeps jpaged's INFO lines (KV pool size, warm-up) for the JSON."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> LogCapture:
        logger = logging.getLogger("jpaged")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("jpaged")
        logger.removeHandler(self)
        logger.setLevel(self._level)

    def warmup_s(self) -> float | None:
        for line in self.lines:
            if m := re.search(r"warm-up: \d+ buckets compiled in ([\d.]+) s", line):
                return float(m.group(1))
        return None


def engine_config(args: argparse.Namespace, max_model_len: int | None) -> Any:
    from jpaged.config import EngineConfig, config_from_args

    overrides: dict[str, Any] = {"model": str(common.resolve_model(args.model))}
    if args.max_model_len is None and max_model_len is not None:
        overrides["max_model_len"] = max_model_len
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    if "skip_tokenizer_init" not in fields:
        raise SystemExit("this jpaged has no EngineConfig.skip_tokenizer_init; the benchmark configs have no tokenizer")
    return config_from_args(args, **overrides)


def make_llm(args: argparse.Namespace, max_model_len: int | None) -> tuple[Any, dict[str, Any]]:
    """Builds the LLM, timing the load and warm-up, and returns it with what it said about itself."""
    from jpaged import LLM

    config = engine_config(args, max_model_len)
    with LogCapture() as logs:
        t0 = time.perf_counter()
        llm = LLM(**dataclasses.asdict(config))
        init_s = time.perf_counter() - t0
    runner = llm.engine.runner
    info = {
        "config": dataclasses.asdict(config),
        "init_s": init_s,
        "warmup_s": logs.warmup_s(),
        "kv_cache_GB": getattr(runner, "kv_cache_bytes", 0) / 1e9,
        "num_pages": getattr(getattr(llm.engine, "pool", None), "num_pages", None),
        "engine_log": logs.lines[-20:],
    }
    common.log(
        f"jpaged: {Path(config.model).name} ready in {init_s:.1f} s (warm-up {info['warmup_s']} s), "
        f"KV cache {info['kv_cache_GB']:.2f} GB"
    )
    return llm, info


def sampling_params(workload: Workload, temperature: float) -> list[Any]:
    from jpaged import SamplingParams

    return [
        SamplingParams(max_tokens=o, ignore_eos=True, temperature=temperature, top_p=1.0) for o in workload.output_lens
    ]


def run_jpaged(llm: Any, workload: Workload, args: argparse.Namespace, shape: common.ModelShape) -> dict[str, Any]:
    engine = llm.engine
    if args.warmup_requests:
        k = min(args.warmup_requests, workload.num_requests)
        warm = Workload(
            "warm-up",
            [[t + 1 if t + 1 < shape.vocab else 3 for t in p] for p in workload.prompts[:k]],
            [min(4, o) for o in workload.output_lens[:k]],
        )
        t0 = time.perf_counter()
        llm.generate(warm.prompts, sampling_params(warm, args.temperature))
        common.log(f"  warm-up generate of {k} requests: {time.perf_counter() - t0:.2f} s")
    params = sampling_params(workload, args.temperature)
    preempt0 = getattr(engine.scheduler, "num_preemptions", 0)
    recorder = StepRecorder(engine)
    with common.CompileCounter() as compiles, recorder:
        t0 = time.perf_counter()
        outputs = llm.generate(workload.prompts, params)
        t1 = time.perf_counter()
        wall = t1 - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    roof = recorder.roofline(shape, args.bandwidth, args.peak_flops)
    result = {
        "engine": "jpaged",
        "wall_s": wall,
        "requests_per_s": workload.num_requests / wall,
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + workload.input_tokens) / wall,
        "output_tokens_generated": out_tokens,
        "output_len_mismatches": sum(
            len(o.outputs[0].token_ids) != n for o, n in zip(outputs, workload.output_lens, strict=True)
        ),
        "cached_prompt_tokens": sum(getattr(o, "num_cached_tokens", 0) for o in outputs),
        "preemptions": getattr(engine.scheduler, "num_preemptions", 0) - preempt0,
        "compiles_during_run": compiles.count,
        "compile_s_during_run": compiles.seconds,
        "roofline": roof,
        "timeline": (line := recorder.timeline(t0, t1)),
    }
    if line["available"]:
        common.log(f"  timeline: first step {line['first_step_s']:.3f} s, "
                   f"{line['prefill_or_mixed_steps']} more prefill/mixed steps {line['prefill_or_mixed_s']:.3f} s, "
                   f"{line['decode_steps']} decode steps {line['decode_s']:.3f} s "
                   f"(median {(line['decode_step_ms'] or {}).get('p50', 0):.2f} ms), "
                   f"drain {line['drain_s']:.3f} s")  # fmt: skip
    if roof.get("available"):
        result["roofline_s"] = roof["floor_s"]
        result["of_roofline"] = roof["floor_s"] / wall
        result["roofline_output_tok_s"] = out_tokens / roof["floor_s"]
        result["of_in_sequence_floor"] = roof["in_sequence_s"] / wall
    return result


# -- HF (in a child process) ------------------------------------------------------------------------------------------
def run_hf(workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jpaged-hf-") as tmp:
        req_path, out_path = Path(tmp) / "requests.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps({"prompts": workload.prompts, "output_lens": workload.output_lens}))
        cmd = [
            sys.executable,
            str(Path(__file__).resolve().parent / "hf_generate.py"),
            "--requests",
            str(req_path),
            "--model",
            str(common.resolve_model(args.model)),
            "--batch-size",
            str(args.batch_size),
            "--max-batches",
            str(args.hf_max_batches),
            "--dtype",
            args.dtype if args.dtype != "auto" else "bfloat16",
            "--out",
            str(out_path),
            "--seed",
            str(args.seed),
        ]
        if args.hf_device:
            cmd += ["--device", args.hf_device]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")]))
        )
        common.log(
            f"  hf: {' '.join(cmd[1:3])} ... (batch {args.batch_size}, max batches {args.hf_max_batches or 'all'})"
        )
        proc = subprocess.run(cmd, env=env, timeout=args.hf_timeout)
        if proc.returncode != 0:
            return {"engine": "hf", "error": f"hf_generate.py exited with {proc.returncode}"}
        return json.loads(out_path.read_text())


# -- main -------------------------------------------------------------------------------------------------------------
def parse_run(text: str) -> tuple[str, int]:
    kind, _, n = text.rpartition(":")
    if kind not in WORKLOADS or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected WORKLOAD:N with WORKLOAD in {', '.join(WORKLOADS)}, got {text!r}")
    return kind, int(n)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=("jpaged", "hf", "both"), default="jpaged")
    parser.add_argument("--workload", choices=WORKLOADS, nargs="+", default=["fixed"])
    parser.add_argument("--num-requests", type=int, nargs="+", default=[128])
    parser.add_argument(
        "--run",
        action="append",
        type=parse_run,
        default=None,
        metavar="WORKLOAD:N",
        help="explicit runs, in order (repeatable), e.g. --run fixed:128 --run sharegpt-synthetic:256; "
        "replaces the --workload x --num-requests product",
    )
    parser.add_argument("--input-len", type=int, default=512, help="fixed: prompt tokens")
    parser.add_argument("--output-len", type=int, default=256, help="fixed: output tokens")
    parser.add_argument("--mean-input-len", type=float, default=202.0, help="sharegpt-synthetic: mean prompt tokens")
    parser.add_argument("--mean-output-len", type=float, default=179.0, help="sharegpt-synthetic: mean output tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="sharegpt-synthetic: log-normal sigma")
    parser.add_argument("--min-len", type=int, default=4, help="sharegpt-synthetic: shortest prompt/output")
    parser.add_argument("--max-len", type=int, default=1024, help="sharegpt-synthetic: longest prompt/output")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--warmup-requests", type=int, default=4, help="a small generate before each timed run (0: none)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="hf: static batch size")
    parser.add_argument("--hf-max-batches", type=int, default=0, help="hf: run only the first K batches, extrapolate")
    parser.add_argument("--hf-device", default=None, help="hf: cuda or cpu (default: cuda when torch sees one)")
    parser.add_argument("--hf-timeout", type=float, default=None, help="hf: seconds before the child is killed")
    parser.add_argument("--bandwidth", type=float, default=common.HBM_BYTES_PER_S)
    parser.add_argument("--peak-flops", type=float, default=common.PEAK_FLOPS)
    common.add_output_arguments(parser)
    common.add_engine_arguments(parser, ENGINE_DEFAULTS)
    return parser


COLUMNS = [
    ("engine", "engine"),
    ("workload", "workload"),
    ("requests", "num_requests"),
    ("wall s", "wall_s"),
    ("req/s", "requests_per_s"),
    ("output tok/s", "output_tok_s"),
    ("total tok/s", "total_tok_s"),
    ("mean batch", "mean_batch"),
    ("roofline s", "roofline_s"),
    ("roofline tok/s", "roofline_output_tok_s"),
    ("of roofline", "of_roofline"),
    ("of in-sequence floor", "of_in_sequence_floor"),
    ("vs HF", "speedup_vs_hf"),
    ("note", "note"),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    model_dir = common.resolve_model(args.model)
    shape = common.ModelShape.from_config(model_dir, "bfloat16" if args.dtype == "auto" else args.dtype)
    plan = args.run or [(kind, n) for kind in args.workload for n in args.num_requests]
    workloads = [make_workload(kind, n, vocab_size=shape.vocab, seed=args.seed, args=args) for kind, n in plan]
    runs: list[dict[str, Any]] = []
    record: dict[str, Any] = {
        "benchmark": "throughput",
        "env": common.env_info(jax_devices=args.engine != "hf"),
        "model": shape.summary(),
        "args": {k: v for k, v in vars(args).items()},
        "engine_info": None,
        "runs": runs,
    }
    hf_results: dict[int, dict[str, Any]] = {}
    if args.engine in ("hf", "both"):  # first: the child must have the GPU to itself
        for i, w in enumerate(workloads):
            common.log(f"hf: {w.name}, {w.num_requests} requests")
            hf_results[i] = run_hf(w, args) | w.describe()
            runs.append(_annotate(hf_results[i]))
            common.save(args, record)  # after every run: a run killed later keeps the earlier ones
    if args.engine in ("jpaged", "both"):
        page = args.page_size
        longest = -(-max(w.longest for w in workloads) // page) * page
        limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", longest)
        llm, record["engine_info"] = make_llm(args, min(longest, limit))
        for i, w in enumerate(workloads):
            common.log(f"jpaged: {w.name}, {w.num_requests} requests")
            result = run_jpaged(llm, w, args, shape) | w.describe()
            if i in hf_results and hf_results[i].get("output_tok_s"):
                result["speedup_vs_hf"] = result["output_tok_s"] / hf_results[i]["output_tok_s"]
            runs.append(_annotate(result))
            common.log(f"  {result['output_tok_s']:,.0f} output tok/s in {result['wall_s']:.2f} s")
            common.save(args, record)
    print(
        common.table(runs, COLUMNS, title=f"offline throughput, {shape.name} ({shape.num_params / 1e9:.2f} B params)")
    )
    return record


def _annotate(run: dict[str, Any]) -> dict[str, Any]:
    roof = run.get("roofline") or {}
    run["mean_batch"] = roof.get("mean_decode_batch") if run["engine"] == "jpaged" else run.get("batch_size")
    if run.get("extrapolated"):
        run["note"] = f"extrapolated from {run['batches_run']} of {run['batches']} batches"
    elif run.get("error"):
        run["note"] = run["error"]
    return run


if __name__ == "__main__":
    main()
