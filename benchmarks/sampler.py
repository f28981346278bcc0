"""The sampler's top-k/top-p/min-p mask (jpaged/sampler.py): who runs its threshold searches, timed.

    python benchmarks/sampler.py --json-out sampler.json    # GPU: B = 1, 128 rows, vocabularies of 32k and 128k
    python benchmarks/sampler.py                            # CPU: small shapes (times are the CPU's)

Every step of the engine computes the mask for every row (no data-dependent control flow in the step), through two
searches that each settle a 32-bit threshold. In XLA ("xla-Nbit") a search is a chain of passes over [B, V], each
settling N bits: 1 bit (a bisection, 64 passes, XLA's default) or 4 (16 passes of 15 comparisons a token); on a
GPU each pass is a kernel launch. "pallas" runs both searches of a row in one program (jpaged.kernels.filter_search,
opt-in); "kernel <tuning>" times that kernel alone at each tuning in KERNEL_TUNINGS, checked against its
sorted reference. Each mask is first checked equal to the sorted definition (`top_k_top_p_min_p_mask_sorted`);
temporary bytes are the compiled mask's. Times are of --chain calls inside one jitted call, each fed by the one
before (so a compiler cannot merge their passes), divided by --chain: what the mask costs inside a step.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/sampler.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.kernels in a bare checkout)
    common,
)

GPU_ROWS, GPU_VOCABS = (1, 128), (32000, 128256)
CPU_ROWS, CPU_VOCABS = (1, 8), (512,)
# mask variants: keyword arguments of top_k_top_p_min_p_mask (interpret is added off GPU)
MASKS: dict[str, dict[str, Any]] = {
    "xla-1bit": {"search": "xla", "digit_bits": 1},
    "xla-4bit": {"search": "xla", "digit_bits": 4},
    "pallas": {"search": "pallas"},
}
KERNEL_TUNINGS = ((1024, 8, 2), (512, 8, 3), (2048, 16, 2), (256, 4, 2))  # (block, num_warps, num_stages)


def make_inputs(rows: int, vocab: int, chain: int, seed: int) -> tuple[Any, ...]:
    """`chain` sets of float32 logits [B, V] and per-row filters that bind (top-k 50, top-p 0.9, min-p 0.05)."""
    import jax
    import jax.numpy as jnp

    logits = jax.random.normal(jax.random.PRNGKey(seed), (chain, rows, vocab), jnp.float32) * 3
    return logits, jnp.full(rows, 50, jnp.int32), jnp.full(rows, 0.9, jnp.float32), jnp.full(rows, 0.05, jnp.float32)


def chain_calls(fn: Any, rows: int) -> Any:
    """fn(x, ...) applied to each of [C, B, V] logits in turn, each call's input perturbed by the last one's output
    (its first leaf times 1e-30: at most 4.3e-21 for the kernel's uint32 keys, which vanishes in any logit of
    magnitude > 1e-13), unrolled in one function."""
    import jax
    import jax.numpy as jnp

    def chained(logits: Any, *args: Any) -> Any:
        outs, prev = [], jnp.zeros((rows, 1), jnp.float32)
        for x in logits:
            out = fn(x + prev * 1e-30, *args)
            outs.append(out)
            first = jax.tree.leaves(out)[0]
            prev = first.reshape(rows, -1)[:, :1].astype(jnp.float32)
        return outs

    return chained


def time_variant(row: dict[str, Any], fn: Any, check: Any, inputs: tuple[Any, ...], args: argparse.Namespace) -> None:
    """Fills row with temp_MB, ok, time_us (or error): fn(*inputs) compiled alone, checked, then timed chained."""
    import jax

    logits, *rest = inputs
    try:
        compiled = jax.jit(fn).lower(logits[0], *rest).compile()
        memory = compiled.memory_analysis()  # None where the backend does not report it
        row["temp_MB"] = memory.temp_size_in_bytes / 1e6 if memory is not None else None
        chained = jax.jit(chain_calls(fn, row["rows"]))
        got = chained(logits, *rest)
        row["ok"] = bool(check(got[0]))  # the first is unperturbed
        if not row["ok"]:
            row["error"] = "differs from the sorted reference"
        else:
            t = common.time_calls(functools.partial(chained, logits, *rest), warmup=1, iters=args.iters)
            row["time_us"] = t["pipelined_s"] / args.chain * 1e6
    except Exception as e:  # a variant that fails to lower or run is a result, not a crash
        row |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    common.log(f"{row['case']:<16} {row['variant']}: " + (f"{row['time_us']:.1f} us" if "time_us" in row else
                                                          row.get("error", "")))  # fmt: skip


def run_case(rows: int, vocab: int, args: argparse.Namespace, done: Callable[[dict[str, Any]], None]) -> None:
    """Times every variant at B = rows, V = vocab, handing each row to `done` as it is measured (a run cut short by
    a time limit keeps what it measured)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jpaged.kernels import filter_search
    from jpaged.sampler import _order_keys, top_k_top_p_min_p_mask, top_k_top_p_min_p_mask_sorted

    interpret = not common.on_gpu()
    inputs = make_inputs(rows, vocab, args.chain, args.seed)
    logits, top_k, top_p, min_p = inputs
    want = jax.jit(top_k_top_p_min_p_mask_sorted)(logits[0], top_k, top_p, min_p)
    case = {"case": f"B={rows} V={vocab}", "rows": rows, "vocab": vocab}
    for name in args.variants:
        kwargs = MASKS[name] | ({"interpret": True} if interpret and name == "pallas" else {})
        row = case | {"variant": name}
        fn = functools.partial(top_k_top_p_min_p_mask, **kwargs)
        time_variant(row, fn, lambda got: jnp.array_equal(got, want), inputs, args)
        done(row)
    if args.kernel_tunings:
        weights = jnp.exp(logits[0] - logits[0].max(-1, keepdims=True))
        reference = filter_search.filter_thresholds_reference(_order_keys(logits[0]), weights, top_k, top_p)

        def check(got: Any) -> bool:  # the keys exactly, the mass (summed in another order) closely
            kth, normaliser, top_p_last = (np.asarray(a) for a in got)
            return (np.array_equal(kth, reference[0]) and np.array_equal(top_p_last, reference[2])
                    and np.allclose(normaliser, reference[1], rtol=1e-5, atol=0))  # fmt: skip

        for block, warps, stages in KERNEL_TUNINGS:
            tuning = filter_search.FilterSearchTuning(block=block, num_warps=warps, num_stages=stages)

            def kernel(x: Any, top_k: Any, top_p: Any, min_p: Any, tuning: Any = tuning) -> Any:
                del min_p
                keys, w = _order_keys(x), jnp.exp(x - x.max(-1, keepdims=True))
                return filter_search.filter_thresholds(keys, w, top_k, top_p, tuning=tuning, interpret=interpret)

            row = case | {"variant": f"kernel {block}/{warps}/{stages}"}
            time_variant(row, kernel, check, inputs, args)
            done(row)


COLUMNS = [
    ("case", "case"),
    ("variant (kernel: block/warps/stages)", "variant"),
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
    parser.add_argument("--chain", type=int, default=4, help="masks per timed call (distinct logits)")
    parser.add_argument("--variants", nargs="*", choices=list(MASKS), default=list(MASKS), help="mask variants")
    parser.add_argument("--kernel-tunings", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the search kernel alone at each of KERNEL_TUNINGS")  # fmt: skip
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

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        common.save(args, record)

    for vocab in vocabs:
        for b in rows_list:
            run_case(b, vocab, args, done)
    print(common.table(rows, COLUMNS, title="sampler mask: who runs the threshold searches"))
    return record


if __name__ == "__main__":
    main()
