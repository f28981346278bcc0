"""The issue's table of figures, filled in from the benchmarks' JSON: each measurement beside its goal and anchor.

    python benchmarks/summary.py results.json [more.json ...] [--out summary.md]

Matches HF and jpaged throughput runs by (workload, number of requests); HF figures marked "extrapolated" come from
`--hf-max-batches` (see benchmarks/hf_generate.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/summary.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common
from benchmarks.plot import records

ANCHOR_DECODE_TBPS = {  # JAX's own kernel, tuned, from ../shared/anchors/README.md
    "llama3-8b B=64 ctx=2048": 1.35,
    "llama2-7b B=64 ctx=2048": 1.85,
    "llama3-8b B=16 ctx=16384": 1.46,
    "llama3-8b B=256 ctx=1024": 1.58,
}
HF_ANCHOR_TOK_S = 1214  # HF generate, Llama-2-7B shape, fixed 512/256, 128 requests, batch 128


def _row(figure: str, measured: str, goal: str = "–", met: bool | None = None, same: str = "–", anchor: str = "–"):
    """One line of the table; `met` None: no goal, or nothing to compare with."""
    verdict = "–" if met is None else ("yes" if met else "**no**")
    return {"figure": figure, "measured": measured, "goal": goal, "met": verdict, "same call": same, "anchor": anchor}


def kernel_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for s in rec.get("summary", []):
        if s.get("jpaged_ms") is None:
            continue
        timing = f"{s['jpaged_ms']:.3f} ms, {s['jpaged_config']}"
        if s["kind"] == "decode":
            same = f"JAX {s['jax_TBps']:.2f} TB/s" if s.get("jax_TBps") else "–"
            anchor = f"JAX {ANCHOR_DECODE_TBPS[s['case']]} TB/s" if s["case"] in ANCHOR_DECODE_TBPS else "–"
            measured = f"{s['jpaged_TBps']:.2f} TB/s ({timing})"
            rows.append(
                _row(f"decode attention {s['case']}", measured, ">= 3.6 TB/s", s["jpaged_TBps"] >= 3.6, same, anchor)
            )
        else:
            measured = f"{s['jpaged_TFLOPs']:.0f} TFLOP/s, {s['jpaged_TBps']:.2f} TB/s ({timing})"
            rows.append(_row(f"attention {s['case']}", measured))
    return rows


def throughput_rows(tps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    hf = {(run["workload"], run["num_requests"]): run for rec in tps for run in rec["runs"] if run["engine"] == "hf"}
    rows = []
    for rec in tps:
        model = rec["model"]["name"]
        for run in (r for r in rec["runs"] if r["engine"] == "jpaged"):
            other = hf.get((run["workload"], run["num_requests"]), {})
            ratio = run["output_tok_s"] / other["output_tok_s"] if other.get("output_tok_s") else None
            fixed = run["workload"] == "fixed"
            need = 5 if fixed else 20
            of_roof = run.get("of_roofline")
            measured = f"{run['output_tok_s']:,.0f} output tok/s, {run['requests_per_s']:.2f} req/s"
            if of_roof:
                measured += f", {of_roof:.0%} of roofline ({run['roofline_output_tok_s']:,.0f} tok/s)"
            if ratio:
                measured += f", {ratio:.1f}x HF"
            met = None if ratio is None else ratio >= need and (not fixed or (of_roof or 0) >= 0.9)
            same = "–"
            if ratio:
                same = f"HF {other['output_tok_s']:,.0f} tok/s (batch {other['batch_size']}"
                extrapolated = f", extrapolated from {other['batches_run']}/{other['batches']} batches"
                same += (extrapolated if other.get("extrapolated") else "") + ")"
            goal = f">= 90% of roofline, >= {need}x HF" if fixed else f">= {need}x HF"
            anchor = f"HF {HF_ANCHOR_TOK_S:,} tok/s" if fixed else "vLLM 14-24x HF"
            figure = f"throughput {run['workload']} {run['num_requests']} requests, {model}"
            rows.append(_row(figure, measured, goal, met, same, anchor))
        info = rec.get("engine_info") or {}
        if info.get("warmup_s") is not None:
            measured = f"{info['warmup_s']:.1f} s (engine ready in {info['init_s']:.1f} s)"
            rows.append(_row(f"warm-up, all buckets, {model}", measured, "<= 60 s", info["warmup_s"] <= 60))
    return rows


def latency_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    model = rec["model"]["name"]
    rows = []
    for r in rec["latency"]:
        frac = r.get("of_weights_over_bw")
        measured = f"{r['decode_tok_s']:,.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms (floor {r['roofline_ttft_ms']:.1f} ms)"
        goal = f">= 90% of {r['weights_over_bw_tok_s']:.0f} tok/s"
        same = f"{frac:.0%} of weights/BW" if frac else "–"
        rows.append(
            _row(
                f"single-stream decode, prompt {r['input_len']}, {model}",
                measured,
                goal,
                frac >= 0.9 if frac else None,
                same,
            )
        )
    p = rec.get("prefill")
    if p:
        figure = f"prefill {p['prefill_batch']} x {p['prefill_len']} tokens, {model}"
        measured = f"{p['TFLOPs']:.0f} TFLOP/s ({p['wall_ms']:.1f} ms)"
        rows.append(_row(figure, measured, ">= 60% of 659 TFLOP/s", p["of_peak"] >= 0.6, f"{p['of_peak']:.0%} of 659"))
    return rows


def figure_rows(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [row for rec in recs if rec["benchmark"] == "kernels" for row in kernel_rows(rec)]
    rows += throughput_rows([rec for rec in recs if rec["benchmark"] == "throughput"])
    rows += [row for rec in recs if rec["benchmark"] == "latency" for row in latency_rows(rec)]
    return rows


COLUMNS = [
    ("figure", "figure"),
    ("measured", "measured"),
    ("goal", "goal"),
    ("met", "met"),
    ("same call", "same call"),
    ("anchor", "anchor"),
]


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    recs = list(records([p for p in args.inputs if Path(p).is_file()]))
    env: dict[str, Any] = next((r["env"] for r in recs if r.get("env", {}).get("devices")), {})
    head = (
        f"commit {env.get('commit', '?')}, {env.get('date', '?')}, {', '.join(env.get('devices', []))}, "
        f"jax {env.get('versions', {}).get('jax')}, torch {env.get('versions', {}).get('torch')}, "
        f"transformers {env.get('versions', {}).get('transformers')}"
    )
    text = common.table(figure_rows(recs), COLUMNS, title="jpaged benchmark figures") + "\n\n" + head + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
