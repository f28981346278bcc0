from __future__ import annotations

from jpaged.page_pool import PagePool
from jpaged.request import Request, RequestStatus
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler


def make(rid: str, n: int) -> Request:
    return Request(
        request_id=rid, prompt_token_ids=list(range(3, 3 + n)), params=SamplingParams(), seed=0, max_tokens=100
    )


def run_step(sched: Scheduler, out) -> None:
    """What the engine's postprocess does, with a fixed sampled token."""
    for req, n in zip(out.requests, out.num_new_tokens, strict=True):
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(5)


def test_chunked_prefill_respects_the_token_budget():
    sched = Scheduler(PagePool(64, 4), max_num_seqs=8, max_num_batched_tokens=10, enable_chunked_prefill=True)
    a, b = make("a", 7), make("b", 12)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.requests == (a, b) and out.num_new_tokens == (7, 3)
    run_step(sched, out)
    out = sched.schedule()
    # a decodes one token; b catches up with the rest of the budget: no prefill/decode phases.
    assert out.requests == (a, b) and out.num_new_tokens == (1, 9)


def test_without_chunking_a_prompt_waits_for_a_step_it_fits_in_whole():
    sched = Scheduler(PagePool(64, 4), max_num_seqs=8, max_num_batched_tokens=10, enable_chunked_prefill=False)
    a, b = make("a", 7), make("b", 9)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.requests == (a,) and out.num_new_tokens == (7,)


def test_max_num_seqs_caps_the_batch():
    sched = Scheduler(PagePool(64, 4), max_num_seqs=2, max_num_batched_tokens=100, enable_chunked_prefill=True)
    reqs = [make(str(i), 3) for i in range(4)]
    for r in reqs:
        sched.add(r)
    assert sched.schedule().requests == tuple(reqs[:2])


def test_preemption_frees_the_newest_and_recomputes_it_later():
    pool = PagePool(5, 4)  # 4 usable pages
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=100, enable_chunked_prefill=True)
    a, b = make("a", 8), make("b", 7)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.requests == (a, b) and pool.num_free_pages == 0
    run_step(sched, out)
    out = sched.schedule()  # a needs a third page for its 9th token: b, the newest, is preempted
    assert out.requests == (a,) and out.preempted == (b,)
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.pages == []
    assert list(sched.waiting) == [b]
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    out = sched.schedule()
    assert out.requests == (b,) and out.num_new_tokens == (8,)  # prompt plus its one output token, recomputed


def test_finish_returns_pages_from_any_state():
    pool = PagePool(16, 4)
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=4, enable_chunked_prefill=True)
    a, b = make("a", 10), make("b", 3)
    sched.add(a)
    sched.add(b)
    sched.schedule()  # a mid-prefill, b waiting
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert pool.all_free() and not sched.has_unfinished()
