from __future__ import annotations

import pytest

from jpaged.page_pool import NULL_PAGE, PagePool
from jpaged.request import Request
from jpaged.sampling_params import SamplingParams


def make_request(tokens: list[int], rid: str = "r", index: int = 0) -> Request:
    return Request(
        request_id=rid, prompt_token_ids=tokens, params=SamplingParams(), seed=0, max_tokens=8, sample_index=index
    )


def test_null_page_is_never_handed_out():
    pool = PagePool(5, 4)
    req = make_request(list(range(16)))
    assert pool.allocate(req, 16)
    assert sorted(req.pages) == [1, 2, 3, 4] and NULL_PAGE not in req.pages
    assert not pool.allocate(make_request([1]), 1)


def test_allocate_grows_only_as_needed_and_fails_without_change():
    pool = PagePool(4, 4)
    req = make_request(list(range(10)))
    assert pool.allocate(req, 5) and len(req.pages) == 2
    assert pool.allocate(req, 8) and len(req.pages) == 2
    assert pool.allocate(req, 9) and len(req.pages) == 3
    assert not pool.allocate(req, 13)
    assert len(req.pages) == 3 and pool.num_free_pages == 0


def test_free_returns_every_page():
    pool = PagePool(9, 4)
    reqs = [make_request(list(range(7)), rid=str(i)) for i in range(3)]
    for r in reqs:
        assert pool.allocate(r, 7)
    for r in reqs:
        pool.free(r)
    assert pool.all_free() and all(r.pages == [] for r in reqs)


def test_prefix_hit_shares_full_pages_and_counts_refs():
    pool = PagePool(16, 4)
    prompt = list(range(100, 111))  # 11 tokens: two full pages + 3
    first = make_request(prompt, "a")
    assert pool.lookup_prefix(first) == 0
    assert pool.allocate(first, len(prompt))
    pool.cache_full_pages(first, len(prompt))
    second = make_request([*prompt[:9], 7, 7], "b")
    assert pool.lookup_prefix(second) == 8
    assert second.pages == first.pages[:2]
    assert all(pool.ref_count(p) == 2 for p in second.pages)
    stats = pool.stats()
    assert stats.prefix_cache_hits == 8 and stats.prefix_cache_queries == 22
    pool.free(first)
    pool.free(second)
    assert pool.all_free()
    assert pool.stats().num_cached == 2  # still reusable after both finished


def test_prefix_hit_never_covers_the_last_prompt_token():
    pool = PagePool(16, 4)
    prompt = list(range(8))
    first = make_request(prompt, "a")
    pool.allocate(first, 8)
    pool.cache_full_pages(first, 8)
    again = make_request(prompt, "b")
    assert pool.lookup_prefix(again) == 4  # page 2 would hold the token that must run to produce logits


def test_cached_pages_are_evicted_oldest_first():
    pool = PagePool(4, 2)  # 3 usable pages
    a = make_request([1, 2, 3, 4, 5], "a")
    pool.allocate(a, 5)
    pool.cache_full_pages(a, 4)
    pool.free(a)  # frees pages in reverse: tail first, so the prefix head is evicted last
    b = make_request([9, 9, 9, 9], "b")
    pool.allocate(b, 4)  # takes a's uncached last page, then evicts the tail of its cached prefix
    hit = make_request([1, 2, 3, 4, 5], "c")
    assert pool.lookup_prefix(hit) == 2


def test_hash_is_chained_over_the_prefix():
    pool = PagePool(16, 2)
    a = make_request([1, 2, 3, 4, 5], "a")
    pool.allocate(a, 5)
    pool.cache_full_pages(a, 4)
    # Same second page, different first page: no hit on the second page.
    b = make_request([9, 9, 3, 4, 5], "b")
    assert pool.lookup_prefix(b) == 0


@pytest.mark.parametrize("num_pages,page_size", [(1, 4), (4, 0)])
def test_rejects_bad_sizes(num_pages, page_size):
    with pytest.raises(ValueError, match=r"num_pages|page_size"):
        PagePool(num_pages, page_size)
