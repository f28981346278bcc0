"""One decoder layer's weight matmuls at decode batch sizes: separate, fused, through jpaged's Pallas kernel, and
under cuBLAS.

    python benchmarks/gemm.py --json-out gemm.json                 # GPU: Llama-2-7B layer, M = 1 ... 256 rows
    python benchmarks/gemm.py --cublas --json-out gemm.json        # the same in a child process whose XLA uses
                                                                   # cuBLAS for every GEMM (no Triton GEMM fusions)
    python benchmarks/gemm.py --sweep --json-out gemm.json         # also tune the kernel per projection and M
    python benchmarks/gemm.py                                      # CPU: a tiny layer (times meaningless)

Why: a trace of a Llama-2-7B decode step at 128 sequences (docs/benchmarks.md, third session) spent 4.8 ms on the
weight matmuls for 13 GB (2.7 TB/s): XLA's Triton GEMM fusions for q/k/v, gate and up ran at 2.4-2.8 TB/s and the
one GEMM XLA gave to cuBLAS (the down projection) at 3.15 TB/s. This measures, per layer, M rows of x [M, D] through
- "model": seven matmuls as models/llama.py wrote them until the fused layout (q, k, v, o, gate, up, down);
- "fused": four matmuls over concatenated weights (one [D, (N + 2K) H] for q/k/v, one [D, 2F] for gate and up),
  the bytes and shapes models/llama.py now loads (its q/k/v are ordered per KV head; the GEMM is the same);
- "kernel": the fused four through `jpaged.kernels.grouped_matmul.matmul` (the Pallas kernel, default tuning),
  as the model runs decode steps with matmul_impl="pallas" on a GPU;
- "mgpu" (M <= 256): the fused four through `jpaged.kernels.matmul_mgpu` (Mosaic GPU, weights streamed by TMA;
  Hopper only, its interpreter off GPU), as the model runs them with matmul_impl="mgpu";
and, with --cublas, the first two again with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false. --sweep then times each
fused projection alone (qkv, o, gate_up, down) under XLA, with the weight as the model stores it ([K, N]) and
N-major ("xla-nk", [N, K] as HF stores it), and under a coordinate descent of kernel tunings (of the Triton-lowered
kernel, or with --sweep-impl mgpu of the Mosaic GPU one; --max-configs 0: none); with --cublas too, XLA's two again
under cuBLAS ("xla-cublas", "xla-nk-cublas": which of XLA's two GEMM libraries streams each projection faster, where
a whole layer under cuBLAS only averages them). Each variant is checked against
the "model" output first (relative L2 error <= 1e-2). Bytes = the layer's weights read once; floor = bytes /
4.28 TB/s (at these M every GEMM is bandwidth-bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/gemm.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common

MAX_REL_ERR = 1e-2
CUBLAS_FLAG = "--xla_gpu_enable_triton_gemm=false"
# (name, D, N q-heads, K kv-heads, H, F)
GPU_SHAPE = ("llama2-7b", 4096, 32, 32, 128, 11008)
TINY_SHAPE = ("tiny", 64, 4, 2, 16, 128)
GPU_ROWS = (1, 16, 64, 128, 256)
TINY_ROWS = (1, 16)


def make_layer(d: int, n: int, k: int, h: int, f: int, *, seed: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    shapes = {"wq": (d, n, h), "wk": (d, k, h), "wv": (d, k, h), "wo": (n, h, d), "w_gate": (d, f), "w_up": (d, f),
              "w_down": (f, d)}  # fmt: skip
    return {name: jax.random.normal(next(keys), shape, jnp.bfloat16) * d**-0.5 for name, shape in shapes.items()}


def model_matmuls(layer: dict[str, Any], x: Any) -> Any:
    """The layer's matmuls as models/llama.py runs them (attention replaced by q itself; only GEMMs are timed)."""
    import jax
    import jax.numpy as jnp

    q = jnp.einsum("td,dnh->tnh", x, layer["wq"])
    k = jnp.einsum("td,dkh->tkh", x, layer["wk"])
    v = jnp.einsum("td,dkh->tkh", x, layer["wv"])
    o = jnp.einsum("tnh,nhd->td", q, layer["wo"])
    gate = jnp.einsum("td,df->tf", x, layer["w_gate"])
    up = jnp.einsum("td,df->tf", x, layer["w_up"])
    down = jnp.einsum("tf,fd->td", jax.nn.silu(gate) * up, layer["w_down"])
    return o + down, k, v


def fuse(layer: dict[str, Any]) -> dict[str, Any]:
    import jax.numpy as jnp

    return {
        "wqkv": jnp.concatenate([layer["wq"], layer["wk"], layer["wv"]], axis=1),  # [D, N + 2K, H]
        "wo": layer["wo"],
        "w_gate_up": jnp.concatenate([layer["w_gate"], layer["w_up"]], axis=1),  # [D, 2F]
        "w_down": layer["w_down"],
    }


def fused_matmuls(fused: dict[str, Any], x: Any, *, num_heads: int, num_kv_heads: int, mm: Any = None) -> Any:
    """The four fused matmuls, each as `mm(x [M, K], w [K, N])` on the weight viewed 2-D, as models/llama.py's
    `project` runs them; mm None is XLA's dot."""
    import jax

    mm = mm or jax.numpy.dot
    d, c, h = fused["wqkv"].shape
    qkv = mm(x, fused["wqkv"].reshape(d, c * h)).reshape(-1, c, h)
    q, k, v = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads :]
    o = mm(q.reshape(q.shape[0], -1), fused["wo"].reshape(-1, d))
    gate, up = jax.numpy.split(mm(x, fused["w_gate_up"]), 2, axis=1)
    down = mm(jax.nn.silu(gate) * up, fused["w_down"])
    return o + down, k, v


def projections(fused: dict[str, Any]) -> dict[str, Any]:
    """The four fused weights as [K, N] matrices."""
    d = fused["wqkv"].shape[0]
    return {"qkv": fused["wqkv"].reshape(d, -1), "o": fused["wo"].reshape(-1, d), "gate_up": fused["w_gate_up"],
            "down": fused["w_down"]}  # fmt: skip


# Candidate values per tuning field, tried one field at a time (common.tune_coordinatewise); fields a kernel's
# tuning lacks are skipped.
SWEEP_GRID: dict[str, tuple[int, ...]] = {
    "block_m": (16, 32, 64, 128),
    "block_n": (64, 128, 256),
    "block_k": (32, 64, 128, 256),
    "k_splits": (1, 2, 4, 8, 16),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 6),
    "group_m": (1, 4, 8),
}


def sweep(fused: dict[str, Any], args: argparse.Namespace, rows_out: list[dict[str, Any]]) -> None:
    """Each fused projection alone at each M: XLA's dot, the kernel's default tuning, then coordinate descent."""
    import math

    import jax

    from jpaged.kernels.grouped_matmul import default_tuning as pallas_tuning
    from jpaged.kernels.grouped_matmul import matmul, matmul_unsupported_reason
    from jpaged.kernels.matmul_mgpu import default_tuning as mgpu_tuning
    from jpaged.kernels.matmul_mgpu import matmul_mgpu, matmul_mgpu_unsupported_reason

    if args.sweep_impl == "mgpu":
        default_tuning: Any = mgpu_tuning
        unsupported: Any = matmul_mgpu_unsupported_reason
        kernel: Any = functools.partial(matmul_mgpu, interpret=not common.on_gpu())
    else:
        default_tuning = functools.partial(pallas_tuning, num_groups=1)
        unsupported = matmul_unsupported_reason
        kernel = functools.partial(matmul, impl="pallas")

    def chained(fn: Any, x: Any, ws: list[Any]) -> Any:
        """A call of fn over every copy of the weight in one jitted function: a projection alone is 8-45 us on the
        H200, under a call's launch, so timing it call by call measures the host (the earlier sweeps did)."""
        return functools.partial(jax.jit(lambda x, ws: [fn(x, w) for w in ws]), x, ws)

    transpose = jax.jit(jax.numpy.transpose)  # one compiled transpose for every copy
    xla_suffix = "-cublas" if CUBLAS_FLAG in os.environ.get("XLA_FLAGS", "") else ""
    for m in args.rows or (TINY_ROWS if args.tiny else GPU_ROWS):
        for proj, w in projections(fused).items():
            if args.projections and proj not in args.projections:
                continue
            k, n = w.shape
            x = jax.random.normal(jax.random.PRNGKey(args.seed + m), (m, k), w.dtype)
            byts = k * n * w.dtype.itemsize
            # distinct buffers, together past the L2 cache, so each call streams its weights from HBM
            copies = 1 if args.tiny else max(2, -(-args.chain_bytes // byts))
            ws = [w] + [jax.jit(lambda w: w + 0)(w) for _ in range(copies - 1)]
            ref = [common.block(matmul(x, w, impl="xla"))] * copies
            base = {"rows": m, "projection": proj, "K": k, "N": n, "weight_bytes": byts,
                    "floor_us": byts / args.bandwidth * 1e6}  # fmt: skip
            seen: dict[Any, float] = {}

            def run(
                config: str,
                fn: Any,
                tuning: Any = None,
                base: dict[str, Any] = base,
                ref: Any = ref,
                m: int = m,
                proj: str = proj,
            ) -> float:
                row = dict(base, config=config, impl="xla" if config.startswith("xla") else args.sweep_impl)
                try:
                    row["rel_err"] = rel_err(common.block(fn()), ref)
                    row["ok"] = row["rel_err"] <= MAX_REL_ERR
                    if row["ok"]:
                        seconds = common.time_calls(fn, warmup=1, iters=args.iters)["pipelined_s"] / len(ref)
                        row |= {"time_us": seconds * 1e6, "TBps": row["weight_bytes"] / seconds / 1e12}
                except Exception as e:  # a tuning that fails to compile is a result
                    first = str(e).splitlines()[0][:200] if str(e) else ""
                    row |= {"ok": False, "error": f"{type(e).__name__}: {first}"}
                if tuning is not None:
                    row["tuning"] = dataclasses.asdict(tuning)
                status = f"{row['time_us']:.1f} us, {row['TBps']:.2f} TB/s" if row.get("time_us") else row.get("error")
                common.log(f"  M={m:<4} {proj:<8} {config:<32} {status}")
                rows_out.append(row)
                return row["time_us"] if row.get("time_us") else math.inf

            run("xla" + xla_suffix, chained(functools.partial(matmul, impl="xla"), x, ws))
            # The same product with the weight stored N-major ([N, K], HF's nn.Linear layout: each output's K weights
            # contiguous), as a GEMV kernel (cuBLAS's "T" case) would read it.
            ws_nk = [transpose(w) for w in ws]
            nk = chained(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))), x, ws_nk)
            run("xla-nk" + xla_suffix, nk)
            del ws_nk

            def evaluate(tuning: Any, x: Any = x, w: Any = w, ws: Any = ws, seen: dict[Any, float] = seen) -> float:
                if tuning not in seen:
                    if len(seen) >= args.max_configs or unsupported(x, w, tuning) is not None:
                        seen[tuning] = math.inf
                    else:
                        fn = chained(functools.partial(kernel, tuning=tuning), x, ws)
                        seen[tuning] = run(tuning.name, fn, tuning)
                return seen[tuning]

            common.tune_coordinatewise(default_tuning(m, k, n), evaluate, SWEEP_GRID)


def best_sweep_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (M, projection): XLA's rows (both layouts) and the fastest correct kernel tuning."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        if row.get("time_us"):
            key = (row["rows"], row["projection"], row["config"] if row["config"].startswith("xla") else "kernel")
            if key not in best or row["time_us"] < best[key]["time_us"]:
                best[key] = row
    return [best[key] for key in sorted(best)]


def rel_err(out: Any, ref: Any) -> float:
    import jax.numpy as jnp

    diffs = [jnp.linalg.norm((a - b).astype(jnp.float32)) for a, b in zip(out, ref, strict=True)]
    norms = [jnp.linalg.norm(b.astype(jnp.float32)) for b in ref]
    return float(max(d / jnp.maximum(n, 1e-30) for d, n in zip(diffs, norms, strict=True)))


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:

    import jax
    import jax.numpy as jnp

    name, d, n, k, h, f = TINY_SHAPE if args.tiny else GPU_SHAPE
    layer = make_layer(d, n, k, h, f, seed=args.seed)
    fused = fuse(layer)
    weight_bytes = sum(w.size * w.dtype.itemsize for w in layer.values())
    model_fn = jax.jit(model_matmuls)
    from jpaged.kernels import matmul_mgpu
    from jpaged.kernels.grouped_matmul import matmul

    def fused_fn_with(mm: Any = None) -> Any:
        return jax.jit(functools.partial(fused_matmuls, num_heads=n, num_kv_heads=k, mm=mm))

    fused_fn = fused_fn_with()
    kernel_fn = fused_fn_with(functools.partial(matmul, impl="pallas"))
    mgpu_fn = fused_fn_with(functools.partial(matmul_mgpu.matmul_mgpu, interpret=not common.on_gpu()))
    xla = "cublas" if CUBLAS_FLAG in os.environ.get("XLA_FLAGS", "") else "default"
    rows = []
    for m in args.rows or (TINY_ROWS if args.tiny else GPU_ROWS):
        x = jax.random.normal(jax.random.PRNGKey(args.seed + m), (m, d), jnp.bfloat16)
        ref = common.block(model_fn(layer, x))
        variants = [("model", functools.partial(model_fn, layer, x)), ("fused", functools.partial(fused_fn, fused, x))]
        if xla == "default" and (common.on_gpu() or args.tiny):  # the kernel is the same under either XLA flag
            variants.append(("kernel", functools.partial(kernel_fn, fused, x)))
            if m <= matmul_mgpu.MAX_ROWS:
                variants.append(("mgpu", functools.partial(mgpu_fn, fused, x)))
        for variant, fn in variants:
            row: dict[str, Any] = {
                "shape": name,
                "rows": m,
                "variant": variant,
                "xla_gemms": xla,
                "weight_bytes": weight_bytes,
                "floor_us": weight_bytes / args.bandwidth * 1e6,
            }
            try:
                row["rel_err"] = rel_err(common.block(fn()), ref)
                row["ok"] = row["rel_err"] <= MAX_REL_ERR
            except Exception as e:  # the kernel cannot tile these shapes (or fails to compile): report, go on
                row |= {"rel_err": None, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            if row["ok"]:
                t = common.time_calls(fn, warmup=1, iters=args.iters)
                seconds = t["pipelined_s"]
                row |= {"time_us": seconds * 1e6, "TBps": weight_bytes / seconds / 1e12,
                        "of_floor": row["floor_us"] / (seconds * 1e6)}  # fmt: skip
            elif row["rel_err"] is not None:
                row["error"] = f"relative error {row['rel_err']:.3g} > {MAX_REL_ERR}"
            status = f"{row['time_us']:.1f} us, {row['TBps']:.2f} TB/s" if row.get("time_us") else row["error"]
            common.log(f"{name} M={m:<4} {variant:<6} XLA {xla:<8} {status}")
            rows.append(row)
    return rows


COLUMNS = [
    ("M rows", "rows"),
    ("variant", "variant"),
    ("XLA GEMMs", "xla_gemms"),
    ("time us", "time_us"),
    ("weights TB/s", "TBps"),
    ("floor us", "floor_us"),
    ("of floor", "of_floor"),
    ("rel err", "rel_err"),
]


SWEEP_COLUMNS = [
    ("M rows", "rows"),
    ("projection", "projection"),
    ("K", "K"),
    ("N", "N"),
    ("config", "config"),
    ("time us", "time_us"),
    ("TB/s", "TBps"),
    ("floor us", "floor_us"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="M, rows of x (default: per backend)")
    parser.add_argument("--cublas", action="store_true", help=f"also run a child process with XLA_FLAGS={CUBLAS_FLAG}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the --cublas child: print JSON rows
    parser.add_argument("--tiny", action="store_true", help="a tiny layer (the default off GPU)")
    parser.add_argument("--sweep", action="store_true", help="also tune the kernel per fused projection and M")
    parser.add_argument("--sweep-impl", choices=("pallas", "mgpu"), default="pallas", help="the kernel --sweep tunes")
    parser.add_argument("--projections", nargs="+", choices=("qkv", "o", "gate_up", "down"), default=None,
                        help="--sweep only these projections (default: all four)")  # fmt: skip
    parser.add_argument("--max-configs", type=int, default=14,
                        help="most kernel tunings tried per (M, projection); 0: XLA's two layouts only")  # fmt: skip
    parser.add_argument(
        "--chain-bytes",
        type=int,
        default=1 << 30,
        help="--sweep times each projection over copies of its weight totalling this many bytes",
    )
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth", type=float, default=common.HBM_BYTES_PER_S)
    common.add_output_arguments(parser)
    return parser


def sweep_layer(args: argparse.Namespace) -> list[dict[str, Any]]:
    _, d, n, k, h, f = TINY_SHAPE if args.tiny else GPU_SHAPE
    rows: list[dict[str, Any]] = []
    sweep(fuse(make_layer(d, n, k, h, f, seed=args.seed)), args, rows)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.tiny = args.tiny or not common.on_gpu()
    if args.tiny:
        args.iters = min(args.iters, 2)
    rows = measure(args)
    if args.child:
        child_sweep = sweep_layer(args) if args.sweep else []
        print("ROWS " + json.dumps({"rows": rows, "sweep": child_sweep}))
        return {"rows": rows, "sweep": child_sweep}
    cublas_sweep: list[dict[str, Any]] = []
    if args.cublas:  # XLA reads its flags once per process, so the cuBLAS run needs its own
        env = os.environ | {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {CUBLAS_FLAG}".strip()}
        child = ["--child", "--iters", str(args.iters), "--seed", str(args.seed), "--bandwidth", str(args.bandwidth)]
        child += ["--rows", *map(str, args.rows)] if args.rows else []
        child += ["--tiny"] if args.tiny else []
        if args.sweep:  # XLA's two layouts only: the kernels do not change with XLA's flags
            child += ["--sweep", "--max-configs", "0", "--chain-bytes", str(args.chain_bytes)]
            child += ["--projections", *args.projections] if args.projections else []
        cmd = [sys.executable, str(Path(__file__).resolve()), *child]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        from_child = json.loads(next(line[5:] for line in out.splitlines() if line.startswith("ROWS ")))
        rows += from_child["rows"]
        cublas_sweep = from_child["sweep"]
    print(common.table(rows, COLUMNS, title="one layer's weight matmuls"))
    record: dict[str, Any] = {
        "benchmark": "gemm",
        "env": common.env_info(jax_devices=True),
        "args": vars(args),
        "rows": rows,
    }
    common.save(args, record)
    if args.sweep:
        sweep_rows = sweep_layer(args) + cublas_sweep
        record |= {"sweep": sweep_rows, "sweep_best": best_sweep_rows(sweep_rows)}
        common.save(args, record)
        print(common.table(record["sweep_best"], SWEEP_COLUMNS, title="per projection: XLA and the best kernel tuning"))
    return record


if __name__ == "__main__":
    main()
