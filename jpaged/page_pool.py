"""The KV page pool's bookkeeping: which pages are free, who holds which, and which full pages can be shared.

Plain host Python, never traced: the device only ever sees page ids in the page tables that the runner packs.

Page 0 is the null page. It is never handed out; padding tokens write their K/V into it and unused page-table entries
point at it, so a padded slot can never touch a live sequence's pages.

Why these structures:
- `_free` is an OrderedDict of page ids in the order they became free. Allocation pops the oldest, so a freed page
  that still holds a cached prefix survives as long as possible (LRU eviction), and a prefix-cache hit on a free page
  removes it from the middle in O(1).
- `_ref_counts` is a flat list indexed by page id: pages shared by several requests (a common prefix, or the n samples
  of one prompt) are freed when the last holder lets go.
- Full pages are identified by a hash chained over every token before them (`page_hash`), so a page is reused only
  behind the same prefix; the page's own tokens are compared on a hit, which makes a hash collision harmless.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from jpaged.request import Request

NULL_PAGE = 0


@dataclasses.dataclass(frozen=True)
class PoolStats:
    num_pages: int  # usable pages (the null page excluded)
    num_free: int  # not held by any request (cached ones included)
    num_cached: int  # free pages that still hold a reusable full prefix page
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_pages


def page_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class PagePool:
    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (one is the null page), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_pages))
        self._ref_counts = [0] * num_pages
        self._page_to_hash: dict[int, int] = {}
        self._page_tokens: dict[int, tuple[int, ...]] = {}
        self._hash_to_page: dict[int, int] = {}
        # Per request: the chained hashes of its full pages computed so far (so each page is hashed once).
        self._request_hashes: dict[tuple[str, int], list[int]] = {}
        self._queries = 0
        self._hits = 0

    # -- allocation -----------------------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, request: Request, num_tokens: int) -> int:
        """Pages `request` must gain to hold `num_tokens` tokens in total."""
        return max(0, -(-num_tokens // self.page_size) - len(request.pages))

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grows `request.pages` to hold `num_tokens` tokens; False (and no change) if the pool is short."""
        needed = self.pages_needed(request, num_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            page, _ = self._free.popitem(last=False)
            self._evict(page)
            self._ref_counts[page] = 1
            request.pages.append(page)
        return True

    def free(self, request: Request) -> None:
        """Drops the request's hold on its pages (reversed, so a prefix's tail is evicted before its head)."""
        for page in reversed(request.pages):
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                self._free[page] = None
        request.pages = []
        self._request_hashes.pop(request.key, None)

    def _evict(self, page: int) -> None:
        h = self._page_to_hash.pop(page, None)
        if h is not None:
            self._page_tokens.pop(page)
            if self._hash_to_page.get(h) == page:
                del self._hash_to_page[h]

    # -- prefix caching -------------------------------------------------------------------------------------------
    def lookup_prefix(self, request: Request) -> int:
        """Takes the cached pages matching the request's leading full pages; returns the tokens they cover.

        At most (prompt length - 1) tokens are reused: the last prompt token must run to produce logits.
        """
        if not self.enable_prefix_caching or request.pages:
            return 0
        prompt = request.prompt_token_ids
        usable = (len(prompt) - 1) // self.page_size
        self._queries += len(prompt)
        parent = None
        hits: list[int] = []
        for i in range(usable):
            tokens = tuple(prompt[i * self.page_size : (i + 1) * self.page_size])
            parent = page_hash(parent, tokens)
            page = self._hash_to_page.get(parent)
            if page is None or self._page_tokens[page] != tokens:
                break
            hits.append(page)
        for page in hits:
            if self._ref_counts[page] == 0:
                del self._free[page]
            self._ref_counts[page] += 1
        request.pages = hits
        self._request_hashes[request.key] = []
        num_tokens = len(hits) * self.page_size
        self._hits += num_tokens
        self.cache_full_pages(request, num_tokens)
        return num_tokens

    def cache_full_pages(self, request: Request, num_computed_tokens: int) -> None:
        """Makes the request's pages that are full of computed tokens findable by later requests."""
        if not self.enable_prefix_caching:
            return
        hashes = self._request_hashes.setdefault(request.key, [])
        for i in range(len(hashes), num_computed_tokens // self.page_size):
            tokens = tuple(request.token_ids[i * self.page_size : (i + 1) * self.page_size])
            h = page_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            page = request.pages[i]
            if h not in self._hash_to_page and page not in self._page_to_hash:
                self._hash_to_page[h] = page
                self._page_to_hash[page] = h
                self._page_tokens[page] = tokens

    def reset_prefix_cache(self) -> None:
        for page in list(self._page_to_hash):
            self._evict(page)

    # -- introspection --------------------------------------------------------------------------------------------
    def stats(self) -> PoolStats:
        return PoolStats(
            num_pages=self.num_pages - 1,
            num_free=len(self._free),
            num_cached=sum(1 for p in self._free if p in self._page_to_hash),
            prefix_cache_queries=self._queries,
            prefix_cache_hits=self._hits,
        )

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]

    def all_free(self) -> bool:
        """True when no request holds a page: what every run must end with."""
        return len(self._free) == self.num_pages - 1 and not any(self._ref_counts)
