"""The HF transformers baseline: `generate()` over static batches, in a process of its own (never JAX's).

    python benchmarks/hf_generate.py --requests requests.json --model benchmarks/configs/llama2-7b --batch-size 64 \\
        --out hf.json

`throughput.py --engine hf` writes the requests and starts this; it is rarely run by hand. The method is the one
vLLM's paper used for its HF baseline and ../shared/anchors/anchors_gpu.py measured: random bf16 weights of the
config's shapes, SDPA attention, requests in arrival order cut into static batches of `--batch-size`, each batch
left-padded to its longest prompt and generated (greedy) to its longest requested output (min_new_tokens =
max_new_tokens, so nothing stops early), and only the tokens each request asked for counted.

With `--max-batches K` only the first K batches run, and the total is extrapolated in proportion to the decode steps
of each batch (its longest output); the result then says `extrapolated: true` and how many batches ran.

With `--decode-batches 1 16 ...` (used by benchmarks/decode.py) it measures decode alone instead: for each batch size
B, B random prompts of --input-len tokens generated to --output-len tokens, each token's arrival timed on the host
(a stopping criterion that synchronises), so decode tok/s = B * (output_len - 1) / (last token - first token).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common


def load_model(model_dir: Path, dtype_name: str, device: str, seed: int, experts: str = "default") -> Any:
    """The config's architecture class (LlamaForCausalLM, MixtralForCausalLM) with random weights, built as
    ../shared/anchors/anchors_gpu.py built it: under the target default dtype, straight on the device.

    experts (mixtures of experts only): "default" leaves transformers' choice, which on a GPU is grouped_mm for the
    prompt and batched_mm for decoding (generate() switches: batched_mm copies each token's experts' weights, which
    runs out of memory for Mixtral-8x7B at batch 256 on an H200); "grouped_mm", "batched_mm" or "eager" use that
    implementation throughout."""
    import torch
    import transformers

    torch.manual_seed(seed)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"
    model_class = getattr(transformers, config.architectures[0])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random weights are made in bf16 directly, on the device (no fp32 copy)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    # No .to(dtype): it would also round the rotary embedding's float32 inv_freq to bf16, which HF's own loading
    # (from_pretrained with a dtype) keeps in float32; the parameters are in `dtype` already.
    model = model.eval()
    if experts != "default":
        model.set_experts_implementation(experts)
        model._optimize_model_for_decode = contextlib.nullcontext  # keep it while decoding too
    return model


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def run(requests: dict[str, Any], model: Any, *, batch_size: int, max_batches: int, device: str) -> dict[str, Any]:
    import torch

    prompts: list[list[int]] = requests["prompts"]
    output_lens: list[int] = requests["output_lens"]
    all_batches = batches(len(prompts), batch_size)
    todo = all_batches[:max_batches] if max_batches > 0 else all_batches

    def generate(rows: range, warmup: bool = False) -> None:
        ps = [prompts[i][:16] if warmup else prompts[i] for i in rows]
        longest = max(len(p) for p in ps)
        ids = torch.zeros((len(ps), longest), dtype=torch.long)
        mask = torch.zeros((len(ps), longest), dtype=torch.long)
        for r, p in enumerate(ps):  # left padding: every prompt ends where generation starts
            ids[r, longest - len(p) :] = torch.tensor(p)
            mask[r, longest - len(p) :] = 1
        new = 4 if warmup else max(output_lens[i] for i in rows)
        with torch.no_grad():
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        if out.shape[1] - longest != new:
            raise RuntimeError(f"generate() made {out.shape[1] - longest} tokens per row, asked for {new}")

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    generate(todo[0], warmup=True)
    sync()
    per_batch = []
    start = time.perf_counter()
    for rows in todo:
        t0 = time.perf_counter()
        generate(rows)
        sync()
        per_batch.append(
            {
                "requests": len(rows),
                "longest_prompt": max(len(prompts[i]) for i in rows),
                "decode_steps": max(output_lens[i] for i in rows),
                "seconds": time.perf_counter() - t0,
            }
        )
    measured = time.perf_counter() - start
    done = [i for rows in todo for i in rows]
    steps_done = sum(b["decode_steps"] for b in per_batch)
    steps_all = sum(max(output_lens[i] for i in rows) for rows in all_batches)
    wall = measured * steps_all / steps_done if len(todo) < len(all_batches) else measured
    out_tokens, in_tokens = sum(output_lens), sum(len(p) for p in prompts)
    return {
        "engine": "hf",
        "batch_size": batch_size,
        "batches": len(all_batches),
        "batches_run": len(todo),
        "extrapolated": len(todo) < len(all_batches),
        "measured_s": measured,
        "measured_requests": len(done),
        "measured_output_tokens": sum(output_lens[i] for i in done),
        "wall_s": wall,
        "requests_per_s": len(prompts) / wall,
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + in_tokens) / wall,
        "per_batch": per_batch,
        "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None,
    }


def decode_rates(
    model: Any,
    batches: Sequence[int],
    *,
    input_len: int,
    output_len: int,
    device: str,
    seed: int,
    on_row: Any = None,
) -> list[dict[str, Any]]:
    """Decode tokens/s at each batch size, from one generate() per batch: a stopping criterion (which generate()
    calls once per new token) records when each token is ready, and decode is from the first to the last."""
    import torch
    import transformers

    class StepClock(transformers.StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size

    def generate(ids: Any, new: int) -> StepClock:
        clock = StepClock()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0,
                                 stopping_criteria=transformers.StoppingCriteriaList([clock]))  # fmt: skip
        if out.shape[1] - ids.shape[1] != new or len(clock.times) != new:
            raise RuntimeError(f"generate() made {out.shape[1] - ids.shape[1]} tokens per row, asked for {new}")
        return clock

    rows = []
    for i, b in enumerate(batches):
        ids = torch.randint(3, vocab, (b, input_len), generator=gen).to(device)
        if i == 0:
            generate(ids, 4)  # warm-up (kernels, allocator)
        t0 = time.perf_counter()
        times = generate(ids, output_len).times
        decode_s = times[-1] - times[0]
        rows.append({"engine": "hf", "batch": b, "input_len": input_len, "output_len": output_len,
                     "prefill_s": times[0] - t0, "decode_s": decode_s,
                     "decode_tok_s": b * (output_len - 1) / decode_s if decode_s > 0 else None,
                     "step_ms": decode_s / (output_len - 1) * 1e3})  # fmt: skip
        common.log(f"hf: batch {b}: {rows[-1]['decode_tok_s']:,.0f} decode tok/s ({rows[-1]['step_ms']:.1f} ms/step)")
        if on_row is not None:  # the caller saves each row: a batch killed later loses only itself
            on_row(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--requests", help="JSON with 'prompts' (token id lists) and 'output_lens'")
    what.add_argument("--decode-batches", type=int, nargs="+", help="measure decode alone at these batch sizes")
    parser.add_argument("--input-len", type=int, default=128, help="--decode-batches: prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="--decode-batches: generated tokens")
    parser.add_argument("--model", required=True, help="folder with the HF config.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--max-batches", type=int, default=0, help="run only the first K batches and extrapolate (0: all)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch sees a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experts", default="default", choices=("default", "grouped_mm", "batched_mm", "eager"),
                        help="MoE models: transformers' experts implementation (see load_model)")  # fmt: skip
    parser.add_argument("--out", required=True, help="write the result JSON here")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = load_model(Path(args.model), args.dtype, device, args.seed, args.experts)
    init_s = time.perf_counter() - t0
    common.log(f"hf: {Path(args.model).name} ({device}, {args.dtype}, experts {args.experts}) made in {init_s:.1f} s")
    result: dict[str, Any]
    if args.decode_batches:

        def save(rows: list[dict[str, Any]]) -> None:
            common.write_json(args.out, {"engine": "hf", "rows": rows, "init_s": init_s, "partial": True})

        rows = decode_rates(model, args.decode_batches, input_len=args.input_len, output_len=args.output_len,
                            device=device, seed=args.seed, on_row=save)  # fmt: skip
        result = {"engine": "hf", "rows": rows}
        if device.startswith("cuda"):
            result["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        requests = json.loads(Path(args.requests).read_text())
        common.log(f"hf: {len(requests['prompts'])} requests in batches of {args.batch_size}")
        result = run(requests, model, batch_size=args.batch_size, max_batches=args.max_batches, device=device)
    result |= {
        "init_s": init_s,
        "device": device,
        "dtype": args.dtype,
        "attention": "sdpa",
        "experts": args.experts,
        "env": common.env_info(torch_device=device.startswith("cuda")),
    }
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
