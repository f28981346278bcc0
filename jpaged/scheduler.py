"""Which requests run in the next step, and how many of their tokens.

There are no prefill and decode phases (vLLM's rule): every request has `num_computed_tokens` catching up to its
`num_tokens`. A new prompt catches up in chunks under the step's token budget, a decoding request catches up by one,
and a preempted request catches up from zero again (preemption by recompute). Running requests go first, oldest
first; when the pool runs out of pages, the newest running request is preempted to make room.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from jpaged.page_pool import PagePool
from jpaged.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    requests: tuple[Request, ...]  # what runs this step, in batch order
    num_new_tokens: tuple[int, ...]  # tokens each computes, from its num_computed_tokens on
    preempted: tuple[Request, ...]  # sent back to waiting this step; their pages are free again

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
    ) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since start, for stats and metrics

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_output_tokens >= request.max_tokens:
                i += 1  # its last token is still on the device (async scheduling): the request ends there
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.enable_chunked_prefill and n < request.num_tokens - request.num_computed_tokens:
                break
            while not self.pool.allocate(request, request.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, n))
                budget -= n
                i += 1

        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.num_computed_tokens == 0 and request.params.prompt_logprobs is None:
                # Prompt logprobs need logits at every prompt position, so such requests skip the cache.
                cached = self.pool.lookup_prefix(request)
                request.num_computed_tokens = cached
                if request.num_preemptions == 0:
                    request.num_cached_tokens = cached
            remaining = request.num_tokens - request.num_computed_tokens
            n = min(remaining, budget)
            if (not self.enable_chunked_prefill and n < remaining) or not self.pool.allocate(
                request, request.num_computed_tokens + n
            ):
                self.pool.free(request)  # waiting requests hold no pages
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, n))
            budget -= n

        return SchedulerOutput(
            requests=tuple(r for r, _ in scheduled),
            num_new_tokens=tuple(n for _, n in scheduled),
            preempted=tuple(preempted),
        )

    def _preempt(self, request: Request) -> None:
        self.pool.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Ends a request wherever it is (running, waiting or mid-prefill) and returns its pages."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.free(request)
