"""This machine's ceilings, measured as ../shared/anchors/anchors_gpu.py measured the roofline's constants.

    python benchmarks/ceilings.py --framework torch --json-out c.json   # copy bandwidth, as the anchor's 4.28 TB/s
    python benchmarks/ceilings.py --framework jax --json-out c.json     # bf16 matmul, as the anchor's 659 TFLOP/s

The roofline's constants (common.HBM_BYTES_PER_S, common.PEAK_FLOPS) were measured once, on one H200. The
device tool lends one of several, and the same engine run has differed by 3-4% from one to another (docs/benchmarks.md,
fourteenth session), so a record can measure the machine it ran on in the same call, by the anchor's own methods:
- torch: a 4 GiB device-to-device `copy_`, ten times between CUDA events, bytes read + written (the anchor: 4.28);
- jax: an 8192^3 bf16 matmul, the median of ten calls by the host clock (the anchor: 659 TFLOP/s).
Each first runs for --settle-s seconds: measured first thing in a fresh machine's call, the matmul read 498 TFLOP/s
(fourteenth session), while the engine's prefill in the same call ran 543; the GPU's clocks had not come up yet.
Each framework runs in a process of its own (both would claim the GPU's memory). On CPU the sizes shrink to a few
MiB (and the figures mean nothing); torch mode then needs torch installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/ceilings.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged packages in a bare checkout)
    common,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--framework", choices=("torch", "jax"), required=True)
    parser.add_argument("--copy-bytes", type=int, default=None,
                        help="bytes copied (default: 4 GiB on a GPU, 8 MiB else)")  # fmt: skip
    parser.add_argument("--matmul-side", type=int, default=None, help="matmul side (default: 8192 on a GPU, 256 else)")
    parser.add_argument("--settle-s", type=float, default=2.0, help="seconds of the same work before timing it")
    common.add_output_arguments(parser)
    return parser


def _settle(work: Any, sync: Any, seconds: float) -> None:
    """Runs `work` (then `sync`) until `seconds` have passed, at least three times."""
    end, runs = time.perf_counter() + seconds, 0
    while runs < 3 or time.perf_counter() < end:
        work()
        sync()
        runs += 1


def torch_copy_bandwidth(nbytes: int, settle_s: float) -> dict[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    _settle(lambda: y.copy_(x), torch.cuda.synchronize if device == "cuda" else lambda: None, settle_s)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(10):
            y.copy_(x)
        seconds = time.perf_counter() - t0
    tbps = 2 * nbytes * 10 / seconds / 1e12
    return {"copy_bytes": nbytes, "copy_TBps": tbps, "of_roofline_constant": tbps * 1e12 / common.HBM_BYTES_PER_S}


def jax_matmul_flops(side: int, settle_s: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (side, side), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    _settle(lambda: mm(a, a).block_until_ready(), lambda: None, settle_s)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    tflops = 2 * side**3 / sorted(times)[len(times) // 2] / 1e12  # the anchor's pick: the upper of the middle two
    return {"matmul_side": side, "bf16_matmul_TFLOPs": tflops,
            "of_roofline_constant": tflops * 1e12 / common.PEAK_FLOPS}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    gpu = common.on_gpu() if args.framework == "jax" else _torch_gpu()
    record: dict[str, Any] = {
        "benchmark": "ceilings",
        "env": common.env_info(jax_devices=args.framework == "jax", torch_device=args.framework == "torch"),
        "args": vars(args),
    }
    if args.framework == "torch":
        nbytes = args.copy_bytes or (4 * 1024**3 if gpu else 8 * 1024**2)
        record["ceiling"] = torch_copy_bandwidth(nbytes, args.settle_s)
        line = f"copy bandwidth (torch, read + written) {record['ceiling']['copy_TBps']:.3f} TB/s"
        constant = f"{common.HBM_BYTES_PER_S / 1e12:.2f} TB/s"
    else:
        record["ceiling"] = jax_matmul_flops(args.matmul_side or (8192 if gpu else 256), args.settle_s)
        line = f"bf16 matmul (jax) {record['ceiling']['bf16_matmul_TFLOPs']:.1f} TFLOP/s"
        constant = f"{common.PEAK_FLOPS / 1e12:.0f} TFLOP/s"
    common.save(args, record)
    print(f"{line}: {record['ceiling']['of_roofline_constant']:.1%} of the roofline's {constant}")
    return record


def _torch_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
