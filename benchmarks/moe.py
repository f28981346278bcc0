"""Mixtral's expert feed-forward, one layer: the Pallas grouped matmul against XLA's ragged_dot and the roofline.

    python benchmarks/moe.py --json-out moe.json           # GPU: Mixtral-8x7B sizes, T = 1 ... 4096 tokens
    python benchmarks/moe.py --sweep --json-out moe.json   # also tune the Pallas kernel per projection and T
    python benchmarks/moe.py --tiny                        # CPU (automatic there): minute sizes, interpreted

One layer of `jpaged.models.mixtral.moe` (route, sort by expert, gate and up, silu(gate) * up, down, weighted
combine) on T random tokens with a random router (Mixtral-8x7B: D 4096, F 14336, E 8, top-2, bf16; --tiny: D 64,
F 128), for each expert-matmul implementation of `grouped_matmul`:
- "xla": `jax.lax.ragged_dot` (what the model ran before the kernel; it may read every expert's weights);
- "pallas": the Triton-lowered Pallas kernel with its default tuning (interpreted off GPU);
- "dense": `moe_dense_reference` (every expert on every token), only for T <= --dense-max-tokens.

Every output is checked against the dense definition computed in float32 (relative L2 error <= 1e-2) before it is
timed; a failing implementation is reported, not timed. Time: `time_calls` in common.py ("pipelined": 20 calls back
to back, waited for once). Bytes: the weights of the experts the routing actually reached, read once
(unique experts hit x 3 x D x F x dtype bytes; the router and activations are left out); FLOPs: 2 x T x top-k x 3 x D
x F (the dense reference does E / top-k times more, not counted). Roofline: max(bytes / 4.28 TB/s, FLOPs / 659
TFLOP/s); the issue's goals are batch-1 decode >= 80% of it, and batch 256 >= 10x HF transformers (see decode.py).

--sweep times each projection's grouped matmul alone (gate/up, fused as the model runs it: K = D, N = 2F; down:
K = F, N = D) on the same routing, under the default tuning and a coordinate descent over GroupedMatmulTuning fields
(one field at a time, the others at the best so far), next to ragged_dot on the same inputs; the best tuning per
(T, projection) is what `default_tuning` should pick.

--padded measures what the engine's step runs: T real tokens inside the step's padded token bucket (a power of two
>= 16, as jpaged.runner pads), the padding routed to no expert (`moe`'s num_tokens), so the grouped matmuls see
bucket x top-k rows of which T x top-k are real (batch-1 decode: 2 real rows of 32).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/moe.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.kernels and jpaged.models in a bare checkout)
    common,
)

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
MAX_REL_ERR = 1e-2
# moe_dense_reference in bf16 rounds every expert's [T, E, D] output before the weighted sum: about twice the
# grouped paths' error (1.5e-2 against 5e-3 on the tiny shapes). It is a baseline, not what is under test.
MAX_REL_ERR_DENSE = 3e-2
GPU_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
TINY_TOKENS = (1, 4, 16, 64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    name: str
    hidden: int  # D
    ffn: int  # F
    experts: int  # E
    top_k: int
    dtype: str = "bfloat16"

    @property
    def dtype_bytes(self) -> int:
        return common.DTYPE_BYTES[self.dtype]

    def expert_bytes(self, experts_hit: int) -> int:
        return experts_hit * 3 * self.hidden * self.ffn * self.dtype_bytes

    def flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.top_k * 3 * self.hidden * self.ffn


MIXTRAL_8X7B = Shape(name="mixtral-8x7b", hidden=4096, ffn=14336, experts=8, top_k=2)
TINY = Shape(name="tiny", hidden=64, ffn=128, experts=8, top_k=2)


def model_config(shape: Shape) -> Any:
    from jpaged.models.config import ModelConfig, RopeConfig

    return ModelConfig(
        architecture="MixtralForCausalLM", vocab_size=32, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_layers=1, num_heads=1, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-5, rope=RopeConfig(),
        max_position_embeddings=64, tie_word_embeddings=False, num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
    )  # fmt: skip


def make_layer(shape: Shape, seed: int) -> dict[str, Any]:
    """Random expert weights scaled by 1 / sqrt(fan-in), and a random router (so random routing)."""
    import jax
    import jax.numpy as jnp

    d, f, e = shape.hidden, shape.ffn, shape.experts
    dtype = jnp.dtype(shape.dtype)
    keys = jax.random.split(jax.random.key(seed), 3)
    return {  # the model's layout (models/mixtral.py): gate and up fused
        "router": jax.random.normal(keys[0], (d, e), dtype),
        "expert_gate_up": (jax.random.normal(keys[1], (e, d, 2 * f), jnp.float32) / d**0.5).astype(dtype),
        "expert_down": (jax.random.normal(keys[2], (e, f, d), jnp.float32) / f**0.5).astype(dtype),
    }


def rel_err(out: Any, ref: Any) -> float:
    import jax.numpy as jnp

    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def routing(layer: dict[str, Any], x: Any, shape: Shape) -> tuple[Any, int]:
    """The group sizes [E] (int32) the layer's router gives these tokens, and how many experts they reach."""
    import jax.numpy as jnp
    import numpy as np

    from jpaged.models.mixtral import route

    _, experts = route(jnp.einsum("td,de->te", x, layer["router"]), shape.top_k)
    sizes = jnp.bincount(experts.reshape(-1), length=shape.experts).astype(jnp.int32)
    return sizes, int(np.count_nonzero(np.asarray(sizes)))


class Evaluator:
    """Checks, then times, one callable at a time; remembers every row."""

    def __init__(self, *, iters: int, bandwidth: float, peak: float) -> None:
        self.iters, self.bandwidth, self.peak = iters, bandwidth, peak
        self.rows: list[dict[str, Any]] = []

    def run(
        self,
        row: dict[str, Any],
        fn: Callable[[], Any],
        ref: Any,
        *,
        byts: float,
        flops: float,
        max_rel_err: float = MAX_REL_ERR,
    ) -> dict[str, Any]:
        roof = max(byts / self.bandwidth, flops / self.peak)
        row = row | {"bytes": byts, "flops": flops, "roofline_ms": roof * 1e3}
        try:
            out = common.block(fn())
            row["rel_err"] = rel_err(out, ref)
            row["ok"] = row["rel_err"] <= max_rel_err
            if not row["ok"]:
                row["error"] = f"relative error {row['rel_err']:.3g} > {max_rel_err}"
            else:
                t = common.time_calls(fn, warmup=1, iters=self.iters)
                s = t["pipelined_s"]
                row |= {
                    "time_ms": s * 1e3,
                    "per_call_median_ms": t["median_s"] * 1e3,
                    "TBps": byts / s / 1e12,
                    "of_hbm": byts / s / self.bandwidth,
                    "TFLOPs": flops / s / 1e12,
                    "of_peak": flops / s / self.peak,
                    "of_roofline": roof / s,
                }
        except Exception as e:  # a configuration that fails to lower or compile is a result, not a crash
            row |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        status = f"{row['time_ms']:.4f} ms, {row['TBps']:.3f} TB/s" if row.get("time_ms") else row.get("error")
        common.log(f"  T={row['tokens']:<5} {row.get('projection', 'layer'):<8} {row['impl']:<7} "
                   f"{row.get('config', ''):<36} {status}")  # fmt: skip
        self.rows.append(row)
        return row


# -- the whole layer --------------------------------------------------------------------------------------------------
def reference_f32(layer: dict[str, Any], x: Any, cfg: Any) -> Any:
    """`moe_dense_reference` with the experts in float32, routed exactly as `moe` routes (router logits in the
    layer's dtype), so that no near-tie between two experts flips between the reference and the checked output."""
    import jax
    import jax.numpy as jnp

    from jpaged.models.mixtral import route

    weights, experts = route(jnp.einsum("td,de->te", x, layer["router"]), cfg.num_experts_per_tok)
    dense_w = jnp.zeros((x.shape[0], cfg.num_experts), jnp.float32)
    dense_w = dense_w.at[jnp.arange(x.shape[0])[:, None], experts].set(weights)  # [T, E]
    x32 = x.astype(jnp.float32)
    gate, up = jnp.split(jnp.einsum("td,edf->tef", x32, layer["expert_gate_up"].astype(jnp.float32)), 2, axis=2)
    out = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, layer["expert_down"].astype(jnp.float32))
    return jnp.einsum("ted,te->td", out, dense_w)


def padded_rows(tokens: int, args: argparse.Namespace) -> int:
    """Rows of the step that carries `tokens` real tokens: the engine's token bucket with --padded, else T."""
    from jpaged.runner import MIN_TOKEN_BUCKET

    return max(MIN_TOKEN_BUCKET, 1 << (tokens - 1).bit_length()) if args.padded else tokens


def run_layer(shape: Shape, layer: dict[str, Any], tokens: int, args: argparse.Namespace, ev: Evaluator) -> None:
    import jax
    import jax.numpy as jnp

    from jpaged.models.mixtral import moe, moe_dense_reference

    cfg = model_config(shape)
    rows = padded_rows(tokens, args)
    x_rows = jax.random.normal(jax.random.key(args.seed + tokens), (rows, shape.hidden), jnp.dtype(shape.dtype))
    x = x_rows[:tokens]
    _, hit = routing(layer, x, shape)
    with jax.default_matmul_precision("highest"):
        ref = common.block(jax.jit(reference_f32, static_argnames="cfg")(layer, x, cfg))
    common.log(f"T={tokens}: {tokens * shape.top_k} assignments reach {hit} of {shape.experts} experts")
    impls = list(args.impls)
    if tokens > args.dense_max_tokens and "dense" in impls:
        impls.remove("dense")
    base = {"tokens": tokens, "rows": rows, "experts_hit": hit}
    for impl in impls:
        if impl == "dense":
            fn = functools.partial(jax.jit(functools.partial(moe_dense_reference, cfg=cfg)), layer, x)
        else:
            real_rows = jax.jit(lambda layer, x, n, impl=impl: moe(layer, x, cfg, n, impl=impl)[:tokens])
            fn = functools.partial(real_rows, layer, x_rows, jnp.int32(tokens))
        tol = MAX_REL_ERR_DENSE if impl == "dense" else MAX_REL_ERR
        ev.run(base | {"impl": impl}, fn, ref, byts=shape.expert_bytes(hit), flops=shape.flops(tokens),
               max_rel_err=tol)  # fmt: skip


# -- the tuning sweep -------------------------------------------------------------------------------------------------
# Candidate values per GroupedMatmulTuning field (fields the dataclass lacks are skipped), tried one field at a time.
GRIDS: dict[str, dict[str, tuple[int, ...]]] = {
    "quick": {
        "block_m": (16, 32, 64, 128),
        "block_n": (32, 64, 128, 256),
        "block_k": (32, 64, 128, 256),
        "k_splits": (1, 2, 4, 8),
        "num_warps": (4, 8),
        "num_stages": (2, 3, 4, 5),
        "group_m": (1, 4, 8, 16),
    },
    "tiny": {"block_n": (32,), "block_k": (32,), "k_splits": (2,)},
}


def sweep_projection(
    shape: Shape, layer: dict[str, Any], tokens: int, projection: str, args: argparse.Namespace, ev: Evaluator
) -> None:
    """One projection's grouped matmul on this T's routing: ragged_dot, the default tuning, then coordinate descent."""
    import math

    import jax
    import jax.numpy as jnp

    from jpaged.kernels import grouped_matmul, grouped_matmul_unsupported_reason
    from jpaged.kernels.grouped_matmul import default_tuning

    x = jax.random.normal(jax.random.key(args.seed + tokens), (tokens, shape.hidden), jnp.dtype(shape.dtype))
    sizes, hit = routing(layer, x, shape)
    rhs = layer["expert_gate_up"] if projection == "gate_up" else layer["expert_down"]
    rows, k, n = padded_rows(tokens, args) * shape.top_k, rhs.shape[1], rhs.shape[2]  # past T * top-k: padding
    lhs = jax.random.normal(jax.random.key(args.seed + 1), (rows, k), rhs.dtype)
    with jax.default_matmul_precision("highest"):
        ref = common.block(grouped_matmul(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, impl="xla"))
    byts, flops = hit * k * n * shape.dtype_bytes, 2.0 * tokens * shape.top_k * k * n
    base = {"tokens": tokens, "experts_hit": hit, "projection": projection, "rows": rows, "K": k, "N": n}
    ev.run(base | {"impl": "xla", "config": "ragged_dot"},
           lambda: grouped_matmul(lhs, rhs, sizes, impl="xla"), ref, byts=byts, flops=flops)  # fmt: skip
    seen: dict[Any, float] = {}

    def evaluate(tuning: Any) -> float:
        if tuning in seen:
            return seen[tuning]
        if len(seen) >= args.max_configs or grouped_matmul_unsupported_reason(lhs, rhs, tuning) is not None:
            seen[tuning] = math.inf
            return math.inf
        fn = functools.partial(grouped_matmul, impl="pallas", tuning=tuning)
        row = ev.run(base | {"impl": "pallas", "config": tuning.name, "tuning": dataclasses.asdict(tuning)},
                     lambda: fn(lhs, rhs, sizes), ref, byts=byts, flops=flops)  # fmt: skip
        seen[tuning] = row["time_ms"] if row.get("ok") and row.get("time_ms") else math.inf
        return seen[tuning]

    common.tune_coordinatewise(default_tuning(rows, k, n, shape.experts), evaluate, GRIDS[args.grid])


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest correct row per (T, projection, impl)."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        if row.get("ok") and row.get("time_ms") is not None:
            key = (row["tokens"], row.get("projection"), row["impl"])
            if key not in best or row["time_ms"] < best[key]["time_ms"]:
                best[key] = row
    return list(best.values())


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per T: each implementation's time, pallas' share of the roofline and its speed-up over ragged_dot."""
    out: dict[int, dict[str, Any]] = {}
    for row in rows:
        if not row.get("time_ms"):
            continue
        entry = out.setdefault(row["tokens"], {"tokens": row["tokens"], "experts_hit": row["experts_hit"],
                                               "roofline_ms": row["roofline_ms"]})  # fmt: skip
        entry[f"{row['impl']}_ms"] = row["time_ms"]
        if row["impl"] == "pallas":
            entry |= {"pallas_TBps": row["TBps"], "pallas_TFLOPs": row["TFLOPs"], "of_roofline": row["of_roofline"]}
    for entry in out.values():
        if entry.get("xla_ms") and entry.get("pallas_ms"):
            entry["speedup_vs_xla"] = entry["xla_ms"] / entry["pallas_ms"]
    return [out[t] for t in sorted(out)]


LAYER_COLUMNS = [
    ("T", "tokens"),
    ("impl", "impl"),
    ("experts hit", "experts_hit"),
    ("time ms", "time_ms"),
    ("per-call ms", "per_call_median_ms"),
    ("expert GB", "gb"),
    ("TB/s", "TBps"),
    ("of 4.28", "of_hbm"),
    ("TFLOP/s", "TFLOPs"),
    ("of 659", "of_peak"),
    ("roofline ms", "roofline_ms"),
    ("of roofline", "of_roofline"),
    ("rel err", "rel_err"),
]
SUMMARY_COLUMNS = [
    ("T", "tokens"),
    ("experts hit", "experts_hit"),
    ("xla ms", "xla_ms"),
    ("pallas ms", "pallas_ms"),
    ("dense ms", "dense_ms"),
    ("pallas / xla speed-up", "speedup_vs_xla"),
    ("pallas TB/s", "pallas_TBps"),
    ("pallas TFLOP/s", "pallas_TFLOPs"),
    ("roofline ms", "roofline_ms"),
    ("pallas of roofline", "of_roofline"),
]
SWEEP_COLUMNS = [
    ("T", "tokens"),
    ("projection", "projection"),
    ("rows", "rows"),
    ("experts hit", "experts_hit"),
    ("impl", "impl"),
    ("config", "config"),
    ("time ms", "time_ms"),
    ("TB/s", "TBps"),
    ("TFLOP/s", "TFLOPs"),
    ("of roofline", "of_roofline"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="minute sizes in interpret mode (the default off GPU)")
    parser.add_argument(
        "--tokens", type=lambda s: [int(t) for t in s.split(",")], default=None,
        help=f"comma-separated token counts T (default {','.join(map(str, GPU_TOKENS))}; "
        f"--tiny: {','.join(map(str, TINY_TOKENS))})",
    )  # fmt: skip
    parser.add_argument(
        "--impls", type=lambda s: s.split(","), default=["xla", "pallas", "dense"],
        help="comma-separated: xla (ragged_dot), pallas, dense (moe_dense_reference), reference (grouped jnp)",
    )  # fmt: skip
    parser.add_argument("--dense-max-tokens", type=int, default=64, help="time the dense reference only up to this T")
    parser.add_argument(
        "--padded", action="store_true",
        help="T real tokens inside the engine's padded token bucket, the padding routed to no expert (as a step runs)",
    )  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="also tune the Pallas kernel per projection and T")
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None, help="sweep grid (default quick; tiny on CPU)")
    parser.add_argument("--max-configs", type=int, default=24, help="most tunings tried per (T, projection)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth", type=float, default=common.HBM_BYTES_PER_S)
    parser.add_argument("--peak-flops", type=float, default=common.PEAK_FLOPS)
    common.add_output_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import jax

    gpu = jax.default_backend() == "gpu"
    args.tiny = args.tiny or not gpu
    args.interpret = not gpu
    args.grid = args.grid or ("tiny" if args.tiny else "quick")
    if args.tiny:
        args.iters = min(args.iters, 3)
    shape = TINY if args.tiny else MIXTRAL_8X7B
    tokens = args.tokens or (TINY_TOKENS if args.tiny else GPU_TOKENS)
    unknown = set(args.impls) - {"xla", "pallas", "dense", "reference"}
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}")
    common.log(f"{shape.name}: D {shape.hidden}, F {shape.ffn}, E {shape.experts}, top-{shape.top_k}, {shape.dtype}"
               f"{' (interpret mode)' if args.interpret else ''}")  # fmt: skip
    layer = make_layer(shape, args.seed)
    ev = Evaluator(iters=args.iters, bandwidth=args.bandwidth, peak=args.peak_flops)
    sweep = Evaluator(iters=args.iters, bandwidth=args.bandwidth, peak=args.peak_flops)
    record: dict[str, Any] = {
        "benchmark": "moe",
        "env": common.env_info(jax_devices=True),
        "args": vars(args),
        "interpret": args.interpret,
        "shape": dataclasses.asdict(shape),
    }

    def save() -> None:  # after every T: a run killed at a large T keeps the smaller ones
        for row in ev.rows:
            row["gb"] = row["bytes"] / 1e9
        record.update(summary=summarise(ev.rows), rows=ev.rows, sweep_best=best_rows(sweep.rows), sweep=sweep.rows)
        common.save(args, record)

    for t in tokens:
        run_layer(shape, layer, t, args, ev)
        save()
    if args.sweep:
        for t in tokens:
            for projection in ("gate_up", "down"):
                sweep_projection(shape, layer, t, projection, args, sweep)
            save()
    rows, summary = ev.rows, record["summary"]
    print(common.table(rows, LAYER_COLUMNS, title=f"one MoE layer, {shape.name} ({shape.dtype})"))
    print(common.table(summary, SUMMARY_COLUMNS, title="per T: pallas against ragged_dot and the roofline"))
    if sweep.rows:
        title = "tuning sweep: the best correct configuration per (T, projection, impl)"
        print(common.table(best_rows(sweep.rows), SWEEP_COLUMNS, title=title))
    failed = [r for r in rows + sweep.rows if not r.get("ok")]
    if failed:
        print(f"{len(failed)} configurations failed (compile errors or wrong results): see 'rows' in the JSON")
    return record


if __name__ == "__main__":
    main()
