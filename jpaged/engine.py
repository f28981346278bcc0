"""The engine: requests in, `RequestOutput`s out, one step at a time.

`step()` is schedule → run → postprocess. The engine is not thread-safe: one thread owns it (the caller of
`LLM.generate`, or the server's engine thread) and every call into it comes from that thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from jpaged import sharding
from jpaged.config import EngineConfig
from jpaged.detokenizer import Detokenizer
from jpaged.kernels.paged_attention import impl_unavailable_reason
from jpaged.models.config import ModelConfig
from jpaged.models.loader import dummy_params, load_params, resolve_dtype
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.page_pool import PagePool
from jpaged.request import Logprob, Request, RequestIdInUseError, RequestStatus, seed32
from jpaged.runner import InFlight, ModelRunner, StepResult
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)

Prompt = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # True when this engine set JAX's GPU allocator fraction itself (the allocator then holds the utilization)
        self.claimed_gpu_memory = claim_gpu_memory(config.gpu_memory_utilization)
        model_dir = Path(config.model)
        self.model_config = ModelConfig.from_pretrained(model_dir)
        cfg = self.model_config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the model's max_position_embeddings "
                f"({cfg.max_position_embeddings})"
            )
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) so every prompt fits in one step"
            )
        if cfg.sliding_window is not None and cfg.sliding_window < self.max_model_len:
            logger.info("sliding window of %d tokens over max_model_len %d", cfg.sliding_window, self.max_model_len)
        sharding.check_model_fits(cfg.num_heads, cfg.num_kv_heads, config.tensor_parallel_size)
        # before the weights load, not in the first step
        impls = (("attn_impl", config.attn_impl), ("matmul_impl", config.matmul_impl), ("norm_impl", config.norm_impl))
        for name, impl in impls:
            if impl not in ("auto", "xla") and (unavailable := impl_unavailable_reason(impl, name)) is not None:
                raise ValueError(unavailable)

        self.tokenizer: PreTrainedTokenizerBase | None = (
            None if config.skip_tokenizer_init else AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        )
        self.eos_token_ids = frozenset(_eos_ids(model_dir, cfg, self.tokenizer))
        self.mesh = sharding.make_mesh(config.tensor_parallel_size)
        dtype = resolve_dtype(config.dtype, model_dir)
        if config.load_format == "dummy":
            params = dummy_params(cfg, self.mesh, dtype, seed=config.seed)
        else:
            params = load_params(model_dir, cfg, self.mesh, dtype)
        num_pages = config.num_pages or self._num_pages_from_memory(dtype)
        max_pages_per_seq = -(-self.max_model_len // config.page_size)
        if num_pages - 1 < max_pages_per_seq:
            raise ValueError(
                f"num_pages={num_pages} cannot hold one sequence of max_model_len={self.max_model_len} "
                f"({max_pages_per_seq} pages of {config.page_size} tokens, plus the null page)"
            )
        self.pool = PagePool(num_pages, config.page_size, enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.pool,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        self.runner = ModelRunner(
            cfg,
            params,
            self.mesh,
            dtype=dtype,
            attn_impl=config.attn_impl,
            matmul_impl=config.matmul_impl,
            norm_impl=config.norm_impl,
            num_pages=num_pages,
            page_size=config.page_size,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        if config.warmup:
            self.runner.warm_up()
        logger.info(
            "KV pool: %d pages of %d tokens (%.3f GB)", num_pages, config.page_size, self.runner.kv_cache_bytes / 1e9
        )
        self._seed_rng = np.random.default_rng(config.seed)
        self._groups: dict[str, list[Request]] = {}
        self._prompts: dict[str, str | None] = {}
        self._detokenizers: dict[tuple[str, int], Detokenizer] = {}
        self._auto_ids = itertools.count()
        self._inflight: InFlight | None = None  # async scheduling: the dispatched step not yet collected

    # -- requests ---------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None) -> str:
        """Validates and queues a request; raises ValueError naming the problem, leaving the engine untouched."""
        params = params or SamplingParams()
        if request_id is None:  # the next number no request holds: users may have taken some as ids of their own
            request_id = str(next(self._auto_ids))
            while request_id in self._groups:
                request_id = str(next(self._auto_ids))
        if request_id in self._groups:
            raise RequestIdInUseError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, but the engine runs with skip_tokenizer_init")
        self._validate_prompt(token_ids)
        token_ids = [int(t) for t in token_ids]  # numpy integers too: outputs carry plain ints
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]  # type: ignore[union-attr]
            if bad:
                raise ValueError(
                    f"{name} holds token ids outside the vocabulary (size {self.model_config.vocab_size}): {bad[:5]}"
                )
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seed = seed32(params.seed) if params.seed is not None else int(self._seed_rng.integers(2**32))
        group = [
            Request(
                request_id=request_id,
                prompt_token_ids=token_ids,
                params=params,
                seed=seed,
                max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids,
                sample_index=i,
            )
            for i in range(params.n)
        ]
        self._groups[request_id] = group
        self._prompts[request_id] = text
        backend = self.tokenizer.backend_tokenizer if self.tokenizer is not None else None
        for req in group:
            self._detokenizers[req.key] = Detokenizer(backend, token_ids, params)
            self.scheduler.add(req)
        return request_id

    def abort_request(self, request_id: str) -> None:
        for req in self._groups.pop(request_id, []):
            if not req.status.finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self._detokenizers.pop(req.key, None)
        self._prompts.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            if self.tokenizer is None:
                raise ValueError("the engine runs with skip_tokenizer_init: prompts must be token ids")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not _is_id_sequence(ids):
                    raise ValueError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if _is_id_sequence(prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int | np.integer) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt holds token ids outside the vocabulary (size {vocab}): {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt is {len(token_ids)} tokens, but this model's maximum context length is "
                f"{self.max_model_len} tokens and at least one must be left to generate"
            )

    # -- the loop ---------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules, dispatches and collects one step.

        With `async_scheduling`, the step dispatched here is collected by the next call: its device work overlaps
        the host's collection of the previous step and the scheduling of the next. Requests are then scheduled
        before their last sampled token reaches the host (the device feeds it in), so a request that turns out to
        have stopped runs one extra step whose token is dropped.
        """
        outputs: list[RequestOutput] = []
        if self._inflight is not None and not self._may_overlap():
            outputs += self._collect()
        sched = self.scheduler.schedule()
        launched = self._dispatch(sched) if not sched.is_empty() else None
        if self._inflight is not None:
            outputs += self._collect()
        self._inflight = launched
        if not self.config.async_scheduling and self._inflight is not None:
            outputs += self._collect()
        return _merge(outputs)

    def _may_overlap(self) -> bool:
        # Penalties read every past token on the device-side history the host packs, so they need all of them.
        return self.config.async_scheduling and not any(
            r.params.uses_penalties for r in (*self.scheduler.running, *self.scheduler.waiting)
        )

    def _dispatch(self, sched: SchedulerOutput) -> InFlight:
        launched = self.runner.dispatch(sched)
        for row, (req, n) in enumerate(zip(sched.requests, sched.num_new_tokens, strict=True)):
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:  # caught up: this step samples its next token
                req.add_placeholder(row)
        return launched

    def _collect(self) -> list[RequestOutput]:
        step, self._inflight = self._inflight, None
        assert step is not None
        return self._postprocess(step, self.runner.fetch(step))

    def _postprocess(self, step: InFlight, result: StepResult) -> list[RequestOutput]:
        touched: dict[str, None] = {}
        sched = step.sched
        for row, (req, n, begin) in enumerate(zip(sched.requests, sched.num_new_tokens, step.begins, strict=True)):
            if req.status.finished:
                continue  # aborted, or stopped by a token the host saw after this step was dispatched
            if req.status is RequestStatus.RUNNING:  # not preempted since this step was dispatched
                self.pool.cache_full_pages(req, begin + n)
            if row in result.prompt_logprobs:
                # Rows start at position 0 (None) or begin + 1; a recomputed prompt (after preemption) adds only
                # the positions it had not reached before.
                first = 0 if begin == 0 else begin + 1
                req.prompt_logprobs.extend(result.prompt_logprobs[row][len(req.prompt_logprobs) - first :])
            index = begin + n  # where this step's sample goes, if it sampled one
            if req.pending.get(index) != row:
                continue  # a prompt chunk with more to come: nothing sampled yet
            token = int(result.token_ids[row])
            req.resolve(index, token)
            if result.logprobs is not None and req.params.logprobs is not None:
                k = req.params.logprobs
                top = tuple(zip(result.top_ids[row, :k].tolist(), result.top_logprobs[row, :k].tolist(), strict=True))  # type: ignore[index]
                req.logprobs.append(Logprob(token, float(result.logprobs[row]), top))
            req.check_stop_token(index)
            stop = self._detokenizers[req.key].add(token, stop_token=req.status is RequestStatus.FINISHED_STOPPED)
            # A stop string outranks the length limit (as vLLM's stop checker orders them), not EOS or a stop token.
            if stop is not None and (not req.status.finished or req.status is RequestStatus.FINISHED_LENGTH):
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = stop
            if req.status.finished:
                req.truncate_after(index)
                self.scheduler.finish(req, req.status)
            touched[req.request_id] = None
        return [self._make_output(rid) for rid in touched]

    def _make_output(self, request_id: str) -> RequestOutput:
        group = self._groups[request_id]
        finished = all(r.status.finished for r in group)
        outputs = []
        for req in group:
            detok = self._detokenizers[req.key]
            done = req.status.finished
            outputs.append(
                CompletionOutput(
                    index=req.sample_index,
                    text=detok.visible_text(done),
                    token_ids=req.known_output_token_ids,
                    cumulative_logprob=sum(lp.logprob for lp in req.logprobs)
                    if req.params.logprobs is not None
                    else None,
                    logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
                    finish_reason=req.status.value if done else None,
                    stop_reason=req.stop_reason,
                )
            )
        first = group[0]
        out = RequestOutput(
            request_id=request_id,
            prompt=self._prompts[request_id],
            prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=list(first.prompt_logprobs) if first.params.prompt_logprobs is not None else None,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
        )
        if finished:
            self._forget(request_id)
        return out

    def _forget(self, request_id: str) -> None:
        for req in self._groups.pop(request_id):
            self._detokenizers.pop(req.key, None)
        self._prompts.pop(request_id, None)

    # -- sizing -----------------------------------------------------------------------------------------------------
    def _num_pages_from_memory(self, dtype: Any) -> int:
        """Pages that fit in the memory left after the weights: on accelerators a share of what the allocator may
        use, minus what is in use and a reserve for the step's activations (an accelerator whose allocator reports
        no limit is an error: the CPU's 1 GB default would silently starve it); on CPU `kv_cache_memory_gb`,
        capped at what `max_num_seqs` full-length sequences could ever hold. The share is CLAIMED_KV_SHARE where
        the engine set the allocator's fraction to `gpu_memory_utilization` itself, else `gpu_memory_utilization`
        (of a limit the user or JAX's default chose)."""
        cfg, config = self.model_config, self.config
        kv_heads = sharding.kv_heads_per_pool(cfg.num_kv_heads, config.tensor_parallel_size)
        page_bytes = 2 * cfg.num_layers * kv_heads * config.page_size * cfg.head_dim * np.dtype(dtype).itemsize
        max_pages_per_seq = -(-self.max_model_len // config.page_size)
        stats = [d.memory_stats() or {} for d in self.mesh.devices.flat]
        if all("bytes_limit" in s for s in stats):
            # Logits of the largest token bucket dominate the step's temporaries; keep room for them twice over.
            reserve = 2 * config.max_num_batched_tokens * cfg.vocab_size * 4 + (1 << 30)
            share = CLAIMED_KV_SHARE if self.claimed_gpu_memory else config.gpu_memory_utilization
            per_device = min(int(s["bytes_limit"] * share) - s["bytes_in_use"] - reserve for s in stats)
            logger.info("KV sizing: memory stats %s", stats[0])
            budget = per_device * len(stats)
            if budget < 2 * page_bytes:
                raise ValueError(
                    f"no memory left for KV pages: {stats[0]['bytes_in_use'] / 1e9:.1f} GB in use of an allocator "
                    f"limit of {stats[0]['bytes_limit'] / 1e9:.1f} GB (gpu_memory_utilization="
                    f"{config.gpu_memory_utilization}); raise it, set XLA_PYTHON_CLIENT_MEM_FRACTION, or pass num_pages"
                )
            return int(budget // page_bytes)
        platform = self.mesh.devices.flat[0].platform
        if platform != "cpu":  # e.g. XLA's VMM allocator, which command-buffer update modes switch a GPU to
            raise ValueError(
                f"the {platform} allocator reports no memory limit to size the KV pool from (memory stats: "
                f"{sorted(stats[0])}); pass num_pages"
            )
        budget = int(config.kv_cache_memory_gb * 1e9)
        return max(2, min(budget // page_bytes, config.max_num_seqs * max_pages_per_seq + 1))


MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"
MAX_MEM_FRACTION = 0.95
# The pool's share of an allocator whose limit the engine claimed: the rest is left to the steps' other temporaries
# and XLA's autotuning scratch. 0.9 is the headroom every H200 benchmark ran with (a 0.9 fraction, 0.9 of it).
CLAIMED_KV_SHARE = 0.9
JAX_DEFAULT_MEM_FRACTION = 0.75


def claim_gpu_memory(fraction: float) -> bool:
    """Lets JAX's GPU allocator take `fraction` of each GPU (at most MAX_MEM_FRACTION), if JAX has not started its
    backends yet and the user has not chosen; returns whether it did. JAX's own default is 75%, the pages can only
    live in what the allocator may take, and without this a default engine on an H200 sized its pool from 0.9 x 75%
    of the memory (84.7 GB of pages against 104.9 GB at 0.9); an engine asking for less than 75% took 75% anyway,
    so two could not share a GPU. Once the backends run, the process's fraction is fixed; a GPU engine asking for
    more than it then says so."""
    from jax._src import xla_bridge

    if MEM_FRACTION_VAR in os.environ:
        return False
    if not xla_bridge.backends_are_initialized():
        # The CUDA context and libraries (cuBLAS workspaces, Triton) need memory outside JAX's pool: past 0.95 JAX's
        # allocator would take it from them (the Mixtral-8x7B benchmarks run at 0.95 on the H200).
        claimed = min(fraction, MAX_MEM_FRACTION)
        os.environ[MEM_FRACTION_VAR] = str(claimed)
        logger.info("%s=%s (gpu_memory_utilization=%s) before JAX starts: its GPU allocator may take that much of "
                    "each GPU", MEM_FRACTION_VAR, claimed, fraction)  # fmt: skip
        return True
    import jax

    if jax.default_backend() == "gpu" and fraction > JAX_DEFAULT_MEM_FRACTION:
        logger.warning(
            "JAX started before the engine: its GPU allocator keeps its default of 75%% of each GPU, and the KV pool "
            "is sized within that; set %s=%s before JAX starts (or create the engine first) to let it take more",
            MEM_FRACTION_VAR, min(fraction, MAX_MEM_FRACTION),
        )  # fmt: skip
    return False


def _eos_ids(model_dir: Path, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """EOS ids as vLLM gathers them: the config's, generation_config.json's and the tokenizer's."""
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _merge(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per request: when two steps are collected in one call, the later output supersedes."""
    latest = {o.request_id: o for o in outputs}
    return list(latest.values())


def _is_id_sequence(value: Any) -> bool:
    """A list, tuple or 1-D array: what a prompt's token ids may come in (the ids themselves are checked later)."""
    return isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim == 1)
