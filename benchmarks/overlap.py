"""Does a finished step's small output reach the host while the next step runs, or only after it?

    python benchmarks/overlap.py --json-out overlap.json     # GPU: a ~26 ms program (8 bf16 8192^2 matmuls)
    python benchmarks/overlap.py                             # CPU: small matmuls (times meaningful only as ratios)

Async scheduling (jpaged/engine.py) dispatches step N+1 before it reads step N's sampled tokens, so it is only as
good as this: program A (a chain of matmuls, then a [256] int32 output) is dispatched, then program B, then A's output
is read. `a_ready_ms` is when that read returns, from A's dispatch: about one program when the read overlaps B,
about two when it waits for B. Variants: the carried state donated or not, the output's copy to the host started
before B's dispatch (`copy_to_host_async`) or not, the output written to pinned host memory by the program itself or
not, and B taking A's output as an input (as the engine's next step takes the previous samples) or not.
On the H200 (sixth session) every variant read A's output at one program's time: no serialization.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/overlap.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged packages in a bare checkout)
    common,
)

OUT = 256  # int32 elements of the small output, as a step's sampled tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_matmul_chain_arguments(parser, min_side=OUT)
    parser.add_argument("--iters", type=int, default=5)
    common.add_output_arguments(parser)
    return parser


def measure(size: int, chain: int, iters: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    def program(state, w, prev, *, to_host: bool):
        x = state
        for _ in range(chain):
            x = jnp.tanh(x @ w)
        out = (x[0, :OUT].astype(jnp.float32) * 100).astype(jnp.int32) + prev
        return x, (jax.device_put(out, jax.memory.Space.Host) if to_host else out), out

    w = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16) / np.sqrt(size)
    rows = []
    for donate, to_host, early, chained in itertools.product((True, False), repeat=4):
        step = jax.jit(program, static_argnames="to_host", donate_argnames=("state",) if donate else ())
        state = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
        prev = jnp.zeros(OUT, jnp.int32)
        alone = []
        for _ in range(iters + 2):  # the first two compile and settle
            t0 = time.perf_counter()
            state, a, _ = step(state, w, prev, to_host=to_host)
            np.asarray(a)
            alone.append((time.perf_counter() - t0) * 1e3)
        one_ms = statistics.median(alone[2:])
        ready = []
        for _ in range(iters):
            t0 = time.perf_counter()
            state, a, nxt = step(state, w, prev, to_host=to_host)
            if early:
                a.copy_to_host_async()
            state, b, _ = step(state, w, nxt if chained else prev, to_host=to_host)
            np.asarray(a)
            ready.append((time.perf_counter() - t0) * 1e3)
            np.asarray(b)
        a_ready = statistics.median(ready)
        rows.append({"donated": donate, "to_host": to_host, "early_copy": early, "chained": chained,
                     "one_program_ms": one_ms, "a_ready_ms": a_ready, "programs_waited": a_ready / one_ms})  # fmt: skip
        common.log(f"donated={donate} to_host={to_host} early_copy={early} chained={chained}: A read after "
                   f"{a_ready:.2f} ms, one program {one_ms:.2f} ms")  # fmt: skip
    return rows


COLUMNS = [
    ("donated", "donated"),
    ("pinned host", "to_host"),
    ("early copy", "early_copy"),
    ("B takes A", "chained"),
    ("one program ms", "one_program_ms"),
    ("A read after ms", "a_ready_ms"),
    ("programs waited", "programs_waited"),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    size = common.matmul_side(args.size, OUT)
    record: dict[str, Any] = {"benchmark": "overlap", "env": common.env_info(jax_devices=True), "args": vars(args)}
    record["rows"] = measure(size, args.chain, args.iters)
    common.save(args, record)
    print(common.table(record["rows"], COLUMNS, title=f"a step's output against the next step, {size}^2 matmuls"))
    return record


if __name__ == "__main__":
    main()
