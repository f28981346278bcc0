"""The sampler's top-k/top-p/min-p mask (jpaged/sampler.py): its radix search at each digit width, timed.

    python benchmarks/sampler.py --json-out sampler.json    # GPU: B = 1, 128, 256 rows, vocabularies of 32k and 128k
    python benchmarks/sampler.py                            # CPU: small shapes (times are the CPU's)

Every step of the engine computes the mask for every row (no data-dependent control flow in the step), through two
searches that each settle a 32-bit threshold `digit_bits` bits a pass over [B, V]: 1 bit (a bisection, 64 passes,
the default) or more (4 bits: 16 passes of 15 comparisons a token). On a GPU a pass may cost about its kernel launch,
so a wider digit may be cheaper there; on the CPU box 4 bits took 4.5x longer, and XLA on CPU gave it 2.56 GB of
temporaries against 0.66 GB at B = 256, V = 128k. This script times each width and records the compiled mask's
temporary bytes, each mask first checked equal to the sorted definition (`top_k_top_p_min_p_mask_sorted`), so the
default is a measured choice. Times are of --chain masks inside one jitted call, each fed by the one before (so a
compiler cannot merge their passes), divided by --chain: what the mask costs inside a step.
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

GPU_ROWS, GPU_VOCABS = (1, 128, 256), (32000, 128256)
CPU_ROWS, CPU_VOCABS = (1, 8), (512,)
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

        def chained(logits: Any, bits: int = bits) -> Any:
            masks, prev = [], jnp.zeros((rows, 1), jnp.float32)
            for x in logits:  # unrolled, each mask fed by the last: 1e-30 vanishes in any logit of magnitude > 1e-22
                masks.append(top_k_top_p_min_p_mask(x + prev * 1e-30, top_k, top_p, min_p, digit_bits=bits))
                prev = masks[-1][:, :1].astype(jnp.float32)
            return jnp.stack(masks)

        mask = jax.jit(chained)
        try:
            one = jax.jit(functools.partial(top_k_top_p_min_p_mask, digit_bits=bits))
            compiled = one.lower(logits[0], top_k, top_p, min_p).compile()
            memory = compiled.memory_analysis()  # None where the backend does not report it
            row["temp_MB"] = memory.temp_size_in_bytes / 1e6 if memory is not None else None
            got = mask(logits)
            row["ok"] = bool(jnp.array_equal(got[0], want))  # the first is unperturbed
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
    ("temp MB", "temp_MB"),
    ("equal to sorted", "ok"),
    ("error", "error"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="batch rows B (default: per backend)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabularies V (default: per backend)")
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
    vocabs = args.vocab or (GPU_VOCABS if gpu else CPU_VOCABS)
    rows: list[dict[str, Any]] = []
    record = {"benchmark": "sampler", "env": common.env_info(jax_devices=True), "args": vars(args), "rows": rows}
    for vocab in vocabs:
        for b in rows_list:
            rows += run_case(b, vocab, args)
            common.save(args, record)
    print(common.table(rows, COLUMNS, title="sampler mask: the radix search's digit width"))
    return record


if __name__ == "__main__":
    main()
