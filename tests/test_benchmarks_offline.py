"""The offline benchmarks (benchmarks/kernels.py, moe.py, throughput.py, latency.py, decode.py, profile_step.py,
summary.py, plot.py) run end to
end on CPU with minute sizes and write the JSON fields the GPU run and docs/benchmarks.md rely on; the roofline
arithmetic agrees with jpaged's own parameter shapes; the bootstrap makes jpaged importable from a bare checkout. No
timing assertions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from conftest import HF_FIXTURES, REPO
from safetensors import safe_open

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import (
    common,
    decode,
    gemm,
    hlo_inventory,
    kernels,
    latency,
    moe,
    profile_step,
    sampler,
    summary,
    throughput,
)
from jpaged import sharding
from jpaged.models.config import ModelConfig
from jpaged.models.loader import dummy_params

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
# The same engine flags for every run, so the process-wide jitted step compiled by one is reused by the next.
ENGINE_FLAGS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "32", "--max-model-len", "128", "--no-warmup"]
TP_FLAGS = [
    "--input-len",
    "12",
    "--output-len",
    "5",
    "--mean-input-len",
    "14",
    "--mean-output-len",
    "6",
    "--max-len",
    "40",
    "--warmup-requests",
    "2",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


@pytest.fixture(scope="module")
def results(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of each benchmark, all merged into one results file as run_gpu.sh does."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    save = ["--json-out", str(out), "--json-key"]
    tp = throughput.main(
        [
            "--model",
            str(tiny_model),
            "--run",
            "fixed:6",
            "--run",
            "sharegpt-synthetic:6",
            *TP_FLAGS,
            *ENGINE_FLAGS,
            *save,
            "tp",
        ]
    )
    lat = latency.main(
        [
            "--model",
            str(tiny_model),
            "--input-lens",
            "12",
            "--output-len",
            "5",
            "--iters",
            "1",
            "--prefill-batch",
            "2",
            "--prefill-len",
            "20",
            *ENGINE_FLAGS,
            *save,
            "latency",
        ]
    )
    kern = kernels.main(
        ["--cases", "gqa4", "--iters", "1", "--max-configs", "1", "--max-jax-configs", "1", *save, "kernels"]
    )
    return {"path": out, "throughput": tp, "latency": lat, "kernels": kern}


def test_throughput_record(results: dict[str, Any]) -> None:
    rec = results["throughput"]
    assert rec["benchmark"] == "throughput" and rec["env"]["versions"]["jax"]
    assert rec["engine_info"]["init_s"] > 0 and rec["engine_info"]["config"]["skip_tokenizer_init"]
    assert [(r["workload"], r["num_requests"]) for r in rec["runs"]] == [("fixed", 6), ("sharegpt-synthetic", 6)]
    for run in rec["runs"]:
        assert run["engine"] == "jpaged"
        assert run["output_len_mismatches"] == 0 and run["output_tokens_generated"] == run["output_tokens"]
        assert run["wall_s"] > 0 and run["output_tok_s"] > 0 and run["total_tok_s"] > run["output_tok_s"]
        assert run["cached_prompt_tokens"] == 0  # fresh random prompts: nothing for the prefix cache
        roof = run["roofline"]
        assert roof["available"] and roof["steps"] >= max(5, 6 * 12 // 32)
        assert run["of_roofline"] > 0 and run["roofline_s"] == roof["floor_s"] >= roof["memory_bound_s"] > 0
        assert roof["in_sequence_s"] >= roof["floor_s"] and run["of_in_sequence_floor"] >= run["of_roofline"]
        assert isinstance(run["compiles_during_run"], int)
        line = run["timeline"]  # one interval per fetched step, plus the drain: the wall time
        assert line["decode_steps"] + line["prefill_or_mixed_steps"] + 1 == roof["steps"]
        assert line["prefill_or_mixed_steps"] >= 1 and line["decode_steps"] >= roof["decode_steps"] - 1
        parts = line["first_step_s"] + line["decode_s"] + line["prefill_or_mixed_s"] + line["drain_s"]
        assert parts == pytest.approx(run["wall_s"], rel=1e-3) and line["first_step_s"] > 0 and line["drain_s"] >= 0
    fixed = rec["runs"][0]
    assert fixed["input_tokens"] == 6 * 12 and fixed["output_tokens"] == 6 * 5
    saved = json.loads(results["path"].read_text())
    assert set(saved) == {"tp", "latency", "kernels"}  # every script merged into the one file


def test_sampler_benchmark_checks_every_variant(tmp_path: Path) -> None:
    rec = sampler.main(["--rows", "3", "--vocab", "64", "--json-out", str(tmp_path / "s.json")])
    tunings = [f"kernel {b}/{w}/{s}" for b, w, s in sampler.KERNEL_TUNINGS]
    assert [(r["rows"], r["variant"]) for r in rec["rows"]] == [(3, v) for v in [*sampler.MASKS, *tunings]]
    saved = json.loads((tmp_path / "s.json").read_text())
    assert len(saved["rows"]) == len(rec["rows"])  # saved as measured, the last row too
    assert all(r["ok"] and r["time_us"] > 0 and r["temp_MB"] is not None for r in rec["rows"]), rec["rows"]
    assert json.loads((tmp_path / "s.json").read_text())["benchmark"] == "sampler"


def test_timeline_charges_each_interval_to_the_step_fetched() -> None:
    # a run from t=10: a prefill step fetched at 11, two decode steps at 12 and 14, a mixed one at 17, a decode at 18
    fetches = [(False, 11.0), (True, 12.0), (True, 14.0), (False, 17.0), (True, 18.0)]
    line = throughput.timeline(fetches, start=10.0, end=18.5)
    assert line["first_step_s"] == 1.0 and line["drain_s"] == 0.5
    assert (line["decode_steps"], line["decode_s"]) == (3, 1.0 + 2.0 + 1.0)
    assert (line["prefill_or_mixed_steps"], line["prefill_or_mixed_s"]) == (1, 3.0)
    assert line["decode_step_ms"]["p50"] == 1000.0
    assert throughput.timeline([], start=0.0, end=1.0) == {"available": False}


def test_latency_record(results: dict[str, Any]) -> None:
    rec = results["latency"]
    (row,) = rec["latency"]
    assert row["input_len"] == 12 and row["output_len"] == 5
    assert row["ttft_ms"] > 0 and row["decode_tok_s"] > 0 and row["roofline_decode_tok_s"] > row["decode_tok_s"]
    assert row["weights_over_bw_tok_s"] >= row["roofline_decode_tok_s"]  # the KV only adds to the floor
    prefill = rec["prefill"]
    assert prefill["prefill_batch"] == 2 and prefill["TFLOPs"] > 0 and 0 < prefill["of_peak"] < 1


def test_kernels_record(results: dict[str, Any]) -> None:
    rec = results["kernels"]
    assert rec["interpret"]  # no GPU here: minute shapes in interpret mode
    kernels_seen = {r["kernel"] for r in rec["rows"]}
    assert {"jpaged decode", "jpaged default", "jpaged pallas", "jpaged reference", "jax builtin"} <= kernels_seen
    for row in rec["rows"]:
        assert row["ok"], row
        assert row["rel_err"] <= kernels.MAX_REL_ERR and row["time_ms"] > 0 and row["kv_TBps"] > 0
    (case,) = rec["summary"]
    assert case["kind"] == "decode" and case["speedup_vs_jax"] > 0 and case["meets_goal"] in ("yes", "no")


def test_moe_record(tmp_path: Path) -> None:
    """One MoE layer at two token counts, every implementation checked against the dense definition; a short sweep."""
    rec = moe.main(["--tiny", "--tokens", "1,4", "--iters", "1", "--sweep", "--max-configs", "2", "--json-out",
                    str(tmp_path / "moe.json")])  # fmt: skip
    assert rec["interpret"] == (jax.default_backend() != "gpu") and rec["shape"]["name"] == "tiny"
    assert {(r["tokens"], r["impl"]) for r in rec["rows"]} == {
        (t, i) for t in (1, 4) for i in ("xla", "pallas", "dense")
    }
    for row in rec["rows"] + rec["sweep"]:
        assert row["ok"], row
        assert row["time_ms"] > 0 and row["TBps"] > 0 and row["rel_err"] <= moe.MAX_REL_ERR_DENSE
    one = next(r for r in rec["rows"] if r["tokens"] == 1)
    assert one["experts_hit"] <= 2 and one["bytes"] == one["experts_hit"] * 3 * 64 * 128 * 2
    assert {(r["projection"], r["impl"]) for r in rec["sweep_best"]} >= {("gate_up", "pallas"), ("down", "xla")}
    assert [s["tokens"] for s in rec["summary"]] == [1, 4] and rec["summary"][0]["speedup_vs_xla"] > 0
    assert json.loads((tmp_path / "moe.json").read_text())["benchmark"] == "moe"


def test_moe_padded_runs_the_engines_step_shape(tmp_path: Path) -> None:
    """--padded: T real tokens in the step's 16-row bucket, the padding routed nowhere; still checked and timed."""
    rec = moe.main(["--tiny", "--padded", "--tokens", "1", "--impls", "xla,pallas", "--iters", "1", "--sweep",
                    "--max-configs", "1"])  # fmt: skip
    for row in rec["rows"] + rec["sweep"]:
        assert row["ok"], row
    assert {r["rows"] for r in rec["rows"]} == {16}  # x rows: the bucket
    assert {r["rows"] for r in rec["sweep"]} == {32}  # grouped-matmul rows: bucket x top-2, 2 of them real
    assert all(r["experts_hit"] <= 2 for r in rec["rows"] + rec["sweep"])


def test_decode_record(tiny_model: Path, tmp_path: Path) -> None:
    """Decode at two batch sizes: every request decodes exactly output_len - 1 tokens after its first, nothing
    compiles while timed, and the roofline reads more weights at the larger batch only for a mixture of experts."""
    rec = decode.main(["--model", str(tiny_model), "--batches", "1", "3", "--input-len", "6", "--output-len", "4",
                       *ENGINE_FLAGS, "--json-out", str(tmp_path / "d.json")])  # fmt: skip
    assert [r["batch"] for r in rec["rows"]] == [1, 3] and rec["hf"] is None
    for row in rec["rows"]:
        assert row["engine"] == "jpaged" and row["compiles_timed"] == 0
        assert row["decode_tok_s"] == pytest.approx(row["batch"] * 3 / row["decode_s"])
        assert row["of_roofline"] > 0 and row["roofline_step_ms"] > 0 and row["experts_touched"] is None
    assert rec["rows"][0]["weight_GB_read"] == rec["rows"][1]["weight_GB_read"]
    assert json.loads((tmp_path / "d.json").read_text())["benchmark"] == "decode"
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    written = plot.main([str(tmp_path / "d.json"), "--out-dir", str(tmp_path)])
    assert [p.name for p in written] == ["decode_vs_batch.png"]


def test_profile_step_record_and_trace_summary(tiny_model: Path, tmp_path: Path) -> None:
    from jpaged import runner as runner_module

    jitted_step = runner_module._jitted_step
    rec = profile_step.main(["--model", str(tiny_model), "--batches", "2", "--input-len", "6", "--settle", "1",
                             "--steps", "2", "--trace-steps", "2", "--trace-dir", str(tmp_path / "trace"),
                             "--replay", "3", *ENGINE_FLAGS])  # fmt: skip
    (run,) = rec["runs"]
    assert set(run["replay"]["ms_per_call"]) == set(profile_step.REPLAY_MODES)
    assert all(ms > 0 for ms in run["replay"]["ms_per_call"].values()) and run["replay"]["calls"] == 3
    assert run["batch"] == 2 and run["host_step_ms_median"] > 0 and run["trace"] is not None
    # every part of the host loop was seen in the timed steps, and the module-level wrapper is gone afterwards
    assert set(run["host_parts_ms_per_step"]) == {"schedule", "pack", "dispatch", "fetch", "postprocess"}
    assert all(ms > 0 for ms in run["host_parts_ms_per_step"].values())
    assert runner_module._jitted_step is jitted_step
    assert set(run["compiles"]) == {"settle", "timed", "traced", "replay"} and run["compiles"]["traced"] == 0
    assert run["compiles"]["replay"] == 0  # the replayed calls reuse the engine's executable, resident input too
    assert run["running_min_max"] == [2, 2]
    # 16 prefill chunks: the first request decodes meanwhile (~14 tokens), and must still run when timed
    untraced = profile_step.main(["--model", str(tiny_model), "--batches", "8", "--input-len", "32", "--settle", "1",
                                  "--steps", "3", "--trace-steps", "0", "--trace-dir", str(tmp_path / "none"),
                                  *ENGINE_FLAGS, "--max-num-batched-tokens", "16"])  # fmt: skip
    assert untraced["runs"][0]["running_min_max"] == [8, 8]
    assert untraced["runs"][0]["traced_step_ms"] is None and untraced["runs"][0]["trace"] is None
    assert not (tmp_path / "none").exists() and untraced["runs"][0]["replay"] is None
    with pytest.raises(SystemExit):
        profile_step.main(["--model", str(tiny_model), "--replay", "-1"])
    # A synthetic trace: two kernels 1 ms apart after a device-to-host copy, on a device stream.
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "ts": 0, "dur": 500, "name": "MemcpyD2H"},
        {"ph": "X", "pid": 1, "ts": 1500, "dur": 1000, "name": "attention"},
        {"ph": "X", "pid": 2, "ts": 0, "dur": 9000, "name": "python"},
    ]}  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps(trace))
    s = profile_step.summarise_trace(tmp_path / "t.json", num_steps=1)
    assert s["device_busy_ms_per_step"] == pytest.approx(1.5) and s["device_span_ms_per_step"] == pytest.approx(2.5)
    assert s["longest_gaps"] == [{"idle_ms": 1.0, "after": "MemcpyD2H", "before": "attention"}]
    assert s["top_kernels"][0] == {"name": "attention", "ms_per_step": 1.0, "calls_per_step": 1.0}


def test_summary_and_plot(results: dict[str, Any], tmp_path: Path) -> None:
    text = summary.main([str(results["path"]), "--out", str(tmp_path / "summary.md")])
    for figure in ("decode attention", "throughput fixed 6 requests", "single-stream decode", "prefill 2 x 20"):
        assert figure in text
    assert (tmp_path / "summary.md").read_text() == text
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    written = plot.main([str(results["path"]), "--out-dir", str(tmp_path)])
    assert sorted(p.name for p in written) == ["kernel_bandwidth_vs_context.png", "throughput_vs_batch.png"]


def test_hf_baseline_in_its_own_process(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    rec = throughput.main(
        [
            "--engine",
            "hf",
            "--model",
            str(tiny_model),
            "--run",
            "sharegpt-synthetic:5",
            "--batch-size",
            "2",
            "--hf-max-batches",
            "2",
            "--hf-device",
            "cpu",
            *TP_FLAGS,
        ]
    )
    (run,) = rec["runs"]
    assert run["engine"] == "hf" and run["extrapolated"] and run["batches"] == 3 and run["batches_run"] == 2
    assert run["output_tok_s"] > 0 and run["wall_s"] >= run["measured_s"]


# -- arithmetic -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-gqa2", "llama-mha", "mixtral-e4-top2", "llama3-rope"])
def test_parameter_count_matches_the_checkpoint(name: str) -> None:
    folder = HF_FIXTURES / name
    with safe_open(folder / "model.safetensors", "np") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
    assert common.ModelShape.from_config(folder).num_params == stored


def test_parameter_count_matches_jpaged_dummy_params() -> None:
    folder = HF_FIXTURES / "mixtral-e4-top2"
    params = dummy_params(ModelConfig.from_pretrained(folder), sharding.make_mesh(1), jnp.float32)
    assert common.ModelShape.from_config(folder).num_params == sum(x.size for x in jax.tree.leaves(params))


def test_committed_configs_and_their_rooflines() -> None:
    for name in ("llama2-7b", "llama2-13b", "llama3-8b", "mixtral-8x7b", "llama-1b"):
        folder = common.resolve_model(name)
        cfg = ModelConfig.from_pretrained(folder)
        assert (
            not cfg.tie_word_embeddings
            and json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
        )
    l7 = common.ModelShape.from_config(common.resolve_model("llama2-7b"))
    assert l7.num_params == 6_738_415_616 and l7.kv_bytes_per_token == 2 * 32 * 4096 * 2
    assert round(1 / l7.decode_step_floor_s(1, 0)) == 318  # the "317 tok/s" (13.48 GB / 4.28 TB/s)
    # The anchors' README: 128 sequences of ~640 tokens cost about 12.8 ms a step.
    assert l7.decode_step_floor_s(128, 640) == pytest.approx(12.8e-3, rel=0.03)
    # ~13.1 GFLOP a prompt token: 2 x the 6.48 B layer weights + attention (embedding gathered, one row of logits).
    assert l7.step_flops([(512, 0)]) / 512 == pytest.approx(13.1e9, rel=0.01)
    # Decode at 128 rows is memory-bound in every part, so the kernels in sequence meet the step's roofline; at 256
    # rows the matmuls' FLOPs (5.2 ms at 659 TFLOP/s) outlast their weights' bytes (3.2 ms), which the step-wide
    # roofline hides under the attention's KV stream: in sequence the floor is 8.5% higher.
    at_128, at_256 = (l7.step_floor_s([(1, 640)] * b) for b in (128, 256))
    assert at_128["in_sequence_s"] == pytest.approx(at_128["floor_s"]) == pytest.approx(at_128["memory_s"])
    assert at_256["in_sequence_s"] / at_256["floor_s"] == pytest.approx(1.085, abs=0.002)
    kv_s = 256 * 641 * l7.kv_bytes_per_token / common.HBM_BYTES_PER_S
    assert at_256["in_sequence_s"] == pytest.approx(l7.weight_matmul_flops(256, 256) / common.PEAK_FLOPS + kv_s)
    moe = common.ModelShape.from_config(common.resolve_model("mixtral-8x7b"))
    assert moe.experts_touched(1) == pytest.approx(2) and moe.experts_touched(256) == pytest.approx(8)
    assert moe.weight_bytes_read(1) < 0.6 * moe.weight_bytes and moe.weight_bytes_read(4096) == pytest.approx(
        moe.weight_bytes
    )
    assert common.ModelShape.from_config(common.resolve_model("llama-1b")).num_params == pytest.approx(1.1e9, rel=0.01)


def test_attention_flops_do_not_depend_on_chunking() -> None:
    shape = common.ModelShape.from_config(common.resolve_model("llama3-8b"))
    whole = shape.attention_flops(2048, 0)
    chunks = sum(shape.attention_flops(512, c) for c in (0, 512, 1024, 1536))
    assert chunks == pytest.approx(whole)


def test_sharegpt_synthetic_lengths(tiny_model: Path) -> None:
    args = throughput.build_parser().parse_args(["--model", str(tiny_model)])
    a = throughput.make_workload("sharegpt-synthetic", 256, vocab_size=32000, seed=0, args=args)
    b = throughput.make_workload("sharegpt-synthetic", 256, vocab_size=32000, seed=0, args=args)
    assert a == b  # a fixed seed gives the same requests (HF and jpaged see the same ones)
    ins, outs = [len(p) for p in a.prompts], a.output_lens
    assert abs(sum(ins) / 256 - 202) < 1 and abs(sum(outs) / 256 - 179) < 1
    assert min(ins + outs) >= 4 and max(ins + outs) <= 1024 and len(set(ins)) > 50
    other = throughput.make_workload("sharegpt-synthetic", 255, vocab_size=32000, seed=0, args=args)
    assert other.prompts[0] != a.prompts[0]  # runs of another size draw other prompts (no prefix-cache hits)
    fixed = throughput.make_workload("fixed", 3, vocab_size=100, seed=0, args=args)
    assert [len(p) for p in fixed.prompts] == [512] * 3 and fixed.output_lens == [256] * 3
    assert all(3 <= t < 100 for p in fixed.prompts for t in p)
    assert math.isclose(throughput.Workload("x", [[1, 2]], [3]).describe()["mean_output_len"], 3)


# -- bootstrap --------------------------------------------------------------------------------------------------------
BARE_CHECKOUT = """
import sys
# Drop an editable install's finder, leaving what a bare checkout with PYTHONPATH=<repo> has.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path_importer_cache.clear()
sys.path.insert(0, {repo!r})
from benchmarks import _bootstrap
import jpaged.models.llama, jpaged.kernels
from jpaged.kernels import AttentionTuning
print(_bootstrap.HOW_FOUND, jpaged.models.__file__, jpaged.kernels.__file__)
"""


def test_bootstrap_maps_the_packages_of_a_bare_checkout() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BARE_CHECKOUT.format(repo=str(REPO))],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    how, models, kernels_init = out.stdout.split()
    assert how == "checkout"
    assert Path(models) == REPO / "models" / "__init__.py"
    assert Path(kernels_init) == REPO / "pallas_kernels" / "__init__.py"


def test_gemm_record_checks_the_fused_layout_and_runs_a_cublas_child(tmp_path: Path) -> None:
    """gemm.py: the fused q/k/v and gate-up weights, plain and through jpaged's kernels (interpreted here), give the
    model's matmuls' results; --cublas adds the XLA rows from a child process whose XLA_FLAGS turn Triton GEMMs off;
    --sweep times each fused projection under XLA (the model's [K, N] weights and N-major ones, under both of XLA's GEMM
    libraries) and kernel tunings and keeps the best of each."""
    rec = gemm.main(["--tiny", "--rows", "3", "--iters", "1", "--cublas", "--sweep", "--max-configs", "2",
                     "--json-out", str(tmp_path / "gemm.json")])  # fmt: skip
    assert [(r["variant"], r["xla_gemms"]) for r in rec["rows"]] == [
        ("model", "default"),
        ("fused", "default"),
        ("kernel", "default"),
        ("mgpu", "default"),
        ("model", "cublas"),
        ("fused", "cublas"),
    ]
    best = {(r["projection"], r["config"] if r["config"].startswith("xla") else "kernel") for r in rec["sweep_best"]}
    kinds = ("xla", "xla-nk", "xla-cublas", "xla-nk-cublas", "kernel")
    assert best == {(p, kind) for p in ("qkv", "o", "gate_up", "down") for kind in kinds}
    assert all(r["rows"] == 3 and r["rel_err"] <= gemm.MAX_REL_ERR for r in rec["sweep_best"])
    assert {r["impl"] for r in rec["sweep_best"]} == {"xla", "pallas"}
    for row in rec["rows"]:
        assert row["ok"] and row["rel_err"] <= gemm.MAX_REL_ERR and row["time_us"] > 0, row
        assert row["weight_bytes"] == 2 * (2 * 64 * 4 * 16 + 2 * 64 * 2 * 16 + 3 * 64 * 128)  # q, o; k, v; the MLP
    assert json.loads((tmp_path / "gemm.json").read_text())["benchmark"] == "gemm"


def test_warmup_times_every_variant_with_and_without_the_one_row_bucket(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a decode kernel (declared here, as on Hopper), warm-up compiles the one-row decode variant unless told
    not to; each run compiles for real (the persistent cache off)."""
    from benchmarks import warmup
    from jpaged import runner as runner_module

    monkeypatch.setattr(runner_module, "has_decode_kernel", lambda impl, *shapes: True)
    flags = [*ENGINE_FLAGS, "--max-num-batched-tokens", "16"]  # the last value counts: one token bucket, 16
    rec = warmup.main(["--model", str(tiny_model), "--workers", "1", "--one-row", "both", "--in-process",
                       "--json-out", str(tmp_path / "w.json"), *flags])  # fmt: skip
    on, off = rec["runs"]
    assert (on["one_row_decode"], off["one_row_decode"]) == (True, False)
    decode = {"T=16 B=8 (decode)", "T=16 B=8 (decode, no filters)"}
    assert set(on["variants_s"]) == {"T=16 B=8", *decode, "T=1 B=1 (decode)", "T=1 B=1 (decode, no filters)"}
    assert set(off["variants_s"]) == {"T=16 B=8", *decode}
    assert on["backend_compiles"] >= 5 and off["backend_compiles"] >= 3 and on["total_s"] > 0
    assert json.loads((tmp_path / "w.json").read_text())["benchmark"] == "warmup"


def test_warmup_mixed_from_drops_the_small_prefill_buckets(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import warmup
    from jpaged import runner as runner_module

    monkeypatch.setattr(runner_module, "has_decode_kernel", lambda impl, *shapes: True)
    flags = [*ENGINE_FLAGS, "--max-num-batched-tokens", "32"]  # token buckets 16 and 32
    rec = warmup.main(["--model", str(tiny_model), "--workers", "1", "--one-row", "off", "--mixed-from", "32",
                       "--in-process", *flags])  # fmt: skip
    (run,) = rec["runs"]
    assert rec["mixed_buckets"] == [32]
    assert set(run["variants_s"]) == {"T=32 B=8", "T=16 B=8 (decode)", "T=16 B=8 (decode, no filters)"}


def test_warmup_runs_each_setting_in_a_fresh_process(tiny_model: Path, tmp_path: Path) -> None:
    """XLA keeps autotuning results per process, so a second warm-up in the same process is not cold: by default
    each setting gets a child process of its own, and the parent merges their records."""
    from benchmarks import warmup

    flags = [*ENGINE_FLAGS, "--max-num-batched-tokens", "16"]
    rec = warmup.main(["--model", str(tiny_model), "--workers", "1", "2", "--json-out", str(tmp_path / "w.json"),
                       "--json-key", "warmup", *flags])  # fmt: skip
    assert [(r["workers"], r["label"]) for r in rec["runs"]] == [(1, "1 worker(s), one-row on"),
                                                                 (2, "2 worker(s), one-row on")]  # fmt: skip
    pids = {r["pid"] for r in rec["runs"]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(r["variants_s"] and r["total_s"] > 0 for r in rec["runs"])
    assert json.loads((tmp_path / "w.json").read_text())["warmup"]["runs"] == rec["runs"]


def test_overlap_reads_every_variant(tmp_path: Path) -> None:
    from benchmarks import overlap

    rec = overlap.main(["--size", "256", "--chain", "1", "--iters", "1", "--json-out", str(tmp_path / "o.json")])
    assert len(rec["rows"]) == 16  # donated x pinned host x early copy x chained
    assert len({(r["donated"], r["to_host"], r["early_copy"], r["chained"]) for r in rec["rows"]}) == 16
    assert all(r["one_program_ms"] > 0 and r["a_ready_ms"] > 0 for r in rec["rows"])


def test_input_copy_times_every_input_variant(tmp_path: Path) -> None:
    from benchmarks import input_copy

    argv = ["--size", "256", "--chain", "1", "--input-len", "1024", "--steps", "2", "--rounds", "2", "--host-ms", "0",
            "--settle-steps", "1"]  # fmt: skip
    rec = input_copy.main([*argv, "--json-out", str(tmp_path / "i.json")])
    rows = rec["rows"]
    assert [r["input"] for r in rows] == ["resident", "numpy", "pinned"]
    for row in rows:
        assert len(row["runs_ms"]) == 2 and row["step_ms"] > 0
        assert row["over_resident_ms"] == pytest.approx(row["step_ms"] - rows[0]["step_ms"])
        diffs = [t - r for t, r in zip(row["runs_ms"], rows[0]["runs_ms"], strict=True)]
        assert row["round_diffs_ms"] == pytest.approx(diffs)


def test_ceilings_measure_the_matmul_against_the_roofline_constant(tmp_path: Path) -> None:
    from benchmarks import ceilings

    argv = ["--framework", "jax", "--matmul-side", "128", "--settle-s", "0"]
    rec = ceilings.main([*argv, "--json-out", str(tmp_path / "c.json")])
    got = rec["ceiling"]
    assert got["matmul_side"] == 128 and got["bf16_matmul_TFLOPs"] > 0
    assert got["of_roofline_constant"] == pytest.approx(got["bf16_matmul_TFLOPs"] * 1e12 / common.PEAK_FLOPS)
    assert json.loads((tmp_path / "c.json").read_text())["ceiling"] == got


def test_ceilings_measure_the_copy_bandwidth_with_torch(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from benchmarks import ceilings

    argv = ["--framework", "torch", "--copy-bytes", "1048576", "--settle-s", "0"]
    got = ceilings.main([*argv, "--json-out", str(tmp_path / "c.json")])
    assert got["ceiling"]["copy_TBps"] > 0 and got["ceiling"]["copy_bytes"] == 1048576


def test_hlo_inventory_attributes_launches_to_source_lines(tmp_path: Path) -> None:
    """A jitted function's CPU dump: its launches are counted once each and named by the lines that made them."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import jax, jax.numpy as jnp\n"
        "def inner(x):\n"
        "    return jnp.sort(x, axis=-1)\n"
        "def f(x, y):\n"
        "    return inner(x) @ y, jnp.cumsum(x, axis=0)\n"
        "jax.block_until_ready(jax.jit(f)(jnp.ones((64, 64)), jnp.ones((64, 64))))\n"
    )
    dump = tmp_path / "dump"
    env = os.environ | {"XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_f",
                        "JAX_PLATFORMS": "cpu"}  # fmt: skip
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=120)
    [path] = dump.glob("*jit_f*after_optimizations.txt")
    rec = hlo_inventory.main([str(path), "--depth", "2", "--json-out", str(tmp_path / "inv.json")])
    [module] = rec["modules"]
    rows = {(row["kind"], row["where"]): row["launches"] for row in module["rows"]}
    assert rows[("sort", f"{script}:3 inner < {script}:5 f")] == 1, rows  # the sort, named by its two frames
    assert any(where.startswith(f"{script}:5 f") for _, where in rows), rows  # the matmul
    # every instruction of ENTRY that is not a name for a value is counted, once
    text = path.read_text()
    entry = text[text.index("\nENTRY ") :].split("\n}\n")[0].splitlines()[1:]
    names = ("parameter(", "constant(", "tuple(", "get-tuple-element(", "bitcast(")
    assert module["launches"] == sum(" = " in line and not any(n in line for n in names) for line in entry) >= 3
    assert json.loads((tmp_path / "inv.json").read_text())["benchmark"] == "hlo_inventory"
    with pytest.raises(SystemExit, match="no ENTRY computation"):
        hlo_inventory.main([str(script)])


def test_profile_step_counts_the_steps_launches_from_a_fresh_process(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--hlo-dir: XLA dumps every compiled step variant, and the record counts each one's launches by source; the
    sampler's threshold searches show as dozens of them. In a process whose JAX has started it is refused."""
    out = tmp_path / "p.json"
    args = ["--model", str(tiny_model), "--batches", "2", "--input-len", "6", "--settle", "1", "--steps", "2",
            "--trace-steps", "0", "--hlo-dir", str(tmp_path / "hlo"), "--json-out", str(out),
            *ENGINE_FLAGS]  # fmt: skip
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), *args], check=True, env=env,
                   timeout=300, capture_output=True)  # fmt: skip
    modules = json.loads(out.read_text())["hlo_inventory"]
    assert modules and all(m["launches"] > 0 for m in modules)
    sampler_launches = max(next((f["launches"] for f in m["by_file"] if f["file"] == "jpaged/sampler.py"), 0)
                           for m in modules)  # fmt: skip
    assert sampler_launches >= 32, modules[0]["by_file"]  # 64 bisection passes, however XLA on CPU fuses them
    with pytest.raises(SystemExit):  # the directory holds the dumps above
        profile_step.main(args)
    assert "is not empty" in capsys.readouterr().err
    jax.devices()  # this process's JAX has started: its dump flags are read already
    with pytest.raises(SystemExit):
        profile_step.main([*args[: -len(ENGINE_FLAGS)], "--hlo-dir", str(tmp_path / "empty"), *ENGINE_FLAGS])
    assert "needs a fresh process" in capsys.readouterr().err
