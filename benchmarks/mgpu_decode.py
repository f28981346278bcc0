"""The Mosaic GPU decode kernel (pallas_kernels/paged_decode_mgpu.py) on the four anchor decode shapes and a few more.

    python benchmarks/mgpu_decode.py --json-out mgpu_decode.json        # GPU: anchor shapes x a few tunings
    python benchmarks/mgpu_decode.py --triton                           # ... and the Triton kernel beside it
    python benchmarks/mgpu_decode.py --tunings 'ppb=4,st=2,splits=4;ppb=8,st=2,splits=1,sem=lane'
    python benchmarks/mgpu_decode.py --cases "B=1" --table-len 2048 --tunings 'splits=1;splits=4;splits=16'
    python benchmarks/mgpu_decode.py                                    # CPU: tiny shapes, Mosaic GPU interpreter

Shapes (bf16, H 128, page size 16, every page table a random permutation of the pool, every sequence at full
context, one query token each): Llama-3-8B heads (32/8) B=64 ctx 2048; Llama-2-7B (32/32) B=64 ctx 2048;
Llama-3-8B B=16 ctx 16384; Llama-3-8B B=256 ctx 1024; two batches of 133-264 programs (Llama-2-7B B=8 ctx 4096,
Llama-3-8B B=24 ctx 8192: one wave without split-K); and a single stream, Llama-2-7B B=1 ctx 256, where the
kernel's time is its programs' latency, not bandwidth (9.6 us a layer in the engine's batch-1 step on the H200, for
~3 MB). --table-len pads every page table with null pages to that many tokens, as the engine sizes its tables by
max_model_len: a split past a sequence's last page sees nothing. At B=1 a call (0.05-0.09 ms on the H200) is the
host's dispatch, not the kernel: --chain N times N calls in one jitted function (over N copies of the pages), as
split counts there were otherwise only comparable in the engine (latency.py; docs/benchmarks.md, tenth session).

Each configuration is compiled, run once and checked against `paged_attention_reference` (relative L2 error
<= 1e-2) before it is timed; a configuration that fails to compile or is wrong is reported (with the first line of
its error) and never timed. Time: common.time_calls (20 calls back to back waited for once: "pipelined", the
figure used; and the median of 20 calls each waited for). Bandwidth = K and V bytes of every sequence's context,
read once, / pipelined time; the goal is 3.6 TB/s (85% of the 4.28 TB/s copy bandwidth).
Tunings: the default list per case (ring depth x block size, split-K where B * K programs underfill 132 SMs, both
Mosaic lowerings), or --tunings. Off GPU the same code runs tiny shapes through the interpreter (times meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/mgpu_decode.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.kernels in a bare checkout)
    common,
)

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
MAX_REL_ERR = 1e-2
PAGE_SIZE = 16
HEAD_DIM = 128
Case = tuple[str, int, int, int, int]  # (name, N q-heads, K kv-heads, B, context)
GPU_CASES: list[Case] = [
    ("llama3-8b B=64 ctx=2048", 32, 8, 64, 2048),
    ("llama2-7b B=64 ctx=2048", 32, 32, 64, 2048),
    ("llama3-8b B=16 ctx=16384", 32, 8, 16, 16384),
    ("llama3-8b B=256 ctx=1024", 32, 8, 256, 1024),
    ("llama2-7b B=1 ctx=256", 32, 32, 1, 256),
    # 133-264 programs: where default_tuning's one-wave rule runs no split (B * K * 2 > 264), one CTA on some SMs
    ("llama2-7b B=8 ctx=4096", 32, 32, 8, 4096),
    ("llama3-8b B=24 ctx=8192", 32, 8, 24, 8192),
    # throughput.py's fixed:128 run mid-decode (512-token prompts, 128 of 256 tokens out): the engine's batch-128 step
    ("llama2-7b B=128 ctx=640", 32, 32, 128, 640),
]
TINY_CASES: list[Case] = [("tiny gqa4 B=3 ctx=200", 8, 2, 3, 200), ("tiny mha B=2 ctx=70", 2, 2, 2, 70)]
# --tunings keys -> DecodeTuning fields
_KEYS = {"ppb": "pages_per_block", "st": "num_stages", "splits": "num_splits", "sem": "semantics",
         "preg": "p_in_registers", "posm": "positions_on_m"}  # fmt: skip


def kv_bytes(kv_heads: int, batch: int, ctx: int, head_dim: int = HEAD_DIM, itemsize: int = 2) -> int:
    return 2 * batch * ctx * kv_heads * head_dim * itemsize  # K and V, each read once


def make_inputs(heads: int, kv_heads: int, batch: int, ctx: int, *, head_dim: int = HEAD_DIM, seed: int = 0,
                table_len: int = 0, pool_pages: int = 0, page_order: str = "random"):  # fmt: skip
    """q [B, N, H]; k/v pages [K, P, S, H] with page 0 the (unused) null page; page tables drawn from the pool
    (P = max(the pages the batch needs + 1, pool_pages)): distinct pages in random order, or with page_order
    "sequential" each sequence's pages consecutive, sequences spread evenly over the pool (as a fresh engine's
    allocator hands them out); tables padded with the null page to table_len tokens' pages; seq_lens = ctx;
    num_seqs = B. (As benchmarks/kernels.py's make_inputs, for its decode cases.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    pages_per_seq = -(-ctx // PAGE_SIZE)
    num_pages = max(batch * pages_per_seq + 1, pool_pages)
    if page_order == "sequential":
        stride = (num_pages - 1) // batch
        tables = 1 + stride * np.arange(batch, dtype=np.int32)[:, None] + np.arange(pages_per_seq, dtype=np.int32)
    else:
        tables = rng.permutation(np.arange(1, num_pages, dtype=np.int32))[: batch * pages_per_seq]
        tables = tables.reshape(batch, pages_per_seq)
    tables = np.pad(tables, ((0, 0), (0, max(0, -(-table_len // PAGE_SIZE) - pages_per_seq))))
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (kv_heads, num_pages, PAGE_SIZE, head_dim)
    return (
        jax.random.normal(keys[0], (batch, heads, head_dim), jnp.bfloat16),
        jax.random.normal(keys[1], shape, jnp.bfloat16),
        jax.random.normal(keys[2], shape, jnp.bfloat16),
        jnp.asarray(tables),
        jnp.full((batch,), ctx, jnp.int32),
        jnp.asarray([batch], jnp.int32),
    )


def default_tunings(heads: int, kv_heads: int, batch: int) -> list[Any]:
    """Ring depth x block size at the split count that fills the GPU, other split counts, the lane lowering."""
    from jpaged.kernels.paged_decode_mgpu import DecodeTuning, default_tuning

    default = default_tuning(batch, heads, kv_heads)
    fill = default.num_splits
    tunings = [DecodeTuning(pages_per_block=ppb, num_stages=st, num_splits=fill)
               for ppb, st in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3))]  # fmt: skip
    tunings += [DecodeTuning(num_splits=s) for s in sorted({1, 2, fill // 2 or 1, 2 * fill}) if s != fill]
    tunings.append(DecodeTuning(num_splits=fill, semantics="lane"))
    if default.positions_on_m:
        tunings.append(default)
    return tunings


def parse_tuning_fields(text: str) -> dict[str, Any]:
    """'ppb=8,sem=lane' -> {"pages_per_block": 8, "semantics": "lane"}: the DecodeTuning fields one tuning names."""
    fields: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, _, value = item.partition("=")
        name = _KEYS.get(key.strip(), key.strip())
        if name == "semantics":
            fields[name] = value.strip()
        elif name in ("p_in_registers", "positions_on_m"):
            if value.strip() not in ("0", "1"):
                raise ValueError(f"{key.strip()}= takes 0 or 1, got {value.strip()!r}")
            fields[name] = value.strip() == "1"
        else:
            fields[name] = int(value)
    return fields


def parse_tunings(text: str) -> list[Any]:
    """'ppb=4,st=2,splits=4;ppb=8,sem=lane;preg=1;posm=1,sem=lane' -> DecodeTunings (unnamed fields keep their
    defaults)."""
    from jpaged.kernels.paged_decode_mgpu import DecodeTuning

    return [DecodeTuning(**parse_tuning_fields(part)) for part in filter(None, (p.strip() for p in text.split(";")))]


def parse_shapes(text: str) -> list[Case]:
    """'32/8/24/640,32/32/3/4096' -> cases (name, N, K, B, context)."""
    cases = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            heads, kv_heads, batch, ctx = (int(v) for v in part.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is 'N/K/B/context' (four ints), got {part!r}") from None
        cases.append((f"N{heads}/K{kv_heads} B={batch} ctx={ctx}", heads, kv_heads, batch, ctx))
    return cases


def rel_err(out: Any, ref: Any) -> float:
    import jax.numpy as jnp

    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def run_config(case: dict[str, Any], kernel: str, config: str, fn: Callable[[], Any], ref: Any, args,
               calls: int = 1) -> dict:  # fmt: skip
    """Checks and times fn; with calls > 1, fn makes that many kernel calls (a list of outputs, the first checked)."""
    row: dict[str, Any] = {"case": case["case"], "kernel": kernel, "config": config}
    try:
        out = common.block(fn())
        row["rel_err"] = rel_err(out[0] if calls > 1 else out, ref)
        row["ok"] = row["rel_err"] <= MAX_REL_ERR
        if not row["ok"]:
            row["error"] = f"relative error {row['rel_err']:.3g} > {MAX_REL_ERR}"
        else:
            t = common.time_calls(fn, warmup=1, iters=args.iters)
            seconds = t["pipelined_s"] / calls
            row |= {
                "time_ms": seconds * 1e3,
                "per_call_median_ms": t["median_s"] / calls * 1e3,
                "kv_TBps": case["kv_bytes"] / seconds / 1e12,
                "of_hbm": case["kv_bytes"] / seconds / args.bandwidth,
            }
    except Exception as e:  # a configuration that fails to lower, compile or run is a result, not a crash
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        row |= {"ok": False, "error": f"{type(e).__name__}: {' | '.join(lines[:3])[:400]}"}
    status = f"{row['time_ms']:.4f} ms, {row['kv_TBps']:.2f} TB/s" if row.get("time_ms") else row.get("error")
    common.log(f"  {kernel:<8} {config:<28} {status}")
    return row


def run_case(name: str, heads: int, kv_heads: int, batch: int, ctx: int, args) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from jpaged.kernels.paged_decode_mgpu import (
        ctas_per_sm,
        paged_decode_attention_mgpu,
        paged_decode_mgpu_unsupported_reason,
        paged_decode_reference,
        smem_bytes,
    )

    head_dim = args.head_dim
    case: dict[str, Any] = {"case": name, "heads": heads, "kv_heads": kv_heads, "batch": batch, "context": ctx,
            "kv_bytes": kv_bytes(kv_heads, batch, ctx, head_dim)}  # fmt: skip
    common.log(f"{name}: {case['kv_bytes'] / 1e9:.3f} GB of K+V")
    inputs = make_inputs(heads, kv_heads, batch, ctx, head_dim=head_dim, seed=args.seed, table_len=args.table_len,
                         pool_pages=args.pool_pages, page_order=args.page_order)  # fmt: skip
    sm_scale = 1.0 / math.sqrt(head_dim)
    ref = common.block(paged_decode_reference(*inputs, sm_scale=sm_scale))
    # --chain: distinct copies of the pages, so that each call reads its K/V from HBM, not from the L2
    kv_copies = [(inputs[1], inputs[2])] + [(inputs[1] + 0, inputs[2] + 0) for _ in range(args.chain - 1)]
    rows = []
    for tuning in args.tuning_list or default_tunings(heads, kv_heads, batch):
        reason = paged_decode_mgpu_unsupported_reason(inputs[0], inputs[1], inputs[3], tuning)
        if reason is not None:
            rows.append({"case": name, "kernel": "mgpu", "config": tuning.name, "ok": False, "error": reason})
            common.log(f"  mgpu     {tuning.name:<28} unsupported: {reason}")
            continue
        kernel = functools.partial(paged_decode_attention_mgpu, sm_scale=sm_scale, tuning=tuning,
                                   interpret=args.interpret)  # fmt: skip
        fn: Callable[[], Any]
        if args.chain > 1:  # one jitted call over every copy of the pages: the host's dispatch paid once
            chained = jax.jit(lambda q, kvs, rest, kernel=kernel: [kernel(q, k, v, *rest) for k, v in kvs])
            fn = functools.partial(chained, inputs[0], kv_copies, inputs[3:])
        else:
            fn = functools.partial(kernel, *inputs)
        row = run_config(case, "mgpu", tuning.name, fn, ref, args, calls=args.chain)
        row["tuning"] = dataclasses.asdict(tuning)
        row["smem_bytes"] = smem_bytes(jnp.bfloat16, head_dim, PAGE_SIZE, inputs[3].shape[1], tuning,
                                       group=heads // kv_heads)  # fmt: skip
        row["ctas_per_sm"] = ctas_per_sm(row["smem_bytes"], tuning)  # estimated
        rows.append(row)
    if args.triton:
        from jpaged.kernels import paged_attention

        cu_q_lens = jnp.arange(batch + 1, dtype=jnp.int32)
        triton_args = (*inputs[:5], cu_q_lens, inputs[5])
        fn = lambda: paged_attention(*triton_args, sm_scale=sm_scale, impl="pallas", interpret=args.interpret)
        rows.append(run_config(case, "triton", "default_tuning", fn, ref, args))
    for row in rows:
        row |= {k: v for k, v in case.items() if k not in row}
    return rows


COLUMNS = [
    ("case", "case"),
    ("kernel", "kernel"),
    ("config", "config"),
    ("time ms", "time_ms"),
    ("per-call ms", "per_call_median_ms"),
    ("K+V TB/s", "kv_TBps"),
    ("of 4.28", "of_hbm"),
    ("rel err", "rel_err"),
    ("CTAs/SM", "ctas_per_sm"),
    ("error", "error"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tunings", type=parse_tunings, default=None, dest="tuning_list",
                        help="';'-separated tunings, each 'ppb=4,st=2,splits=1,sem=warpgroup|lane,preg=0|1,posm=0|1' "
                        "(preg: P in registers; posm: positions on M, with sem=lane)")  # fmt: skip
    parser.add_argument("--cases", default=None, help="only cases whose name contains one of these (comma-separated)")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="these cases instead, each 'N/K/B/context' (q heads, kv heads, batch, tokens), "
                        "comma-separated")  # fmt: skip
    parser.add_argument("--triton", action="store_true", help="also time jpaged's Triton kernel (default tuning)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in interpret mode (the default off GPU)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--chain", type=int, default=1,
                        help="kernel calls per timed jitted call, over copies of the pages (for cases shorter than a "
                        "call's dispatch, e.g. B=1; each copy costs the case's K/V memory)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument(
        "--table-len", type=int, default=0, help="pad page tables with null pages to this many tokens (max_model_len)"
    )
    parser.add_argument("--pool-pages", type=int, default=0,
                        help="pages in the pool (at least what the case needs): an engine's pool is ~2.5x the "
                        "fixed:128 step's (Llama-2-7B, 0.9 of an H200: ~12,500 a layer)")  # fmt: skip
    parser.add_argument(
        "--page-order",
        choices=("random", "sequential"),
        default="random",
        help="each sequence's pages: distinct random pool pages, or consecutive ones",
    )
    parser.add_argument("--goal-tbps", type=float, default=3.6, help="the decode goal (85%% of 4.28 TB/s)")
    parser.add_argument("--bandwidth", type=float, default=common.HBM_BYTES_PER_S)
    common.add_output_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import jax

    gpu = jax.default_backend() == "gpu"
    args.tiny = args.tiny or not gpu
    args.interpret = not gpu
    if not gpu:
        common.log("no GPU: tiny shapes through Pallas' Mosaic GPU interpreter (correctness only; times meaningless)")
        args.iters = min(args.iters, 2)
    cases: list[Case] = args.shapes or (TINY_CASES if args.tiny else GPU_CASES)
    if args.cases:
        words = [w.strip() for w in args.cases.split(",")]
        cases = [c for c in cases if any(w in c[0] for w in words)]
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows += run_case(*case, args)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["case"], row["kernel"])
        if row.get("time_ms") is not None and (key not in best or row["time_ms"] < best[key]["time_ms"]):
            best[key] = row
    print(common.table(rows, COLUMNS, title="Mosaic GPU decode kernel: every configuration"))
    print(common.table(list(best.values()), COLUMNS, title=f"best per case and kernel (goal {args.goal_tbps} TB/s)"))
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        print(f"{len(failed)} configurations failed or were unsupported (see 'error')")
    record = {
        "benchmark": "mgpu_decode",
        "env": common.env_info(jax_devices=True),
        "args": {k: v for k, v in vars(args).items() if k != "tuning_list"},
        "tunings": [r.get("tuning") for r in rows],
        "interpret": args.interpret,
        "best": list(best.values()),
        "rows": rows,
    }
    common.save(args, record)
    return record


if __name__ == "__main__":
    main()
