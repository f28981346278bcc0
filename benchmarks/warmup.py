"""Warm-up: how long each compiled step variant takes to compile, alone and all at once.

    python benchmarks/warmup.py --model llama2-7b --workers 1 16     # GPU: each variant alone, then 16 at a time
    python benchmarks/warmup.py --model tests/fixtures/hf/llama-gqa4 --dtype float32 --max-num-batched-tokens 256

Issue 5 asks that every step bucket compile within 60 s. The engine compiles its variants (one per token bucket,
plus decode-only ones where attention has a decode kernel, each with and without the sampler's filter stage) on a
thread each, one per core; the total is then set by the slowest compile under contention, and hides what each costs.
Each (--workers, --one-row) setting runs the runner's warm-up in a fresh child process (the persistent cache off),
recording each variant's lowering seconds (one variant at a time, holding the GIL), its compile seconds (concurrent)
and the total. With --workers 1 the per-variant compile figures are each compile's own cost.

Why processes: XLA keeps GEMM autotuning results for the life of a process, past `jax.clear_caches()`. On the H200
the second of two warm-ups in one process compiled every variant in about half the time (31 s against 63 s), which
read as if the first run's extra variant had cost 30 s. `--in-process` runs them all here, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/warmup.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)
from benchmarks.throughput import LogCapture, make_llm

ENGINE_DEFAULTS = {
    "model": "llama2-7b",
    "load_format": "dummy",
    "dtype": "bfloat16",
    "skip_tokenizer_init": True,
    "warmup": False,  # warmed up here, once per --workers value
    "max_num_seqs": 256,
    "max_num_batched_tokens": 8192,
}
_VARIANT = re.compile(
    r"compiled step bucket (T=\d+ B=\d+(?: \(decode(?:, no filters)?\))?) in ([\d.]+) s \(lowered in ([\d.]+) s\)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="concurrent compilations for each warm-up run")  # fmt: skip
    parser.add_argument("--one-row", choices=("on", "off", "both"), default="on",
                        help="the one-row decode variant of a lone sequence (GPUs with a decode kernel): compiled, "
                             "not, or each warm-up run twice, with and without it")  # fmt: skip
    parser.add_argument("--mixed-from", type=int, default=None,
                        help="token buckets of steps with a prefill chunk start here (needs decode variants; default: "
                             "the runner's)")  # fmt: skip
    parser.add_argument("--in-process", action="store_true",
                        help="every run in this process (later runs reuse XLA's autotuning: not cold)")  # fmt: skip
    parser.add_argument("--child-out", help=argparse.SUPPRESS)  # a child's record, for the parent to read
    common.add_output_arguments(parser)
    common.add_engine_arguments(parser, ENGINE_DEFAULTS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = [
        (w, r) for w in args.workers for r in {"on": ("on",), "off": ("off",), "both": ("on", "off")}[args.one_row]
    ]
    if args.in_process or args.child_out or len(settings) == 1:
        return _in_this_process(args)
    record: dict[str, Any] | None = None
    for workers, one_row in settings:
        with tempfile.TemporaryDirectory(prefix="jpaged-warmup-") as tmp:
            out = Path(tmp) / "run.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--workers", str(workers), "--one-row",
                   one_row, "--child-out", str(out)]  # fmt: skip
            subprocess.run(cmd, check=True)  # a failed child fails the benchmark, with its own traceback above
            child = json.loads(out.read_text())
        if record is None:
            record = {**child, "args": vars(args), "runs": []}
        run = child["runs"][0]
        run["label"] = f"{workers} worker(s), one-row {one_row}"
        record["runs"].append(run)
        common.save(args, record)
    assert record is not None
    print(_table(record, args))
    return record


def _in_this_process(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    from jax._src import compilation_cache  # whether to use the cache is decided once a process; reset it

    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a persistent cache would turn compiles into reads
    compilation_cache.reset_cache()
    try:
        return _measure(args)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
        compilation_cache.reset_cache()


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    llm, info = make_llm(args, args.max_model_len)
    runner = llm.engine.runner
    record: dict[str, Any] = {"benchmark": "warmup", "env": common.env_info(jax_devices=True), "args": vars(args),
                              "engine_info": info, "runs": []}  # fmt: skip
    if args.mixed_from is not None:
        if not runner.decode_steps:  # then the mixed buckets serve decode steps too: keep them all
            raise SystemExit("--mixed-from needs decode variants (a Hopper GPU's decode kernel)")
        runner.mixed_buckets = [t for t in runner.token_buckets if t >= args.mixed_from] or runner.token_buckets[-1:]
    record["mixed_buckets"] = runner.mixed_buckets
    one_row = {"on": (True,), "off": (False,), "both": (True, False)}[args.one_row]
    for workers in args.workers:
        for with_one_row in one_row:
            runner.one_row_decode = with_one_row and runner.decode_steps
            jax.clear_caches()
            with LogCapture() as logs, common.CompileCounter() as compiles:
                total = runner.warm_up(workers=workers)
            matches = [m for line in logs.lines if (m := _VARIANT.search(line))]
            variants = {m.group(1): float(m.group(2)) for m in matches}  # compile seconds, lowering excluded
            lowered = {m.group(1): float(m.group(3)) for m in matches}  # lowered one after another, first
            label = f"{workers} worker(s), one-row {'on' if with_one_row else 'off'}"
            record["runs"].append({"workers": workers, "one_row_decode": runner.one_row_decode, "label": label,
                                   "total_s": total, "variants_s": variants, "lower_s": lowered,
                                   "lower_total_s": sum(lowered.values()), "pid": os.getpid(),
                                   "backend_compiles": compiles.count})  # fmt: skip
            if args.child_out:
                Path(args.child_out).write_text(json.dumps(record))
            else:
                common.save(args, record)
            common.log(f"warm-up, {label}: {len(variants)} variants in {total:.1f} s")
    if not args.child_out:
        print(_table(record, args))
    return record


def _table(record: dict[str, Any], args: argparse.Namespace) -> str:
    runs = record["runs"]
    names = list(dict.fromkeys(name for r in runs for name in r["variants_s"]))
    per_variant = (("lower", "lower_s"), ("compile", "variants_s"))
    totals = (("lower", "lower_total_s"), ("compile", "total_s"))
    rows = [{"variant": name, **{f"{r['label']}|{part}": r[key].get(name) for r in runs for part, key in per_variant}}
            for name in names]  # fmt: skip
    rows.append({"variant": "total", **{f"{r['label']}|{part}": r[key] for r in runs for part, key in totals}})
    columns = [("variant", "variant"), *((f"{part} s, {r['label']}", f"{r['label']}|{part}") for r in runs
                                         for part in ("lower", "compile"))]  # fmt: skip
    title = f"warm-up seconds, {Path(str(args.model)).name} (lowered one at a time; total: the whole warm-up)"
    return common.table(rows, columns, title=title)


if __name__ == "__main__":
    main()
