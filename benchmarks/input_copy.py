"""Does a step's fresh host input hold back the step's start on the device?

    python benchmarks/input_copy.py --json-out input_copy.json   # GPU: 8 bf16 8192^2 matmuls a step
    python benchmarks/input_copy.py                              # CPU: small matmuls (times are only ratios)

The engine hands each step one packed int32 buffer from the host (jpaged/transfer.py). H200 traces of the decode step
show the device idle ~0.8 ms a step between that buffer's host-to-device copy and the step's first kernel. One
reading: the runtime orders the copy into a freshly allocated device buffer behind all work already queued on the
compute stream (the allocator may hand out memory the running step is still using), so the copy, and the step after
it, wait for the previous step to end and for the host to hear of it. This times steps driven as the engine drives
them (step N+1 dispatched while step N runs, then step N's small output read, then some host work) with the input:
- `resident`: one device array made before the loop, no copy a step (the floor: the program alone, back to back);
- `numpy`: a fresh numpy array a step, converted by the jitted call (the engine as it is);
- `pinned`: a fresh numpy array a step, placed in pinned host memory, copied to the device by the program itself.
Each variant first runs `--settle-steps` untimed steps, then `--rounds` timed runs, the variants in turn, so drift in
the device's clocks lands on all of them; each round's difference from the resident run is recorded beside the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/input_copy.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged packages in a bare checkout)
    common,
)

OUT = 256  # int32 elements of the small output, as a step's sampled tokens
VARIANTS = ("resident", "numpy", "pinned")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_matmul_chain_arguments(parser, min_side=OUT)
    parser.add_argument("--input-len", type=int, default=65536,
                        help="int32 elements of the per-step input (a 512-row step's page tables: 65,536)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each variant, the variants in turn")
    parser.add_argument("--settle-steps", type=int, default=40,
                        help="untimed steps of each variant first (compiles; brings the GPU's clocks up)")  # fmt: skip
    parser.add_argument("--host-ms", type=float, default=2.0,
                        help="host work a step, spun after reading the previous step's output (the engine's "
                             "collect, schedule and pack: ~2-4 ms at 128 sequences)")  # fmt: skip
    common.add_output_arguments(parser)
    return parser


def measure(args: argparse.Namespace, size: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    def program(state, w, packed, prev, *, from_host: bool):
        if from_host:
            packed = jax.device_put(packed, jax.memory.Space.Device)
        x = state + (packed[:OUT].astype(jnp.bfloat16) * 0)[None, :1]
        for _ in range(args.chain):
            x = jnp.tanh(x @ w)
        out = (x[0, :OUT].astype(jnp.float32) * 100).astype(jnp.int32) + prev + packed[:OUT]
        return x, out

    step = jax.jit(program, static_argnames="from_host", donate_argnames=("state",))
    device = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    # (a numpy scalar is not weakly typed: dividing by np.sqrt would make w, and every matmul, float32)
    w = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16) / size**0.5
    state = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    resident = jnp.zeros(args.input_len, jnp.int32)
    rng = np.random.default_rng(0)

    def fresh(variant: str) -> Any:
        if variant == "resident":
            return resident
        host = rng.integers(0, 2, args.input_len, dtype=np.int32)  # a new buffer every step, as the engine packs
        return jax.device_put(host, pinned) if variant == "pinned" else host

    def spin(ms: float) -> None:
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            pass

    def run(variant: str, steps: int) -> float:
        """ms a step, driven as the engine drives steps: dispatch N+1, read N's output, host work."""
        nonlocal state
        prev = jnp.zeros(OUT, jnp.int32)
        last = None
        t0 = time.perf_counter()
        for _ in range(steps):
            state, out = step(state, w, fresh(variant), prev, from_host=variant == "pinned")
            out.copy_to_host_async()
            if last is not None:
                np.asarray(last)
                spin(args.host_ms)
            last, prev = out, out
        np.asarray(last)
        return (time.perf_counter() - t0) * 1e3 / steps

    for variant in VARIANTS:
        run(variant, args.settle_steps)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            times[variant].append(run(variant, args.steps))
    floor = statistics.median(times["resident"])
    rows = []
    for variant in VARIANTS:
        ms = statistics.median(times[variant])
        # each round's difference too: drift between rounds can exceed the medians' difference
        diffs = [t - r for t, r in zip(times[variant], times["resident"], strict=True)]
        rows.append({"input": variant, "step_ms": ms, "over_resident_ms": ms - floor, "runs_ms": times[variant],
                     "round_diffs_ms": diffs})  # fmt: skip
        common.log(f"{variant}: {ms:.3f} ms a step ({ms - floor:+.3f} against resident), runs {times[variant]}")
    return rows


COLUMNS = [("input", "input"), ("ms a step", "step_ms"), ("over resident ms", "over_resident_ms")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    size = common.matmul_side(args.size, OUT)
    record: dict[str, Any] = {"benchmark": "input_copy", "env": common.env_info(jax_devices=True), "args": vars(args)}
    record["rows"] = measure(args, size)
    common.save(args, record)
    print(common.table(record["rows"], COLUMNS, title=f"a step's host input, {args.chain} x {size}^2 matmuls"))
    return record


if __name__ == "__main__":
    main()
