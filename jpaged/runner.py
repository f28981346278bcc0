"""Turns a `SchedulerOutput` into device arrays, runs the one jitted step, and brings back only what the host needs.

The step is `forward` + sampling, compiled once per padding bucket (token count T, sequence count B, and a few static
switches: logprobs, prompt logprobs, penalties, and whether the batch is decode-only where attention has a decode
kernel of its own, in which case also whether any row uses top-k/top-p/min-p); the KV pages are donated, so every
step updates them in place.
What crosses to the host each step: the sampled token ids [B] (and logprobs when some request asked for them).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jpaged import sharding, transfer
from jpaged.kernels.paged_attention import has_decode_kernel
from jpaged.models import get_forward
from jpaged.models.config import ModelConfig
from jpaged.models.metadata import AttentionMetadata
from jpaged.page_pool import NULL_PAGE
from jpaged.request import Logprob, Request
from jpaged.sampler import SamplerOutput, SamplingMetadata, filtered_rows, prompt_logprobs, sample
from jpaged.sampling_params import MAX_LOGPROBS
from jpaged.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    tokens: jax.Array  # [T] int32 token ids; padding rows hold 0
    prev_rows: jax.Array  # [T] int32 row of the previous step's sample that is this token (async), else -1
    positions: jax.Array  # [T] int32 position of each token in its sequence
    attn: AttentionMetadata
    sample_rows: jax.Array  # [B] int32 which of the R logit rows each sequence samples from
    prompt_targets: jax.Array  # [T] int32 next prompt token per row for prompt logprobs, -1 where none ([1] if unused)
    sampling: SamplingMetadata


@dataclasses.dataclass(frozen=True)
class StepSwitches:
    """The step's static switches besides its shapes: each combination is a compiled variant."""

    num_logprobs: int = 0  # top logprobs per sampled token (0: none)
    want_prompt_logprobs: bool = False
    # False only for decode-only steps where no row uses top-k/top-p/min-p: the filter stage is then an identity,
    # and skipping it saves a 7B decode step ~200 kernel launches on an H200 (docs/benchmarks.md, eighth session).
    sampling_filters: bool = True


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A dispatched step: its outputs are device arrays the host has not waited for yet."""

    sched: SchedulerOutput
    begins: tuple[int, ...]  # each request's num_computed_tokens when the step was packed
    sampled: SamplerOutput
    prompt: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None  # sampler.prompt_logprobs' four
    num_logprobs: int


@dataclasses.dataclass(frozen=True)
class StepResult:
    token_ids: np.ndarray  # [num scheduled] sampled token of each scheduled request (meaningful when it sampled)
    logprobs: np.ndarray | None  # [num scheduled] logprob of that token
    top_ids: np.ndarray | None  # [num scheduled, MAX_LOGPROBS]
    top_logprobs: np.ndarray | None
    prompt_logprobs: dict[int, list[Logprob | None]]  # batch row -> logprobs of this chunk's prompt positions


MIN_TOKEN_BUCKET = 16


def buckets(smallest: int, largest: int) -> list[int]:
    """Padding sizes: powers of two from `smallest`, then `largest` itself."""
    sizes = [smallest]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != largest:
        sizes.append(largest)
    return sizes


def bucket(n: int, sizes: list[int]) -> int:
    """The smallest size in `sizes` that holds n."""
    for size in sizes:
        if n <= size:
            return size
    raise ValueError(f"{n} is larger than the largest bucket {sizes[-1]}")


def _step(
    params,
    kv_pages,
    packed: jax.Array,  # [n] int32 the StepInput, packed into one buffer by transfer.pack
    prev_tokens: jax.Array,  # [max_num_seqs] int32 the previous step's samples, padded
    *,
    layout: transfer.Layout,
    cfg: ModelConfig,
    attn_impl: str,
    matmul_impl: str,
    norm_impl: str,
    num_logprobs: int,
    want_prompt_logprobs: bool,
    sampling_filters: bool,
):
    batch: StepInput = transfer.unpack(packed, layout)
    forward = get_forward(cfg, attn_impl=attn_impl, matmul_impl=matmul_impl, norm_impl=norm_impl)
    # With async scheduling the host packs this step before it has seen the last one's samples: take them here.
    tokens = jnp.where(batch.prev_rows >= 0, prev_tokens[jnp.maximum(batch.prev_rows, 0)], batch.tokens)
    logits, kv_pages = forward(params, tokens, batch.positions, kv_pages, batch.attn)
    sampled = sample(logits[batch.sample_rows], batch.sampling, num_logprobs=num_logprobs, filters=sampling_filters)
    prompt = prompt_logprobs(logits, batch.prompt_targets, num_logprobs=MAX_LOGPROBS) if want_prompt_logprobs else None
    next_tokens = jnp.zeros_like(prev_tokens).at[: sampled.token_ids.shape[0]].set(sampled.token_ids)
    return kv_pages, sampled, prompt, next_tokens


STEP_STATIC_ARGNAMES = (
    "layout",
    "cfg",
    "attn_impl",
    "matmul_impl",
    "norm_impl",
    "num_logprobs",
    "want_prompt_logprobs",
    "sampling_filters",
)
# One jitted step for the process: engines with the same model config and bucket shapes share compiled code.
_jitted_step = jax.jit(_step, static_argnames=STEP_STATIC_ARGNAMES, donate_argnames=("kv_pages",))


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Any,
        mesh: Mesh,
        *,
        dtype: jnp.dtype,
        attn_impl: str,
        matmul_impl: str = "auto",
        norm_impl: str = "auto",
        num_pages: int,
        page_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.cfg = cfg
        self.params = params
        self.mesh = mesh
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages_per_seq = -(-max_model_len // page_size)
        # Sequences never outnumber tokens, so the sequence padding follows the token bucket: one compiled
        # variant per token bucket instead of one per (tokens, sequences) pair.
        self.token_buckets = buckets(min(MIN_TOKEN_BUCKET, max_num_batched_tokens), max_num_batched_tokens)
        kv_heads = sharding.kv_heads_per_pool(cfg.num_kv_heads, mesh.shape[sharding.TP])
        shape = (kv_heads, num_pages, page_size, cfg.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding.kv_pages_sharding(mesh))
        self.kv_pages = [(zeros(), zeros()) for _ in range(cfg.num_layers)]
        self._replicated = sharding.replicated(mesh)
        self.attn_impl = attn_impl
        # the step's static args
        self._statics = {"cfg": cfg, "attn_impl": attn_impl, "matmul_impl": matmul_impl, "norm_impl": norm_impl}
        # Steps whose every sequence has one token get their own compiled variant only where attention then runs
        # another kernel (the Mosaic GPU decode kernel on Hopper); elsewhere it would compile the same program twice.
        self.decode_steps = has_decode_kernel(
            attn_impl,
            jax.ShapeDtypeStruct((1, cfg.num_heads, cfg.head_dim), dtype),
            jax.ShapeDtypeStruct(shape, dtype),
            jax.ShapeDtypeStruct((1, self.max_pages_per_seq), jnp.int32),
            cfg.sliding_window,
        )
        # Where there is a decode kernel, a lone sequence's decode step gets a bucket of one row (see _pack).
        # benchmarks/warmup.py turns it off to time the warm-up without that variant.
        self.one_row_decode = self.decode_steps
        # Token buckets of steps that hold a prefill chunk. With decode variants these never serve decode-only steps,
        # so the small ones buy little on a GPU, where a step below the ridge point (~150 tokens of bf16 weights on
        # an H200) reads the same weights whatever its rows; benchmarks/warmup.py --mixed-from drops them to time
        # the warm-up without them. Without decode variants they serve every step.
        self.mixed_buckets = self.token_buckets
        self.warmup_seconds: float | None = None  # set by warm_up()
        self._last_samples = jax.device_put(np.zeros(max_num_seqs, np.int32), self._replicated)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_pages)

    def execute(self, sched: SchedulerOutput) -> StepResult:
        return self.fetch(self.dispatch(sched))

    def dispatch(self, sched: SchedulerOutput) -> InFlight:
        """Packs and launches the step without waiting for it (JAX dispatch is asynchronous)."""
        batch, switches = self._pack(sched)
        packed, layout = transfer.pack(batch)
        with jax.set_mesh(self.mesh):
            self.kv_pages, sampled, prompt, self._last_samples = _jitted_step(
                self.params,
                self.kv_pages,
                packed,
                self._last_samples,
                layout=layout,
                **self._statics,
                **dataclasses.asdict(switches),
            )
        num_logprobs = switches.num_logprobs
        # Start the copies of what the host will read as soon as the step ends, not when `fetch` asks: with async
        # scheduling, `fetch` runs only after the next step has been packed and dispatched.
        for out in (sampled.token_ids, *((sampled.logprobs, sampled.top_ids, sampled.top_logprobs)
                                         if num_logprobs else ())):  # fmt: skip
            out.copy_to_host_async()
        begins = tuple(r.num_computed_tokens for r in sched.requests)
        return InFlight(sched=sched, begins=begins, sampled=sampled, prompt=prompt, num_logprobs=num_logprobs)

    def fetch(self, step: InFlight) -> StepResult:
        """Waits for a dispatched step and brings its samples (and requested logprobs) to the host."""
        n = len(step.sched.requests)
        sampled = step.sampled
        token_ids = np.asarray(sampled.token_ids)[:n]
        if step.num_logprobs:
            logprobs, top_ids, top_lps = (
                np.asarray(a)[:n] for a in (sampled.logprobs, sampled.top_ids, sampled.top_logprobs)
            )
        else:
            logprobs = top_ids = top_lps = None  # type: ignore[assignment]
        return StepResult(
            token_ids=token_ids,
            logprobs=logprobs,
            top_ids=top_ids,
            top_logprobs=top_lps,
            prompt_logprobs=self._unpack_prompt_logprobs(step) if step.prompt is not None else {},
        )

    def warm_up(self, workers: int | None = None) -> float:
        """Compiles the step for every token bucket (the common variant: no logprobs, penalties or prompt
        logprobs; with `decode_steps`, also the decode-only variants: one row for a lone sequence and each bucket
        that several sequences' decode steps can land in, each with and without the sampler's filter stage), then
        runs each once on an all-padding batch, which only writes into the null page. A step with logprobs,
        penalties or prompt logprobs compiles its variant when it first comes.

        XLA compiles on host threads without the GIL, so the buckets compile concurrently, `workers` at a time (default:
        one per core). Tracing and lowering a variant run Python and hold the GIL: they run here, one variant after
        another, and each variant goes to a compile thread as soon as it is lowered (lowering them all at once on
        the compile threads interleaved them under the GIL, so no compile could start before nearly all had
        lowered)."""
        start = time.perf_counter()
        empty = SchedulerOutput(requests=(), num_new_tokens=(), preempted=())
        variants = [(t_pad, False, True) for t_pad in self.mixed_buckets]  # (T, decode-only, sampling filters)
        if self.decode_steps:
            decode_buckets = [1] if self.one_row_decode else []
            if self.max_num_seqs > 1 or not self.one_row_decode:  # else every decode step has one sequence
                # a step holds at most one sequence per token
                largest_decode = bucket(min(self.max_num_seqs, self.max_num_batched_tokens), self.token_buckets)
                decode_buckets += [t_pad for t_pad in self.token_buckets if t_pad <= largest_decode]
            variants += [(t_pad, True, filters) for t_pad in decode_buckets for filters in (True, False)]
            variants = list(dict.fromkeys(variants))  # a bucket of one token is the one-row decode variant too
        packs = [self._pack(empty, t_pad=t_pad, decode_only=decode, sampling_filters=filters)
                 for t_pad, decode, filters in variants]  # fmt: skip
        batches = [(transfer.pack(batch), switches) for batch, switches in packs]

        def compile_lowered(lowered: Any) -> float:
            t0 = time.perf_counter()
            with jax.set_mesh(self.mesh):
                lowered.compile()
            return time.perf_counter() - t0

        workers = max(1, min(len(batches), workers or os.cpu_count() or 1))
        lower_seconds: list[float] = []
        show = len(batches) >= 4
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            try:
                futures = []
                for (packed, layout), switches in tqdm(batches, desc="Lowering step buckets", disable=not show):
                    t0 = time.perf_counter()
                    with jax.set_mesh(self.mesh):
                        lowered = _jitted_step.lower(
                            self.params, self.kv_pages, packed, self._last_samples, layout=layout, **self._statics,
                            **dataclasses.asdict(switches),
                        )  # fmt: skip
                    lower_seconds.append(time.perf_counter() - t0)
                    futures.append(pool.submit(compile_lowered, lowered))
                logger.info("warm-up: %d variants lowered in %.1f s", len(variants), sum(lower_seconds))
                for (t_pad, decode, filters), lower_s, future in tqdm(
                    zip(variants, lower_seconds, futures, strict=True), total=len(futures),
                    desc="Compiling step buckets", disable=not show,
                ):  # fmt: skip
                    kind = (" (decode)" if filters else " (decode, no filters)") if decode else ""
                    logger.info("compiled step bucket T=%d B=%d%s in %.2f s (lowered in %.2f s)", t_pad,
                                min(t_pad, self.max_num_seqs), kind, future.result(), lower_s)  # fmt: skip
            except BaseException:  # a failed lowering or compile, or Ctrl-C: the queued compiles are dropped
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        for (packed, layout), switches in batches:  # the compiled executables now serve the real call path
            with jax.set_mesh(self.mesh):
                self.kv_pages, sampled, _, _ = _jitted_step(
                    self.params, self.kv_pages, packed, self._last_samples, layout=layout, **self._statics,
                    **dataclasses.asdict(switches),
                )  # fmt: skip
            jax.block_until_ready(sampled.token_ids)
        elapsed = self.warmup_seconds = time.perf_counter() - start
        logger.info("warm-up: %d buckets compiled in %.1f s", len(variants), elapsed)
        return elapsed

    # -- packing ----------------------------------------------------------------------------------------------------
    def _pack(
        self,
        sched: SchedulerOutput,
        t_pad: int | None = None,
        decode_only: bool | None = None,
        sampling_filters: bool | None = None,
    ) -> tuple[StepInput, StepSwitches]:
        """The step's input and switches for `sched`; t_pad, decode_only and sampling_filters force a variant (the
        warm-up's all-padding batches)."""
        reqs, counts = sched.requests, sched.num_new_tokens
        if decode_only is None:
            # A one-token prefill chunk is a decode query too: it sits at its sequence's last position.
            decode_only = self.decode_steps and bool(counts) and all(n == 1 for n in counts)
        if t_pad is None:
            # A lone sequence's decode step (single stream) gets a bucket of one row: the decode kernel sizes its
            # split-K by the padded batch, and 16 rows x K heads look like enough programs not to split, so the one
            # real sequence would run on K programs of a GPU with 132 SMs.
            single = self.one_row_decode and decode_only and len(counts) == 1
            sizes = self.token_buckets if decode_only else self.mixed_buckets
            t_pad = 1 if single else bucket(sum(counts), sizes)
        b_pad = min(t_pad, self.max_num_seqs)
        want_prompt = any(
            r.params.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens for r in reqs
        )
        num_logprobs = MAX_LOGPROBS if any(r.params.logprobs is not None for r in reqs) else 0

        # Whole-batch numpy rather than a loop of small array ops per request: at 256 decode sequences the loop
        # cost ~6.6 ms of host time a step on the CPU box, which an overlapped device step must hide.
        num_reqs, counts_np = len(reqs), np.asarray(counts, np.int32)
        total = int(counts_np.sum())
        begins = np.fromiter((r.num_computed_tokens for r in reqs), np.int32, count=num_reqs)
        ends = np.cumsum(counts_np, dtype=np.int32)  # each request's rows are [ends - counts, ends)
        row_req = np.repeat(np.arange(num_reqs), counts_np)  # the request of each token row
        positions = np.zeros(t_pad, np.int32)
        positions[:total] = np.arange(total, dtype=np.int32) - np.repeat(ends - counts_np - begins, counts_np)

        page_counts = np.fromiter((len(r.pages) for r in reqs), np.int64, count=num_reqs)
        num_pages = int(page_counts.sum())
        page_tables = np.full((b_pad, self.max_pages_per_seq), NULL_PAGE, np.int32)
        page_tables[np.repeat(np.arange(num_reqs), page_counts),
                    np.arange(num_pages) - np.repeat(np.cumsum(page_counts) - page_counts, page_counts)] = (
            np.fromiter(itertools.chain.from_iterable(r.pages for r in reqs), np.int32, count=num_pages)
        )  # fmt: skip
        slots = np.full(t_pad, NULL_PAGE * self.page_size, np.int32)
        live = positions[:total]
        page_of = live // self.page_size  # each token's page, as an index into its request's pages
        if total and not (page_of < page_counts[row_req]).all():  # the scheduler allocates first
            raise RuntimeError("a scheduled token has no page: the scheduler did not allocate before scheduling")
        slots[:total] = page_tables[row_req, page_of] * self.page_size + live % self.page_size

        tokens = np.zeros(t_pad, np.int32)
        tokens[:total] = list(itertools.chain.from_iterable(
            r.token_ids[b : b + n] for r, b, n in zip(reqs, begins.tolist(), counts, strict=True)))  # fmt: skip
        prev_rows = np.full(t_pad, -1, np.int32)  # a token the previous step sampled and the host has not seen
        for req, begin, end, n in zip(reqs, begins.tolist(), ends.tolist(), counts, strict=True):
            for index, row in req.pending.items():
                if begin <= index < begin + n:
                    prev_rows[end - n + index - begin] = row
        targets = np.full(t_pad if want_prompt else 1, -1, np.int32)
        if want_prompt:
            for req, begin, end, n in zip(reqs, begins.tolist(), ends.tolist(), counts, strict=True):
                if req.params.prompt_logprobs is not None:
                    nxt = np.arange(begin + 1, begin + n + 1)
                    ok = nxt < req.num_prompt_tokens
                    targets[end - n : end][ok] = np.asarray(req.token_ids, np.int32)[nxt[ok]]
        seq_lens = np.zeros(b_pad, np.int32)
        seq_lens[:num_reqs] = begins + counts_np
        cu_q_lens = np.full(b_pad + 1, total, np.int32)
        cu_q_lens[0] = 0
        cu_q_lens[1 : num_reqs + 1] = ends
        last_rows = np.zeros(b_pad, np.int32)
        last_rows[:num_reqs] = ends - 1

        if want_prompt:  # logits at every token row; each sequence samples from its last
            logits_indices, sample_rows = np.arange(t_pad, dtype=np.int32), last_rows
        else:
            logits_indices, sample_rows = last_rows, np.arange(b_pad, dtype=np.int32)
        attn = AttentionMetadata(
            slot_mapping=_host(slots),
            page_tables=_host(page_tables),
            seq_lens=_host(seq_lens),
            cu_q_lens=_host(cu_q_lens),
            num_seqs=_host(np.array([len(reqs)], np.int32)),
            logits_indices=_host(logits_indices),
            decode_only=decode_only,
        )
        sampling = self._pack_sampling(reqs, b_pad)
        if sampling_filters is None:
            # Only the decode variants warm-up compiles have a twin without the filter stage: a step that compiles
            # on first use anyway (logprobs, prompt logprobs, penalties, a wide logit bias) keeps the stage, so that
            # it does not compile twice.
            warmed_up = (not num_logprobs and not want_prompt and sampling.history.shape[1] == 1
                         and sampling.bias_ids.shape[1] == _BIAS_WIDTHS[0])  # fmt: skip
            rows = filtered_rows(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                                 vocab=self.cfg.vocab_size)  # fmt: skip
            sampling_filters = not (decode_only and warmed_up) or bool(np.any(rows))
        batch = StepInput(
            tokens=_host(tokens),
            prev_rows=_host(prev_rows),
            positions=_host(positions),
            attn=attn,
            sample_rows=_host(sample_rows),
            prompt_targets=_host(targets),
            sampling=sampling,
        )
        return batch, StepSwitches(num_logprobs, want_prompt, sampling_filters)

    def _pack_sampling(self, reqs: tuple[Request, ...], b_pad: int) -> SamplingMetadata:
        def column(fn: Callable[[Request], Any], dtype: Any, pad: Any) -> np.ndarray:
            out = np.full(b_pad, pad, dtype)
            out[: len(reqs)] = [fn(r) for r in reqs]
            return out

        use_penalties = any(r.params.uses_penalties for r in reqs)
        hist_len = self.max_model_len if use_penalties else 1
        history = np.full((b_pad, hist_len), -1, np.int32)
        if use_penalties:
            for b, r in enumerate(reqs):
                if r.params.uses_penalties:
                    history[b, : r.num_tokens] = r.token_ids
        biases = [_logit_bias(r) for r in reqs]
        width = bucket(max((len(x) for x in biases), default=1), _BIAS_WIDTHS)
        bias_ids = np.full((b_pad, width), -1, np.int32)
        bias_values = np.zeros((b_pad, width), np.float32)
        for b, bias in enumerate(biases):
            if bias:
                bias_ids[b, : len(bias)] = list(bias)
                bias_values[b, : len(bias)] = list(bias.values())
        return SamplingMetadata(
            temperature=_host(column(lambda r: r.params.temperature, np.float32, 0.0)),
            top_p=_host(column(lambda r: r.params.top_p, np.float32, 1.0)),
            # any top_k >= V is off; clipped so that a huge one fits int32 (it had raised OverflowError in the step)
            top_k=_host(column(lambda r: min(r.params.top_k, self.cfg.vocab_size), np.int32, 0)),
            min_p=_host(column(lambda r: r.params.min_p, np.float32, 0.0)),
            seeds=_host(column(lambda r: r.seed, np.uint32, 0)),
            sample_index=_host(column(lambda r: r.sample_index, np.int32, 0)),
            positions=_host(column(lambda r: r.num_tokens, np.int32, 0)),
            presence_penalty=_host(column(lambda r: r.params.presence_penalty, np.float32, 0.0)),
            frequency_penalty=_host(column(lambda r: r.params.frequency_penalty, np.float32, 0.0)),
            repetition_penalty=_host(column(lambda r: r.params.repetition_penalty, np.float32, 1.0)),
            history=_host(history),
            prompt_lens=_host(column(lambda r: r.num_prompt_tokens, np.int32, 0)),
            bias_ids=_host(bias_ids),
            bias_values=_host(bias_values),
        )

    def _unpack_prompt_logprobs(self, step: InFlight) -> dict[int, list[Logprob | None]]:
        target_lp, target_rank, top_ids, top_lps = (np.asarray(a) for a in step.prompt)  # type: ignore[union-attr]
        out: dict[int, list[Logprob | None]] = {}
        start = 0
        sched = step.sched
        for b, (req, n, begin) in enumerate(zip(sched.requests, sched.num_new_tokens, step.begins, strict=True)):
            k = req.params.prompt_logprobs
            if k is not None:
                rows: list[Logprob | None] = [None] if begin == 0 else []
                for t in range(start, start + n):
                    pos = begin + (t - start) + 1  # the prompt position this row predicts
                    if pos >= req.num_prompt_tokens:
                        break
                    top = tuple(zip(top_ids[t, :k].tolist(), top_lps[t, :k].tolist(), strict=True))
                    rows.append(Logprob(req.token_ids[pos], float(target_lp[t]), top, int(target_rank[t])))
                out[b] = rows
            start += n
        return out


_BIAS_WIDTHS = [8, 64, 512, 4096, 1 << 20]


def _host(x: np.ndarray) -> jax.Array:
    """A host array in a field typed for the device: `transfer.pack` moves the whole StepInput in one buffer."""
    return cast(jax.Array, x)


def _logit_bias(request: Request) -> dict[int, float]:
    """The request's own logit_bias plus, until min_tokens are out, a ban on the tokens that would end it."""
    bias = dict(request.params.logit_bias or {})
    if request.num_output_tokens < request.params.min_tokens:
        banned = set(request.params.stop_token_ids or ())
        if not request.params.ignore_eos:
            banned |= request.eos_token_ids
        bias.update(dict.fromkeys(banned, float("-inf")))
    return bias
