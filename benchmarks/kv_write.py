"""The KV-cache write (pallas_kernels/kv_write.py): XLA's scatter and the Pallas kernel against the bytes they move.

    python benchmarks/kv_write.py --json-out kv_write.json    # GPU: Llama-2-7B / Llama-3-8B KV heads, T = 1 ... 2048
    python benchmarks/kv_write.py                             # CPU: tiny shapes, Pallas interpreted (times meaningless)

Issue 5 asks that writing a step's K/V into the pages cost no more than the bytes it moves; a trace of a Llama-2-7B
decode step at 128 sequences showed XLA's scatter at ~9 us per layer for 2 MB (docs/benchmarks.md). Each case writes
T tokens' new K and V ([T, K, H] bf16 each) into T distinct random slots of a pool of pages, in place (the pages are
donated, as in the engine's step), and every implementation is first checked against `write_kv_reference`.
Bytes = the new K and V read once and written once (4 * T * K * H * itemsize); floor = bytes / 4.28 TB/s. A kernel
launch costs a few microseconds whatever it moves, so at small T the floor is the launch, not the bytes.

A jitted call of one write costs 50-140 us on the H200 whatever the write does (the sixth session's run), so the
time reported is that of --chain writes of distinct slot sets inside one call, divided by --chain: what a write costs
inside a step. One write per call is kept as `per_call_median_us`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/kv_write.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.kernels in a bare checkout)
    common,
)

# (name, K kv-heads, H head dim, S page size, P pages in the pool)
GPU_CASES = [("llama2-7b", 32, 128, 16, 4096), ("llama3-8b", 8, 128, 16, 4096)]
GPU_TOKENS = (1, 16, 128, 256, 2048)
TINY_CASES = [("tiny", 2, 16, 4, 16)]
TINY_TOKENS = (1, 5)
IMPLS = ("xla", "pallas")


def distinct_slots(rng: Any, page_size: int, num_pages: int, num_tokens: int) -> Any:
    """num_tokens distinct slots outside page 0 (the null page), as a step's real tokens have."""
    import numpy as np

    return rng.choice(np.arange(page_size, num_pages * page_size, dtype=np.int32), num_tokens, replace=False)


def make_inputs(kv_heads: int, head_dim: int, page_size: int, num_pages: int, num_tokens: int, *, seed: int):
    """Pages [K, P, S, H] and new K/V [T, K, H] in bf16, and T distinct slots outside page 0 (the null page)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    slots = distinct_slots(np.random.default_rng(seed), page_size, num_pages, num_tokens)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    pages = (kv_heads, num_pages, page_size, head_dim)
    new = (num_tokens, kv_heads, head_dim)
    return (
        jax.random.normal(keys[0], pages, jnp.bfloat16),
        jax.random.normal(keys[1], pages, jnp.bfloat16),
        jax.random.normal(keys[2], new, jnp.bfloat16),
        jax.random.normal(keys[3], new, jnp.bfloat16),
        jnp.asarray(slots),
    )


def run_case(name: str, kv_heads: int, head_dim: int, page_size: int, num_pages: int, num_tokens: int, args) -> list:
    import jax
    import numpy as np

    from jpaged.kernels.kv_write import write_kv, write_kv_reference

    k_pages, v_pages, k_new, v_new, slots = make_inputs(kv_heads, head_dim, page_size, num_pages, num_tokens,
                                                        seed=args.seed)  # fmt: skip
    nbytes = 4 * num_tokens * kv_heads * head_dim * k_new.dtype.itemsize
    case = {"case": f"{name} T={num_tokens}", "kv_heads": kv_heads, "head_dim": head_dim, "page_size": page_size,
            "num_pages": num_pages, "tokens": num_tokens, "bytes": nbytes,
            "floor_us": nbytes / args.bandwidth * 1e6}  # fmt: skip
    # Compared on the device: the pools are GBs, and copying them to the host per case ran this script past its time
    # limit on the H200 before it saved anything.
    want = write_kv_reference(k_pages, v_pages, k_new, v_new, slots)
    rng = np.random.default_rng(args.seed + 1)
    chain_slots = jax.numpy.asarray(
        np.stack([distinct_slots(rng, page_size, num_pages, num_tokens) for _ in range(args.chain)])
    )
    rows = []
    for impl in IMPLS:
        row: dict[str, Any] = case | {"impl": impl}
        write_one = functools.partial(write_kv, impl=impl, interpret=args.interpret and impl == "pallas")

        def chained(k_pages, v_pages, k_new, v_new, slot_sets, write_one=write_one):  # unrolled: no device loop
            for i in range(slot_sets.shape[0]):
                k_pages, v_pages = write_one(k_pages, v_pages, k_new, v_new, slot_sets[i])
            return k_pages, v_pages

        write = jax.jit(write_one, donate_argnames=("k_pages", "v_pages"))
        write_chain = jax.jit(chained, donate_argnames=("k_pages", "v_pages"))
        pages = [jax.numpy.copy(k_pages), jax.numpy.copy(v_pages)]

        def call(write=write, pages=pages):  # the pages written by one call are donated to the next, as in the step
            pages[:] = write(pages[0], pages[1], k_new, v_new, slots)
            # The list itself, not its arrays: whoever waits on it later waits on the newest pages, which no later
            # call has donated yet.
            return pages

        def call_chain(write_chain=write_chain, pages=pages):
            pages[:] = write_chain(pages[0], pages[1], k_new, v_new, chain_slots)
            return pages

        try:
            call()
            row["ok"] = all(bool(jax.numpy.array_equal(got, exp)) for got, exp in zip(pages, want, strict=True))
            if not row["ok"]:
                row["error"] = "differs from write_kv_reference"
            else:
                one = common.time_calls(call, warmup=1, iters=args.iters)
                t = common.time_calls(call_chain, warmup=1, iters=max(1, args.iters // 10))
                seconds = t["pipelined_s"] / args.chain
                row |= {"time_us": seconds * 1e6, "per_call_median_us": one["median_s"] * 1e6,
                        "GBps": nbytes / seconds / 1e9, "of_floor": case["floor_us"] / (seconds * 1e6)}  # fmt: skip
        except Exception as e:  # an implementation that fails to lower or run is a result, not a crash
            row |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        status = f"{row['time_us']:.2f} us, {row['GBps']:.0f} GB/s" if row.get("time_us") else row.get("error")
        common.log(f"{case['case']:<18} {impl:<7} {status}")
        rows.append(row)
    return rows


COLUMNS = [
    ("case", "case"),
    ("impl", "impl"),
    ("bytes", "bytes"),
    ("us in a chain", "time_us"),
    ("per-call us", "per_call_median_us"),
    ("GB/s", "GBps"),
    ("bytes floor us", "floor_us"),
    ("of floor", "of_floor"),
    ("error", "error"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts T (default: per backend)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, Pallas interpreted (the default off GPU)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--chain", type=int, default=32, help="writes per timed call (distinct slot sets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth", type=float, default=common.HBM_BYTES_PER_S)
    common.add_output_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    gpu = common.on_gpu()
    args.tiny = args.tiny or not gpu
    args.interpret = not gpu
    if not gpu:
        common.log("no GPU: tiny shapes, the Pallas kernel interpreted (correctness only; times meaningless)")
        args.iters = min(args.iters, 2)
        args.chain = min(args.chain, 2)
    cases = TINY_CASES if args.tiny else GPU_CASES
    tokens = args.tokens or (TINY_TOKENS if args.tiny else GPU_TOKENS)
    rows: list[dict[str, Any]] = []
    record = {"benchmark": "kv_write", "env": common.env_info(jax_devices=True), "args": vars(args), "rows": rows}
    for case in cases:
        for t in tokens:
            rows += run_case(*case, t, args)
            common.save(args, record)  # after every case: a run killed at its time limit keeps what it measured
    print(common.table(rows, COLUMNS, title="KV write: each implementation against the bytes it moves"))
    return record


if __name__ == "__main__":
    main()
