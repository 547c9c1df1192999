"""A fixed pool of KV-cache pages with reference counts and a prefix cache.

Page 0 is never handed out: the exported program writes padding there. Full pages can be shared
between sequences whose token prefixes are equal: each full page is named by a hash chain over the
page-sized token blocks up to it; a page whose last user leaves stays cached (LRU) until its memory
is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class PoolStats:
    total: int  # pages usable by sequences (page 0 excluded)
    used: int  # referenced by at least one sequence
    cached: int  # unreferenced but holding a reusable prefix
    prefix_hit_tokens: int
    prefix_queries: int
    prefix_hits: int


class PagePool:
    def __init__(self, page_count: int, page_size: int, prefix_caching: bool = True):
        if page_count < 2:
            raise ValueError("the KV pool needs at least 2 pages (page 0 is the padding page)")
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.total = page_count - 1
        self._free = list(range(page_count - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * page_count
        self._hash_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages nobody references
        self.prefix_hit_tokens = self.prefix_queries = self.prefix_hits = 0

    # -- allocation
    def available(self) -> int:
        return len(self._free) + len(self._lru)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (evicting unreferenced cached prefixes if needed), or None if there aren't n."""
        if n > self.available():
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._lru.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            assert self._refs[page] >= 0, f"page {page} released twice"
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    # -- prefix cache
    def _chain(self, tokens: list[int], n_pages: int) -> list[bytes]:
        hashes, prev = [], b""
        for i in range(n_pages):
            block = tokens[i * self.page_size : (i + 1) * self.page_size]
            prev = hashlib.blake2b(prev + b"|" + ",".join(map(str, block)).encode(), digest_size=16).digest()
            hashes.append(prev)
        return hashes

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Pages already holding the longest cached full-page prefix of `tokens` (now referenced).

        At least one token is always left out, so the caller still computes the last position's logits.
        """
        if not self.prefix_caching:
            return []
        self.prefix_queries += 1
        pages = []
        for h in self._chain(tokens, (len(tokens) - 1) // self.page_size):
            page = self._page_of.get(h)
            if page is None:
                break
            if self._refs[page] == 0:
                self._lru.pop(page, None)
            self._refs[page] += 1
            pages.append(page)
        if pages:
            self.prefix_hits += 1
            self.prefix_hit_tokens += len(pages) * self.page_size
        return pages

    def register(self, tokens: list[int], pages: list[int], n_computed: int) -> None:
        """Publish the full pages among the first `n_computed` tokens (their KV is in the cache)."""
        if not self.prefix_caching:
            return
        for h, page in zip(self._chain(tokens, n_computed // self.page_size), pages):
            if page in self._hash_of:
                continue
            if h in self._page_of:  # another sequence published the same block first
                continue
            self._hash_of[page] = h
            self._page_of[h] = page

    def stats(self) -> PoolStats:
        return PoolStats(
            self.total,
            self.total - len(self._free) - len(self._lru),
            len(self._lru),
            self.prefix_hit_tokens,
            self.prefix_queries,
            self.prefix_hits,
        )
