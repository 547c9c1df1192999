"""serve/kv_pages.py: allocation, reference counts, prefix cache and LRU eviction."""

from serve.core.kv_pages import PagePool


def test_allocate_release_never_hands_out_page_zero():
    pool = PagePool(5, 4)
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and pool.allocate(1) is None
    pool.release(pages)
    assert pool.available() == 4 and pool.stats().used == 0


def test_prefix_sharing_and_lru_eviction():
    pool = PagePool(6, 4)
    tokens = list(range(13))  # 3 full pages + 1 token
    a = pool.allocate(4)
    pool.register(tokens, a, 13)
    shared = pool.match_prefix(tokens)
    assert shared == a[:3]  # the last token is always left to compute
    assert pool.stats().prefix_hit_tokens == 12
    assert pool.match_prefix(list(range(5)) + [99] * 8) == a[:1]
    pool.release(a[:1])
    pool.release(shared)
    pool.release(a)  # a[3] goes to the free list, a[0..2] stay cached
    st = pool.stats()
    assert st.used == 0 and st.cached == 3 and pool.available() == 5
    fresh = pool.allocate(5)  # evicts the cached prefix pages
    assert fresh is not None and pool.stats().cached == 0
    pool.release(fresh)
    assert pool.match_prefix(tokens) == []


def test_no_prefix_caching():
    pool = PagePool(4, 2, prefix_caching=False)
    p = pool.allocate(2)
    pool.register([1, 2, 3, 4, 5], p, 4)
    assert pool.match_prefix([1, 2, 3, 4, 5]) == []
