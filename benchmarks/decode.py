"""Decode throughput at fixed batch sizes: jpaged against HF transformers' `generate()` and the roofline.

    python benchmarks/decode.py --model mixtral-8x7b --batches 1 16 64 256 --engine both
    python benchmarks/decode.py --model jpaged/bundled/stories260K --batches 1 4 --input-len 16 --output-len 8

For each batch size B: B random prompts of --input-len tokens, each generating exactly --output-len tokens (greedy,
ignore_eos), all submitted at once, so every step after the prefill decodes exactly B sequences.
- jpaged (this process): one untimed run per B first, identical to the timed one (it compiles that batch's buckets,
  the decode-only step of all B sequences included, which a shorter run may never reach; no global warm-up), then
  the engine is stepped by hand and each step's end is timed on the host. Decode time = from the step that gave
  every request its first token to the step that gave the last one its last: B * (output_len - 1) tokens.
- HF (a child process that never starts JAX; benchmarks/hf_generate.py --decode-batches): one generate() per B,
  each token's arrival timed on the host (a stopping criterion that synchronises); decode time = first to last
  token, for the same B * (output_len - 1) tokens. Batches run from the smallest; one that outlives --hf-timeout
  is lost with those after it, the others are kept.
Roofline of a decode step (common.py): (weights a step of B tokens reads + KV of B sequences at the mean context)
over 4.28 TB/s; for a mixture of experts only the experts B tokens are expected to reach count (2 of 8 for
Mixtral at B = 1, all 8 from B ~ 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/decode.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)
from benchmarks.throughput import make_llm

ENGINE_DEFAULTS = {
    "model": "mixtral-8x7b",
    "load_format": "dummy",
    "dtype": "bfloat16",
    "skip_tokenizer_init": True,
    "warmup": False,  # each batch size compiles what it needs in its untimed run
    "max_num_seqs": 256,
    "max_num_batched_tokens": 4096,
}


def run_batch(engine: Any, prompts: list[list[int]], output_len: int, tag: str) -> dict[str, Any]:
    """Steps the engine over `prompts` (all submitted at once) and times each step's end on the host, with the cyclic
    collector paused as `LLM.generate` runs its loop."""
    from jpaged import SamplingParams
    from jpaged.llm import collector_paused

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    counts: dict[str, int] = {}
    first_all = last = None
    with collector_paused():
        while engine.has_unfinished_requests():
            for out in engine.step():
                counts[out.request_id] = len(out.outputs[0].token_ids)
            now = time.perf_counter()
            if first_all is None and len(counts) == len(prompts) and min(counts.values()) >= 1:
                first_all = now
            last = now
    if sorted(counts.values()) != [output_len] * len(prompts):
        raise RuntimeError(f"{tag}: requests made {sorted(set(counts.values()))} tokens, asked for {output_len}")
    assert first_all is not None and last is not None
    return {"prefill_s": first_all - t0, "decode_s": last - first_all}


def measure_jpaged(llm: Any, shape: common.ModelShape, args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np

    engine = llm.engine
    rng = np.random.default_rng(args.seed)
    rows = []
    for b in args.batches:

        def prompts(n: int = b) -> list[list[int]]:  # fresh prompts: the prefix cache must not shorten a prefill
            return [rng.integers(3, shape.vocab, args.input_len).tolist() for _ in range(n)]

        with common.CompileCounter() as warm_compiles:
            run_batch(engine, prompts(), args.output_len, f"warm{b}")
        with common.CompileCounter() as compiles:
            timing = run_batch(engine, prompts(), args.output_len, f"b{b}")
        tokens = b * (args.output_len - 1)
        mean_ctx = args.input_len + args.output_len / 2
        floor = shape.decode_step_floor_s(b, mean_ctx, bandwidth=args.bandwidth)
        rate = tokens / timing["decode_s"]
        rows.append(
            {
                "engine": "jpaged",
                "batch": b,
                "input_len": args.input_len,
                "output_len": args.output_len,
                **timing,
                "decode_tok_s": rate,
                "step_ms": timing["decode_s"] / (args.output_len - 1) * 1e3,
                "roofline_step_ms": floor * 1e3,
                "roofline_tok_s": b / floor,
                "of_roofline": rate * floor / b,
                "experts_touched": shape.experts_touched(b) if shape.experts else None,
                "weight_GB_read": shape.weight_bytes_read(b) / 1e9,
                "compiles_warmup": warm_compiles.count,
                "compiles_timed": compiles.count,
            }
        )
        r = rows[-1]
        common.log(
            f"jpaged: batch {b}: {rate:,.0f} decode tok/s, {r['step_ms']:.2f} ms/step "
            f"(roofline {r['roofline_step_ms']:.2f} ms, {r['of_roofline']:.0%}); {compiles.count} compiles timed"
        )
    return rows


def measure_hf(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jpaged-hf-") as tmp:
        out_path = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve().parent / "hf_generate.py"),
            "--model",
            str(common.resolve_model(args.model)),
            "--decode-batches",
            *map(str, args.batches),
            "--input-len",
            str(args.input_len),
            "--output-len",
            str(args.output_len),
            "--dtype",
            args.dtype if args.dtype != "auto" else "bfloat16",
            "--seed",
            str(args.seed),
            "--experts",
            args.hf_experts,
            "--out",
            str(out_path),
        ]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")]))
        )
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.hf_timeout)
            error = None if proc.returncode == 0 else f"hf_generate.py exited with {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"hf_generate.py killed after --hf-timeout {args.hf_timeout} s"
        result = json.loads(out_path.read_text()) if out_path.is_file() else {"engine": "hf", "rows": []}
        return result | ({"error": error} if error else {})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=("jpaged", "hf", "both"), default="jpaged")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-experts", default="default", help="hf: transformers' MoE implementation (hf_generate.py)")
    parser.add_argument("--hf-timeout", type=float, default=None, help="hf: seconds before the child is killed")
    parser.add_argument("--bandwidth", type=float, default=common.HBM_BYTES_PER_S)
    common.add_output_arguments(parser)
    common.add_engine_arguments(parser, ENGINE_DEFAULTS)
    return parser


COLUMNS = [
    ("batch", "batch"),
    ("jpaged tok/s", "decode_tok_s"),
    ("jpaged ms/step", "step_ms"),
    ("roofline ms/step", "roofline_step_ms"),
    ("of roofline", "of_roofline"),
    ("HF tok/s", "hf_decode_tok_s"),
    ("HF ms/step", "hf_step_ms"),
    ("vs HF", "speedup_vs_hf"),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.output_len < 2:
        raise SystemExit("--output-len must be >= 2 (decode is every token after the first)")
    model_dir = common.resolve_model(args.model)
    shape = common.ModelShape.from_config(model_dir, "bfloat16" if args.dtype == "auto" else args.dtype)
    record: dict[str, Any] = {
        "benchmark": "decode",
        "env": common.env_info(jax_devices=args.engine != "hf"),
        "model": shape.summary(),
        "args": vars(args),
        "hf": None,
        "rows": [],
    }
    if args.engine in ("hf", "both"):  # first: the child must have the GPU to itself
        record["hf"] = measure_hf(args)
        common.save(args, record)
    hf_rows = {r["batch"]: r for r in (record["hf"] or {}).get("rows", [])}
    if args.engine in ("jpaged", "both"):
        page = args.page_size
        longest = -(-(args.input_len + args.output_len) // page) * page
        overrides = argparse.Namespace(**vars(args))
        overrides.max_num_seqs = max(args.max_num_seqs, max(args.batches))
        llm, record["engine_info"] = make_llm(overrides, longest if args.max_model_len is None else None)
        for row in measure_jpaged(llm, shape, args):
            if (hf := hf_rows.get(row["batch"])) and hf.get("decode_tok_s"):
                row |= {"hf_decode_tok_s": hf["decode_tok_s"], "hf_step_ms": hf["step_ms"]}
                row["speedup_vs_hf"] = row["decode_tok_s"] / hf["decode_tok_s"]
            record["rows"].append(row)
            common.save(args, record)
    if not record["rows"]:  # HF alone
        record["rows"] = [{"batch": b, "hf_decode_tok_s": r["decode_tok_s"], "hf_step_ms": r["step_ms"]}
                          for b, r in hf_rows.items()]  # fmt: skip
    print(common.table(record["rows"], COLUMNS, title=f"decode throughput, {shape.name}"))
    return record


if __name__ == "__main__":
    main()
