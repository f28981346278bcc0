"""Does a weight read into L2 ahead of its one-row GEMV make the GEMV faster, and by how much?

    python benchmarks/l2_prefetch.py --model llama2-7b --json-out l2.json      # GPU: the 7B shape's projections
    python benchmarks/l2_prefetch.py                                          # CPU: the bundled model, interpreted

Why: the single-stream decode step spends ~20 us a layer in kernels that leave HBM idle (attention, norms, rope), and
its GEMVs stream below the copy bandwidth (docs/benchmarks.md). pallas_kernels/l2_prefetch.py reads a weight into L2
beside those kernels; this measures the two halves of that bet apart from the model, per projection, over as many
layers' weights as the config has (so each GEMV's weights start past the 50 MB L2):
- "cold": x @ w for each layer's w, as the step runs it now;
- "cold chain" / "hot chain": the same GEMVs each fed the last one's output (a small add between), over each layer's w
  / over the first layer's w every time, which after the first call sits in L2 (o's 34 MB fits; the others do not);
- "prefetch": the prefetch kernel alone over each w (its first --max-mb MB; o's whole matrix), then a tiny op that
  waits for it;
- "prefetch+gemv": the same, then the GEMV, which waits for the prefetch;
and "warm gemv" = prefetch+gemv - prefetch, what the GEMV takes once its weights (or their first part) sit in L2.
The kernel's output is checked against its reference first. Times are per layer (pipelined calls, common.time_calls).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/l2_prefetch.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)

COPY_BW = 4.28e12
# (projection, whole matrix?) in a layer's order
PROJECTIONS = (("wqkv", False), ("wo", True), ("w_gate_up", False), ("w_down", False))


def _layers(model: str, num_layers: int | None) -> list[dict[str, Any]]:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jpaged import sharding
    from jpaged.models.config import ModelConfig
    from jpaged.models.loader import dummy_params

    cfg = ModelConfig.from_pretrained(common.resolve_model(model))
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    mesh = sharding.make_mesh(1)
    dtype = jnp.bfloat16 if common.on_gpu() else jnp.float32
    params = dummy_params(cfg, mesh, dtype)
    del params["embed"]
    params.pop("lm_head", None)
    jax.block_until_ready(params)
    return params["layers"]


def measure_projection(layers: list[dict[str, Any]], name: str, *, whole: bool, max_mb: int,
                       iters: int) -> dict[str, Any]:  # fmt: skip
    """One projection's row of the table (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jpaged.kernels.l2_prefetch import l2_prefetch, l2_prefetch_reference, nan_if_any
    from jpaged.models import llama

    max_bytes = None if whole else max_mb * 10**6
    prefetch = functools.partial(l2_prefetch, max_bytes=max_bytes, interpret=not common.on_gpu())
    w0 = layers[0][name]
    lead = 2 if name == "wo" else 1  # o contracts [N, H]
    x = jnp.ones((1, int(np.prod(w0.shape[:lead]))), w0.dtype)
    with_nan = w0.at[(0,) * w0.ndim].set(jnp.nan)
    got = prefetch(with_nan, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(l2_prefetch_reference(with_nan, x, max_bytes=max_bytes)))
    assert float(jnp.sum(got)) == 1.0, "the kernel missed the NaN it was given"

    def gemv(x: jax.Array, w: jax.Array) -> jax.Array:
        return llama.project(x.reshape(1, *w.shape[:lead]), {name: w}, name, impl="auto")

    def after_prefetch(w: jax.Array, x: jax.Array) -> jax.Array:  # x, once the prefetch of w has run
        return x + nan_if_any([prefetch(w, x)]).astype(x.dtype)

    def chain(ws: list[jax.Array], x: jax.Array) -> jax.Array:  # each GEMV's input waits for the last one's output
        for w in ws:
            x = x + gemv(x, w).reshape(-1)[0].astype(x.dtype)
        return x

    variants = {
        "cold": jax.jit(lambda ws, x: [gemv(x, w) for w in ws]),
        "cold chain": jax.jit(chain),
        "hot chain": jax.jit(lambda ws, x: chain([ws[0]] * len(ws), x)),
        "prefetch": jax.jit(lambda ws, x: [after_prefetch(w, x) for w in ws]),
        "prefetch+gemv": jax.jit(lambda ws, x: [gemv(after_prefetch(w, x), w) for w in ws]),
    }
    ws = [layer[name] for layer in layers]
    us = {
        label: common.time_calls(functools.partial(fn, ws, x), iters=iters)["pipelined_s"] / len(ws) * 1e6
        for label, fn in variants.items()
    }
    size = w0.size * w0.dtype.itemsize
    ahead = size if whole else min(max_mb * 10**6, size)
    return {
        "projection": name, "matrix_mb": size / 1e6, "prefetched_mb": ahead / 1e6,
        "cold_us": us["cold"], "cold_chain_us": us["cold chain"], "hot_chain_us": us["hot chain"],
        "prefetch_us": us["prefetch"], "prefetch_gemv_us": us["prefetch+gemv"],
        "warm_gemv_us": us["prefetch+gemv"] - us["prefetch"], "floor_us": size / COPY_BW * 1e6,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="config under benchmarks/configs, or a model folder (default: "
                        "llama2-7b on GPU, the bundled stories260K elsewhere)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="layers' weights to cycle through (default: 8 on GPU)")
    parser.add_argument("--max-mb", type=int, default=16, help="MB of each matrix but o's to read ahead")
    parser.add_argument("--iters", type=int, default=20)
    common.add_output_arguments(parser, default_key="l2_prefetch")
    args = parser.parse_args(argv)
    gpu = common.on_gpu()
    model = args.model or ("llama2-7b" if gpu else "jpaged/bundled/stories260K")
    num_layers = args.layers or (8 if gpu else 2)
    layers = _layers(model, num_layers)
    iters = args.iters if gpu else 2
    rows = [
        measure_projection(layers, name, whole=whole, max_mb=args.max_mb, iters=iters) for name, whole in PROJECTIONS
    ]
    print(common.table(rows, [("projection", "projection"), ("MB", "matrix_mb"), ("read ahead MB", "prefetched_mb"),
                              ("floor us", "floor_us"), ("cold us", "cold_us"), ("cold chain us", "cold_chain_us"),
                              ("hot chain us", "hot_chain_us"), ("prefetch us", "prefetch_us"),
                              ("prefetch+gemv us", "prefetch_gemv_us"), ("warm gemv us", "warm_gemv_us")],
                       title=f"{model}, {num_layers} layers' weights, one row"))  # fmt: skip
    common.save(args, {"env": common.env_info(jax_devices=True), "model": model, "layers": num_layers,
                       "max_mb": args.max_mb, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
