"""What every benchmark shares: the machine and software it ran on, a JSON writer, timing, and the roofline.

Nothing here imports JAX or torch at module level: the HF baseline runs in its own process, which must never start
JAX (JAX takes most of the GPU's memory when its backend starts).

The roofline (the issue's ceilings, measured on the lent H200; see ../shared/anchors/README.md):
- memory: HBM_BYTES_PER_S = 4.28e12 (a device-to-device copy through torch, bytes read + written);
- compute: PEAK_FLOPS = 659e12 (a bf16 8192^3 matmul through JAX).
A decode step cannot beat (weight bytes + KV bytes read) / 4.28e12; a prefill cannot beat FLOPs / 659e12. Each step's
floor is the larger of its two. Weights are counted in full, the embedding table included (as the issue's "317 tok/s
for Llama-2-7B" is); for a mixture of experts only the experts that the step's tokens can reach are read: with B
tokens routed uniformly to k of E experts, E * (1 - (1 - k/E)^B) experts per layer are expected to be touched
(k at batch 1, all E at large batches).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "benchmarks" / "configs"
HBM_BYTES_PER_S = 4.28e12
PEAK_FLOPS = 659e12
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# -- where it ran -----------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when files differ), or $JPAGED_COMMIT where there is no .git (the copy
    of the tree on the GPU machine has none)."""
    if os.environ.get("JPAGED_COMMIT"):
        return os.environ["JPAGED_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                # the serial tells lent machines apart: the same run differed by 3% between two (fourteenth session)
                "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,serial",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _cpu() -> str | None:
    """The host's CPU model and the CPUs this process may run on: the engine's host loop and HF's eager generate()
    run there."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return f"{model}, {len(os.sched_getaffinity(0))} CPUs" if model else None


# The with_*.py wrappers put their overrides here, for every record written under them to carry.
DECODE_TUNING_ENV = "JPAGED_DECODE_TUNING_OVERRIDE"
STEP_COPIES_ENV = "JPAGED_STEP_COPIES"
PINNED_INPUT_ENV = "JPAGED_PINNED_INPUT"


def run_script(argv: Sequence[str]) -> None:
    """Runs `argv[0]` with arguments `argv[1:]` in this process, as `python SCRIPT ARGS...` would (the with_*.py
    wrappers: they patch the engine first)."""
    import runpy

    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


def env_info(*, jax_devices: bool = False, torch_device: bool = False) -> dict[str, Any]:
    """Versions (read from package metadata, so nothing heavy is imported), the GPU, the commit and the date.

    jax_devices / torch_device: also ask that framework for its devices (imports it; only in its own process)."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "nvidia_smi": _nvidia_smi(),
        "cpu": _cpu(),
        "versions": {
            d: _version(d)
            for d in (
                "jax",
                "jaxlib",
                "jax-cuda13-plugin",
                "jax-cuda12-plugin",
                "torch",
                "transformers",
                "triton",
                "jax-triton",
                "numpy",
            )
        },
        "ceilings": {"hbm_bytes_per_s": HBM_BYTES_PER_S, "peak_flops": PEAK_FLOPS},
    }
    if override := os.environ.get(DECODE_TUNING_ENV):  # set by with_decode_tuning.py: this run is not the default
        info["decode_tuning_override"] = override
    if copies := os.environ.get(STEP_COPIES_ENV):  # set by with_step_copies.py
        info["step_copies"] = int(copies)
    if os.environ.get(PINNED_INPUT_ENV):  # set by with_pinned_input.py
        info["pinned_input"] = True
    if jax_devices:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    if torch_device:
        import torch

        info["devices"] = [torch.cuda.get_device_name(0)] if torch.cuda.is_available() else ["cpu"]
    return info


# -- results ----------------------------------------------------------------------------------------------------------
def write_json(path: str | Path, record: dict[str, Any], *, key: str | None = None) -> Path:
    """Writes `record` to `path`; with `key`, merges it into the JSON object already there under that key (so one
    results file can collect every run of a session and survives a run that is killed halfway). Atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: Any = record
    if key is not None:
        data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
        data[key] = record
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    return str(obj)


def save(args: Any, record: dict[str, Any]) -> None:
    """Writes a script's record where its --json-out / --json-key flags say, and says where."""
    if args.json_out:
        path = write_json(args.json_out, record, key=args.json_key)
        where = f"{path} [{args.json_key}]" if args.json_key else str(path)
        print(f"wrote {where}", flush=True)


def add_engine_arguments(parser: Any, defaults: dict[str, Any]) -> None:
    """One flag per EngineConfig field (as `jpaged serve` has), with the benchmark's own defaults."""
    from jpaged.config import EngineConfig, add_cli_arguments

    add_cli_arguments(parser, exclude=("tokenizer", "chat_template"))
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in fields})


def add_matmul_chain_arguments(parser: Any, *, min_side: int) -> None:
    """--size and --chain of a synthetic program, a chain of bf16 side x side matmuls (overlap.py, input_copy.py)."""
    parser.add_argument("--size", type=int, default=None,
                        help=f"matmul side, >= {min_side} (default: 8192 on GPU, {min_side} elsewhere)")  # fmt: skip
    parser.add_argument("--chain", type=int, default=8, help="matmuls per program")


def matmul_side(size: int | None, min_side: int) -> int:
    """--size, or 8192 on a GPU and `min_side` elsewhere."""
    return max(size or (8192 if on_gpu() else min_side), min_side)


def add_output_arguments(parser: Any, default_key: str | None = None) -> None:
    parser.add_argument("--json-out", default=None, help="write the results here (JSON)")
    parser.add_argument(
        "--json-key",
        default=default_key,
        help="merge into the JSON object at --json-out under this key instead of overwriting it",
    )


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str | None = None) -> str:
    """A GitHub-markdown table of `rows`; columns are (header, key); floats get 3 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
                return f"{value:.3g}"
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = [f"### {title}"] if title else []
    lines.append("| " + " | ".join(h for h, _ in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(cell(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join(lines)


# -- timing -----------------------------------------------------------------------------------------------------------
def block(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 20) -> dict[str, float]:
    """Times `fn()` (a jitted call; its outputs are waited for) two ways, after `warmup` calls:

    - `median_s`: the median of `iters` calls, each waited for on its own (the anchors' method; includes the
      launch and the host round trip, tens of microseconds);
    - `pipelined_s`: `iters` calls launched back to back and waited for once, divided by `iters` (close to device
      time when a call is longer than its launch).
    """
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    outs = [fn() for _ in range(iters)]
    block(outs)
    pipelined = (time.perf_counter() - t0) / iters
    return {"median_s": statistics.median(times), "min_s": min(times), "pipelined_s": pipelined, "iters": iters}


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) while active, through jax.monitoring's duration events."""

    EVENT = "/jax/core/compile/backend_compile_duration"
    _active: ClassVar[list[CompileCounter]] = []
    _registered: ClassVar[bool] = False

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    @classmethod
    def _listen(cls, event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == cls.EVENT:
            for counter in cls._active:
                counter.count += 1
                counter.seconds += duration_secs

    def __enter__(self) -> CompileCounter:
        if not CompileCounter._registered:
            import jax

            jax.monitoring.register_event_duration_secs_listener(CompileCounter._listen)
            CompileCounter._registered = True
        self.count, self.seconds = 0, 0.0
        CompileCounter._active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        CompileCounter._active.remove(self)


# -- the model's shape and the roofline -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The sizes the roofline needs, read from a Hugging Face config.json (no jpaged import: the HF process uses it)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 0  # 0: dense MLP
    experts_per_tok: int = 0
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, model: str | Path, dtype: str = "bfloat16") -> ModelShape:
        folder = Path(model)
        hf = json.loads((folder / "config.json").read_text())
        heads = hf["num_attention_heads"]
        moe = hf.get("architectures", [""])[0] == "MixtralForCausalLM"
        if dtype == "auto":
            dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        return cls(
            name=folder.name,
            vocab=hf["vocab_size"],
            hidden=hf["hidden_size"],
            intermediate=hf["intermediate_size"],
            layers=hf["num_hidden_layers"],
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            experts=hf.get("num_local_experts", 0) if moe else 0,
            experts_per_tok=hf.get("num_experts_per_tok", 0) if moe else 0,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype_bytes=DTYPE_BYTES[dtype],
        )

    # parameter counts
    @property
    def attn_params(self) -> int:  # per layer: wq, wk, wv, wo
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d

    @property
    def expert_params(self) -> int:  # one expert (or the dense MLP): gate, up, down
        return 3 * self.hidden * self.intermediate

    @property
    def layer_params_fixed(self) -> int:  # per layer, read whatever the routing: attention, norms, router
        return self.attn_params + 2 * self.hidden + (self.hidden * self.experts if self.experts else 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab * self.hidden

    @property
    def num_params(self) -> int:
        mlp = self.expert_params * max(self.experts, 1)
        return self.layers * (self.layer_params_fixed + mlp) + self.embedding_params + self.lm_head_params + self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def experts_touched(self, num_tokens: int) -> float:
        """Expected experts per layer that `num_tokens` tokens reach (uniform top-k routing); 1 for a dense MLP."""
        if not self.experts:
            return 1.0
        if num_tokens <= 0:
            return 0.0
        return self.experts * (1.0 - (1.0 - self.experts_per_tok / self.experts) ** num_tokens)

    def weight_bytes_read(self, num_tokens: int) -> float:
        """Weight bytes one step over `num_tokens` tokens must read (all of them, except unreached experts)."""
        mlp = self.expert_params * self.experts_touched(num_tokens)
        params = (
            self.layers * (self.layer_params_fixed + mlp) + self.embedding_params + self.lm_head_params + self.hidden
        )
        return params * self.dtype_bytes

    def active_matmul_params(self) -> int:
        """Weights each token multiplies through in the layers (k experts of a MoE), without embedding and head."""
        mlp = self.expert_params * (self.experts_per_tok if self.experts else 1)
        return self.layers * (self.attn_params + mlp + (self.hidden * self.experts if self.experts else 0))

    def attention_flops(self, new_tokens: int, context_before: int) -> float:
        """Causal attention FLOPs (QK^T and PV, 2 FLOPs a multiply-add) of `new_tokens` queries appended after
        `context_before` cached tokens: query i sees context_before + i + 1 keys."""
        n, c = new_tokens, context_before
        keys_seen = n * c + n * (n + 1) / 2
        return 4.0 * self.layers * self.heads * self.head_dim * keys_seen

    def weight_matmul_flops(self, tokens: int, logit_rows: int) -> float:
        """FLOPs of the weight matmuls (the layers' and the head's) over `tokens` rows, logits for `logit_rows`."""
        return 2.0 * self.active_matmul_params() * tokens + 2.0 * self.hidden * self.vocab * logit_rows

    def step_flops(self, chunks: Iterable[tuple[int, int]], logit_rows: int | None = None) -> float:
        """FLOPs of one step over sequences given as (new tokens, context before); logits for one row a sequence."""
        chunks = list(chunks)
        tokens = sum(n for n, _ in chunks)
        rows = len(chunks) if logit_rows is None else logit_rows
        return self.weight_matmul_flops(tokens, rows) + sum(self.attention_flops(n, c) for n, c in chunks)

    def step_floor_s(
        self, chunks: Iterable[tuple[int, int]], *, bandwidth: float = HBM_BYTES_PER_S, peak_flops: float = PEAK_FLOPS
    ) -> dict[str, float]:
        """The roofline of one step over sequences given as (new tokens, context before): the larger of its bytes
        (weights + the KV it reads, its context included) over bandwidth and its FLOPs over the peak.

        Also `in_sequence_s`: the floor when the weight matmuls and the attention each meet their own roofline one
        after the other, as a step's kernels run: max(weights / bandwidth, matmul FLOPs / peak) + max(KV / bandwidth,
        attention FLOPs / peak). It exceeds `floor_s` where one part is compute-bound while the other streams
        memory (decode at ~256 rows: the matmuls' FLOPs outlast their weights' bytes), which the step-wide
        roofline counts as overlapped."""
        chunks = list(chunks)
        tokens = sum(n for n, _ in chunks)
        weight_bytes = self.weight_bytes_read(tokens)
        kv_bytes = sum(n + c for n, c in chunks) * self.kv_bytes_per_token
        matmul_flops = self.weight_matmul_flops(tokens, len(chunks))
        attn_flops = sum(self.attention_flops(n, c) for n, c in chunks)
        mem_s, compute_s = (weight_bytes + kv_bytes) / bandwidth, (matmul_flops + attn_flops) / peak_flops
        in_sequence_s = max(weight_bytes / bandwidth, matmul_flops / peak_flops) + max(
            kv_bytes / bandwidth, attn_flops / peak_flops
        )
        return {
            "floor_s": max(mem_s, compute_s),
            "memory_s": mem_s,
            "compute_s": compute_s,
            "in_sequence_s": in_sequence_s,
            "bytes": weight_bytes + kv_bytes,
            "flops": matmul_flops + attn_flops,
        }

    def decode_step_floor_s(self, batch: int, mean_context: float, *, bandwidth: float = HBM_BYTES_PER_S) -> float:
        """(weights read at this batch + KV of `batch` sequences of `mean_context` tokens) / bandwidth."""
        return (self.weight_bytes_read(batch) + batch * mean_context * self.kv_bytes_per_token) / bandwidth

    def prefill_floor_s(
        self, prompt_lens: Sequence[int], *, peak_flops: float = PEAK_FLOPS, bandwidth: float = HBM_BYTES_PER_S
    ) -> float:
        """Prompts prefilled from scratch in one step: max(FLOPs / peak, weights / bandwidth)."""
        flops = self.step_flops([(n, 0) for n in prompt_lens])
        return max(flops / peak_flops, self.weight_bytes_read(sum(prompt_lens)) / bandwidth)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.num_params,
            "weight_GB": self.weight_bytes / 1e9,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "layers": self.layers,
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "experts": self.experts,
            "experts_per_tok": self.experts_per_tok,
        }


def tune_coordinatewise(start: Any, evaluate: Callable[[Any], float], grid: dict[str, tuple[Any, ...]]) -> Any:
    """Coordinate descent over a frozen tuning dataclass: each field of `grid` in turn, each of its values tried
    with the other fields at the best so far; `evaluate` returns seconds (inf for a failed or skipped tuning).
    Values the dataclass rejects and fields it lacks are skipped. Returns the best tuning."""
    import dataclasses

    best, best_t = start, evaluate(start)
    fields = {f.name for f in dataclasses.fields(start)}
    for name, values in grid.items():
        if name not in fields:
            continue
        for value in values:
            try:
                tuning = dataclasses.replace(best, **{name: value})
            except (ValueError, TypeError):
                continue
            if (t := evaluate(tuning)) < best_t:
                best, best_t = tuning, t
    return best


def resolve_model(name: str) -> Path:
    """A config name under benchmarks/configs (llama2-7b), or a folder path."""
    path = Path(name)
    if path.is_dir():
        return path
    if (CONFIGS / name).is_dir():
        return CONFIGS / name
    raise FileNotFoundError(f"no model folder {name!r} (and no benchmarks/configs/{name})")


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_rate(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:,.0f}"
