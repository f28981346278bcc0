"""The sampler's top-k/top-p/min-p mask (jpaged/sampler.py): its radix search at each digit width, timed.

    python benchmarks/sampler.py --json-out sampler.json    # GPU: B = 1, 128, 256 rows of a 32,000-token vocabulary
    python benchmarks/sampler.py                            # CPU: small shapes (times are the CPU's)

Every step of the engine computes the mask for every row (no data-dependent control flow in the step), through two
searches that each settle a 32-bit threshold `digit_bits` bits a pass over [B, V]. On a GPU a pass costs about its
kernel launch, so the default there is 4 bits (16 passes of 15 comparisons a token) rather than a bisection (64
passes of one); on a CPU a pass costs its compute and the default is 1. This script times the mask and the whole
`sample()` at each width, the masks first checked equal to the sorted definition
(`top_k_top_p_min_p_mask_sorted`), so the GPU default is a measured choice. Times are of --chain calls inside one
jitted call (on distinct logits), divided by --chain: what the mask costs inside a step.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/sampler.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.kernels in a bare checkout)
    common,
)

GPU_ROWS, GPU_VOCAB = (1, 128, 256), 32000
CPU_ROWS, CPU_VOCAB = (1, 8), 512
WIDTHS = (1, 2, 4)


def make_inputs(rows: int, vocab: int, chain: int, seed: int) -> tuple[Any, ...]:
    """`chain` sets of float32 logits [B, V] and per-row filters that bind (top-k 50, top-p 0.9, min-p 0.05)."""
    import jax
    import jax.numpy as jnp

    logits = jax.random.normal(jax.random.PRNGKey(seed), (chain, rows, vocab), jnp.float32) * 3
    return logits, jnp.full(rows, 50, jnp.int32), jnp.full(rows, 0.9, jnp.float32), jnp.full(rows, 0.05, jnp.float32)


def run_case(rows: int, vocab: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from jpaged.sampler import top_k_top_p_min_p_mask, top_k_top_p_min_p_mask_sorted

    logits, top_k, top_p, min_p = make_inputs(rows, vocab, args.chain, args.seed)
    want = jax.jit(top_k_top_p_min_p_mask_sorted)(logits[0], top_k, top_p, min_p)
    out = []
    for bits in WIDTHS:
        row: dict[str, Any] = {"case": f"B={rows} V={vocab}", "rows": rows, "vocab": vocab, "digit_bits": bits,
                               "passes": 2 * 32 // bits}  # fmt: skip

        def chained(logits: Any, bits: int = bits) -> Any:  # unrolled: one launch per pass, as in the step
            return jnp.stack([top_k_top_p_min_p_mask(x, top_k, top_p, min_p, digit_bits=bits) for x in logits])

        mask = jax.jit(chained)
        try:
            got = mask(logits)
            row["ok"] = bool(jnp.array_equal(got[0], want))
            if not row["ok"]:
                row["error"] = "differs from top_k_top_p_min_p_mask_sorted"
            else:
                t = common.time_calls(functools.partial(mask, logits), warmup=1, iters=args.iters)
                row["time_us"] = t["pipelined_s"] / args.chain * 1e6
        except Exception as e:  # a width that fails to lower or run is a result, not a crash
            row |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        common.log(f"{row['case']:<16} {bits} bit(s): " + (f"{row['time_us']:.1f} us" if "time_us" in row else
                                                            row.get("error", "")))  # fmt: skip
        out.append(row)
    return out


COLUMNS = [
    ("case", "case"),
    ("digit bits", "digit_bits"),
    ("passes", "passes"),
    ("us in a chain", "time_us"),
    ("equal to sorted", "ok"),
    ("error", "error"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="batch rows B (default: per backend)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary V (default: per backend)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--chain", type=int, default=8, help="masks per timed call (distinct logits)")
    parser.add_argument("--seed", type=int, default=0)
    common.add_output_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    gpu = common.on_gpu()
    if not gpu:
        common.log("no GPU: small shapes (the widths' CPU times, not the GPU's)")
        args.iters = min(args.iters, 2)
        args.chain = min(args.chain, 2)
    rows_list = args.rows or (GPU_ROWS if gpu else CPU_ROWS)
    vocab = args.vocab or (GPU_VOCAB if gpu else CPU_VOCAB)
    rows: list[dict[str, Any]] = []
    record = {"benchmark": "sampler", "env": common.env_info(jax_devices=True), "args": vars(args), "rows": rows}
    for b in rows_list:
        rows += run_case(b, vocab, args)
        common.save(args, record)
    print(common.table(rows, COLUMNS, title="sampler mask: the radix search's digit width"))
    return record


if __name__ == "__main__":
    main()
