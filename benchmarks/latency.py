"""Single-stream latency: time to first token and decode tokens/s at batch 1, and prefill FLOP/s, against the roofline.

    python benchmarks/latency.py --model llama2-7b                        # prompts of 128 and 2048 tokens
    python benchmarks/latency.py --model jpaged/bundled/stories260K --input-lens 16 --output-len 8 --prefill-len 32

For each --input-lens value: --iters requests (after one discarded warm-up request), each alone in the engine, each
with a fresh random prompt (so the prefix cache never shortens a prefill), --output-len tokens with ignore_eos,
greedy. The engine is stepped by hand (`LLMEngine.add_request` / `step`) and every token's arrival is timed on the
host: TTFT = first token - submission; decode tokens/s = (tokens - 1) / (last - first token). Medians are reported.

Roofline (common.py): a decode token at batch 1 cannot beat (weights + KV of its context) / 4.28 TB/s; the issue's
"weights over bandwidth" figure (317 tok/s for Llama-2-7B) leaves the KV out and is reported beside it. TTFT cannot
beat max(prompt FLOPs / 659 TFLOP/s, weights / 4.28 TB/s).

Prefill: --prefill-batch prompts of --prefill-len tokens (4 x 2048 by default) generated to one token each; achieved
FLOP/s = their FLOPs (2 x params x tokens + causal attention + the logits of the last rows) / wall time, against
659 TFLOP/s. With --max-num-batched-tokens below their total they run as several chunks; the FLOPs are the same.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/latency.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)
from benchmarks.throughput import make_llm

ENGINE_DEFAULTS = {
    "model": "llama2-7b",
    "load_format": "dummy",
    "dtype": "bfloat16",
    "skip_tokenizer_init": True,
    "warmup": True,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 8192,
}


def timed_request(engine: Any, request_id: str, prompt: list[int], output_len: int) -> dict[str, Any]:
    """Runs one request alone, timing each token's arrival on the host (the cyclic collector paused, as
    `LLM.generate` runs its loop)."""
    from jpaged import SamplingParams
    from jpaged.llm import collector_paused

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    arrivals: list[float] = []
    step_returns: list[float] = []  # when each engine.step() call returned, up to the first token: where TTFT goes
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    seen = 0
    with collector_paused():
        while engine.has_unfinished_requests():
            outs = engine.step()
            if not arrivals:
                step_returns.append(time.perf_counter() - t0)
            for out in outs:
                n = len(out.outputs[0].token_ids)
                if n > seen:
                    now = time.perf_counter()
                    arrivals += [now] * (n - seen)
                    seen = n
    if seen != output_len:
        raise RuntimeError(f"request {request_id} produced {seen} tokens, asked for {output_len}")
    first, last = arrivals[0], arrivals[-1]
    decode_s = last - first
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "ttft_s": first - t0,
        "steps_to_first_token": len(step_returns),
        "step_returns_ms": [round(s * 1e3, 3) for s in step_returns],
        "decode_s": decode_s,
        "decode_tok_s": (seen - 1) / decode_s if seen > 1 and decode_s > 0 else None,
        "median_itl_s": statistics.median(gaps) if gaps else None,
        "e2e_s": last - t0,
    }


def measure_length(
    engine: Any, shape: common.ModelShape, input_len: int, args: argparse.Namespace, rng: Any
) -> dict[str, Any]:
    samples = []
    for i in range(1 + args.iters):
        prompt = rng.integers(3, shape.vocab, input_len).tolist()
        r = timed_request(engine, f"lat-{input_len}-{i}", prompt, args.output_len)
        if i:  # the first one warms up whatever the engine compiles lazily
            samples.append(r)
    med = {
        k: statistics.median([s[k] for s in samples if s[k] is not None] or [float("nan")])
        for k in ("ttft_s", "decode_tok_s", "median_itl_s", "e2e_s")
    }
    mean_ctx = input_len + args.output_len / 2
    step_floor = shape.decode_step_floor_s(1, mean_ctx, bandwidth=args.bandwidth)
    weights_only = shape.weight_bytes_read(1) / args.bandwidth
    ttft_floor = shape.prefill_floor_s([input_len], peak_flops=args.peak_flops, bandwidth=args.bandwidth)
    return {
        "input_len": input_len,
        "output_len": args.output_len,
        "iters": args.iters,
        "ttft_ms": med["ttft_s"] * 1e3,
        "decode_tok_s": med["decode_tok_s"],
        "tpot_ms": 1e3 / med["decode_tok_s"] if med["decode_tok_s"] else None,
        "median_itl_ms": med["median_itl_s"] * 1e3,
        "e2e_s": med["e2e_s"],
        "roofline_decode_tok_s": 1 / step_floor,
        "weights_over_bw_tok_s": 1 / weights_only,
        "of_roofline": med["decode_tok_s"] * step_floor if med["decode_tok_s"] else None,
        "of_weights_over_bw": med["decode_tok_s"] * weights_only if med["decode_tok_s"] else None,
        "roofline_ttft_ms": ttft_floor * 1e3,
        "ttft_of_roofline": ttft_floor / med["ttft_s"],
        "samples": samples,
    }


def measure_prefill(llm: Any, shape: common.ModelShape, args: argparse.Namespace, rng: Any) -> dict[str, Any]:
    from jpaged import SamplingParams

    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    times = []
    for i in range(1 + args.iters):
        prompts = [rng.integers(3, shape.vocab, args.prefill_len).tolist() for _ in range(args.prefill_batch)]
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        if i:
            times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    chunks = [(args.prefill_len, 0)] * args.prefill_batch
    flops = shape.step_flops(chunks)
    floor = shape.prefill_floor_s(
        [args.prefill_len] * args.prefill_batch, peak_flops=args.peak_flops, bandwidth=args.bandwidth
    )
    return {
        "prefill_batch": args.prefill_batch,
        "prefill_len": args.prefill_len,
        "wall_ms": wall * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "flops": flops,
        "TFLOPs": flops / wall / 1e12,
        "of_peak": flops / wall / args.peak_flops,
        "roofline_ms": floor * 1e3,
        "of_roofline": floor / wall,
        "tokens_per_s": args.prefill_batch * args.prefill_len / wall,
    }


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input-lens", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3, help="timed requests per length (after one warm-up)")
    parser.add_argument("--prefill-batch", type=int, default=4, help="prompts in the prefill measurement (0: skip)")
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--bandwidth", type=float, default=common.HBM_BYTES_PER_S)
    parser.add_argument("--peak-flops", type=float, default=common.PEAK_FLOPS)
    common.add_output_arguments(parser)
    common.add_engine_arguments(parser, ENGINE_DEFAULTS)
    return parser


COLUMNS = [
    ("prompt", "input_len"),
    ("output", "output_len"),
    ("TTFT ms", "ttft_ms"),
    ("TTFT floor ms", "roofline_ttft_ms"),
    ("decode tok/s", "decode_tok_s"),
    ("TPOT ms", "tpot_ms"),
    ("roofline tok/s", "roofline_decode_tok_s"),
    ("of roofline", "of_roofline"),
    ("weights/BW tok/s", "weights_over_bw_tok_s"),
    ("of weights/BW", "of_weights_over_bw"),
]
PREFILL_COLUMNS = [
    ("prompts", "prefill_batch"),
    ("tokens each", "prefill_len"),
    ("wall ms", "wall_ms"),
    ("TFLOP/s", "TFLOPs"),
    ("of 659", "of_peak"),
    ("roofline ms", "roofline_ms"),
    ("of roofline", "of_roofline"),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import numpy as np

    args = build_parser().parse_args(argv)
    model_dir = common.resolve_model(args.model)
    shape = common.ModelShape.from_config(model_dir, "bfloat16" if args.dtype == "auto" else args.dtype)
    limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 1 << 30)
    need = max([*args.input_lens, args.prefill_len if args.prefill_batch else 0]) + args.output_len
    page = args.page_size
    llm, engine_info = make_llm(args, min(-(-need // page) * page, limit))
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in args.input_lens:
        common.log(f"latency: prompt {n}, {args.output_len} tokens, {args.iters} requests")
        rows.append(measure_length(llm.engine, shape, n, args, rng))
    prefill = None
    if args.prefill_batch:
        common.log(f"prefill: {args.prefill_batch} x {args.prefill_len} tokens")
        prefill = measure_prefill(llm, shape, args, rng)
    print(common.table(rows, COLUMNS, title=f"single-stream latency, {shape.name} (batch 1)"))
    if prefill:
        print(common.table([prefill], PREFILL_COLUMNS, title="prefill"))
    record = {
        "benchmark": "latency",
        "env": common.env_info(jax_devices=True),
        "model": shape.summary(),
        "args": vars(args),
        "engine_info": engine_info,
        "latency": rows,
        "prefill": prefill,
    }
    common.save(args, record)
    return record


if __name__ == "__main__":
    main()
