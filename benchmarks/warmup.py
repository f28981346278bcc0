"""Warm-up: how long each compiled step variant takes to compile, alone and all at once.

    python benchmarks/warmup.py --model llama2-7b --workers 1 16     # GPU: each variant alone, then 16 at a time
    python benchmarks/warmup.py --model tests/fixtures/hf/llama-gqa4 --dtype float32 --max-num-batched-tokens 256

Issue 5 asks that every step bucket compile within 60 s. The engine compiles its variants (one per token bucket, plus
decode-only ones where attention has a decode kernel) on a thread each, one per core; the total is then set by the
slowest compile under contention, and hides what each costs. For every --workers value this clears JAX's in-memory
caches (the persistent cache is off for the run) and runs the runner's warm-up again, recording each variant's
compile seconds and the total. With --workers 1 the per-variant figures are each compile's own cost.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
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
_VARIANT = re.compile(r"compiled step bucket (T=\d+ B=\d+(?: \(decode\))?) in ([\d.]+) s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="concurrent compilations for each warm-up run")  # fmt: skip
    parser.add_argument("--one-row", choices=("on", "off", "both"), default="on",
                        help="the one-row decode variant of a lone sequence (GPUs with a decode kernel): compiled, "
                             "not, or each warm-up run twice, with and without it")  # fmt: skip
    common.add_output_arguments(parser)
    common.add_engine_arguments(parser, ENGINE_DEFAULTS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import jax
    from jax._src import compilation_cache  # whether to use the cache is decided once a process; reset it

    args = build_parser().parse_args(argv)
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
    one_row = {"on": (True,), "off": (False,), "both": (True, False)}[args.one_row]
    for workers in args.workers:
        for with_one_row in one_row:
            runner.one_row_decode = with_one_row and runner.decode_steps
            jax.clear_caches()
            with LogCapture() as logs, common.CompileCounter() as compiles:
                total = runner.warm_up(workers=workers)
            variants = {m.group(1): float(m.group(2)) for line in logs.lines if (m := _VARIANT.search(line))}
            label = f"{workers} worker(s)"
            if len(one_row) > 1:
                label += f", one-row {'on' if with_one_row else 'off'}"
            record["runs"].append({"workers": workers, "one_row_decode": runner.one_row_decode, "label": label,
                                   "total_s": total, "variants_s": variants,
                                   "backend_compiles": compiles.count})  # fmt: skip
            common.save(args, record)
            common.log(f"warm-up, {label}: {len(variants)} variants in {total:.1f} s")
    names = list(dict.fromkeys(name for r in record["runs"] for name in r["variants_s"]))
    rows = [{"variant": name, **{r["label"]: r["variants_s"].get(name) for r in record["runs"]}} for name in names]
    rows.append({"variant": "total", **{r["label"]: r["total_s"] for r in record["runs"]}})
    columns = [("variant", "variant"), *((f"s, {r['label']}", r["label"]) for r in record["runs"])]
    print(common.table(rows, columns, title=f"warm-up compile seconds, {Path(str(args.model)).name}"))
    return record


if __name__ == "__main__":
    main()
