"""PNG plots from the benchmarks' JSON: throughput against batch size, and kernel bandwidth against context length.

    python benchmarks/plot.py results.json [more.json ...] --out-dir docs/img

Reads every record with a "benchmark" field anywhere in the given files (a file may hold one record, or an object
of records as `--json-key` writes them). Writes:
- `throughput_vs_batch.png`: output tokens/s against the batch the engine held (jpaged: the mean decode batch of
  each throughput run, and batch 1 from latency.py; HF: its static batch size), with the decode roofline
  B / ((weights + B x mean context x KV bytes per token) / 4.28 TB/s) of the same model and workload;
- `kernel_bandwidth_vs_context.png`: decode K+V bandwidth of jpaged's best configuration and of JAX's own kernel
  against context length (one marker per batch size), with the 4.28 TB/s ceiling and the 3.6 TB/s goal;
- `decode_vs_batch.png` (decode.py records): decode tokens/s of jpaged and HF (one series per HF experts
  implementation) against batch size, with the roofline B / step floor of the same model and context.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/plot.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common


def records(paths: Sequence[str | Path]) -> Iterator[dict[str, Any]]:
    def walk(obj: Any) -> Iterator[dict[str, Any]]:
        if isinstance(obj, dict):
            if "benchmark" in obj:
                yield obj
            else:
                for value in obj.values():
                    yield from walk(value)
        elif isinstance(obj, list):
            for value in obj:
                yield from walk(value)

    for path in paths:
        yield from walk(json.loads(Path(path).read_text()))


def _save(fig: Any, ax: Any, path: Path) -> Path:
    """The plots' common finish: grid, legend, a 120 dpi PNG at `path`."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput(recs: list[dict[str, Any]], out: Path, bandwidth: float) -> Path | None:
    import matplotlib.pyplot as plt

    tp = [r for r in recs if r["benchmark"] == "throughput"]
    lat = [r for r in recs if r["benchmark"] == "latency"]
    if not tp and not lat:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"jpaged": ("o", "C0"), "hf": ("s", "C3")}
    labelled: set[str] = set()
    curves: dict[tuple[str, str], tuple[common.ModelShape, float]] = {}
    for rec in tp:
        model = rec["model"]["name"]
        for run in rec["runs"]:
            x, y = run.get("mean_batch"), run.get("output_tok_s")
            if not x or not y:
                continue
            marker, color = styles.get(run["engine"], ("x", "C7"))
            label = f"{run['engine']} ({model})"
            ax.scatter(
                [x],
                [y],
                marker=marker,
                color=color,
                label=None if label in labelled else label,
                facecolors="none" if run.get("extrapolated") else color,
            )
            labelled.add(label)
            ax.annotate(
                f"{run['workload']} {run['num_requests']}",
                (x, y),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
            mean_ctx = run["mean_input_len"] + run["mean_output_len"] / 2
            args = rec.get("args", {})
            path = Path(args.get("model", ""))
            if (model, run["workload"]) not in curves and (path.is_dir() or (common.CONFIGS / model).is_dir()):
                folder = path if path.is_dir() else common.CONFIGS / model
                curves[(model, run["workload"])] = (common.ModelShape.from_config(folder), mean_ctx)
    for rec in lat:
        model = rec["model"]["name"]
        for row in rec["latency"]:
            if row.get("decode_tok_s"):
                label = f"jpaged batch 1 ({model})"
                ax.scatter(
                    [1], [row["decode_tok_s"]], marker="^", color="C2", label=None if label in labelled else label
                )
                labelled.add(label)
    batches = [2**i for i in range(0, 10)]
    for (model, workload), (shape, ctx) in curves.items():
        ys = [b / shape.decode_step_floor_s(b, ctx, bandwidth=bandwidth) for b in batches]
        ax.plot(batches, ys, "--", linewidth=1, label=f"roofline {model}, {workload} (mean ctx {ctx:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences per decode step")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Offline throughput against batch size (hollow: extrapolated)")
    return _save(fig, ax, out / "throughput_vs_batch.png")


def plot_kernels(recs: list[dict[str, Any]], out: Path, bandwidth: float, goal: float) -> Path | None:
    import matplotlib.pyplot as plt

    rows = []
    for rec in recs:
        if rec["benchmark"] == "kernels":
            rows += [r for r in rec.get("best", []) + rec.get("context_sweep", []) if r.get("kind") == "decode"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {
        "jpaged decode path": ("jpaged decode",),
        "jpaged Triton": ("jpaged pallas", "jpaged default"),
        "JAX builtin": ("jax builtin",),
    }
    for (label, kernels), color in zip(series.items(), ("C2", "C0", "C3"), strict=True):
        best: dict[tuple[int, int, int], float] = {}  # (context, batch, kv heads) -> best TB/s
        for r in rows:
            if r["kernel"] in kernels and r.get("context"):
                key = (r["context"], r["batch"], r["kv_heads"])
                best[key] = max(best.get(key, 0.0), r["kv_TBps"])
        for batch, kv_heads in sorted({(b, k) for _, b, k in best}):
            pts = sorted((c, v) for (c, b, k), v in best.items() if (b, k) == (batch, kv_heads))
            ax.plot(
                [c for c, _ in pts],
                [v for _, v in pts],
                marker="o",
                color=color,
                alpha=0.5 + 0.5 * (kv_heads < 32),
                linestyle="-" if len(pts) > 1 else "none",
                label=f"{label}, B={batch}, {kv_heads} KV heads",
            )
    ax.axhline(bandwidth / 1e12, color="k", linewidth=1, label=f"HBM ceiling {bandwidth / 1e12:.2f} TB/s")
    ax.axhline(goal, color="k", linestyle=":", linewidth=1, label=f"goal {goal} TB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("K+V bandwidth (TB/s)")
    ax.set_title("Decode paged attention: bandwidth against context length")
    return _save(fig, ax, out / "kernel_bandwidth_vs_context.png")


def plot_decode(recs: list[dict[str, Any]], out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    decode = [r for r in recs if r["benchmark"] == "decode" and r.get("rows")]
    if not decode:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    roofline: dict[str, list[tuple[int, float]]] = {}
    for rec in decode:
        model = rec["model"]["name"]
        jp = sorted((r["batch"], r["decode_tok_s"]) for r in rec["rows"] if r.get("decode_tok_s"))
        if jp:
            ax.plot(*zip(*jp, strict=True), marker="o", label=f"jpaged ({model}, {rec['env']['commit']})")
        hf = sorted((r["batch"], r["decode_tok_s"]) for r in (rec.get("hf") or {}).get("rows", []) if r["decode_tok_s"])
        if hf:
            experts = (rec.get("hf") or {}).get("experts", "default")
            ax.plot(*zip(*hf, strict=True), marker="s", label=f"HF generate() ({model}, experts {experts})")
        for r in rec["rows"]:
            if r.get("roofline_tok_s"):
                roofline.setdefault(model, []).append((r["batch"], r["roofline_tok_s"]))
    for model, pts in roofline.items():
        ax.plot(*zip(*sorted(set(pts)), strict=True), "k--", linewidth=1, label=f"roofline ({model})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences per decode step")
    ax.set_ylabel("decode tokens / s")
    ax.set_title("Decode throughput against batch size")
    return _save(fig, ax, out / "decode_vs_batch.png")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="JSON files written by the benchmarks")
    parser.add_argument("--out-dir", default=".", help="where the PNGs go")
    parser.add_argument("--bandwidth", type=float, default=common.HBM_BYTES_PER_S)
    parser.add_argument("--goal-tbps", type=float, default=3.6)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    recs = list(records([p for p in args.inputs if Path(p).is_file()]))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        p
        for p in (
            plot_throughput(recs, out, args.bandwidth),
            plot_kernels(recs, out, args.bandwidth, args.goal_tbps),
            plot_decode(recs, out),
        )
        if p is not None
    ]
    for p in written:
        print(f"wrote {p}")
    if not written:
        print("nothing to plot: no throughput, latency or kernels records in the inputs")
    return written


if __name__ == "__main__":
    main()
