"""turbo's C++ block manager through the binding: hashes, ref counts, prefix hits, LRU eviction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmkit import _turbo  # in CI the extension is built: a failed import must fail these tests
from lmkit.block_hash import hash_blocks

VECTORS = json.loads((Path(__file__).parents[1] / "data" / "block_hash_vectors.json").read_text())


def test_hash_vectors():
    for v in VECTORS["blocks"]:
        assert _turbo.hash_block(int(v["parent"]), v["tokens"]) == int(v["hash"])
    for v in VECTORS["roots"]:
        assert _turbo.root_hash(v["salt"]) == int(v["hash"])


@pytest.mark.parametrize("chain", VECTORS["chains"], ids=lambda c: f"bs{c['block_size']}")
def test_chain_hashes_match_python(chain):
    bs, tokens = chain["block_size"], chain["tokens"]
    bm = _turbo.BlockManager(64, bs)
    table = _turbo.BlockTable()
    assert bm.allocate(table, len(tokens))
    bm.cache_full_blocks(tokens, len(tokens), table)
    assert table.hashes == [int(h) for h in chain["hashes"]] == hash_blocks(tokens, bs)
    assert bm.check() == ""


def test_allocate_and_ref_counts():
    bm = _turbo.BlockManager(8, 4)
    a = _turbo.BlockTable()
    assert bm.match_prefix(list(range(10)), a) == 0
    assert bm.allocate(a, 10)
    assert len(a.blocks) == 3 and bm.num_blocks_free == 5
    assert all(bm.ref_count(b) == 1 for b in a.blocks)
    assert bm.allocate(a, 12) and len(a.blocks) == 3  # still covered
    assert not bm.allocate(a, 100) and len(a.blocks) == 3  # short: nothing taken
    bm.free(a)
    assert bm.num_blocks_free == 8 and a.blocks == []
    assert bm.check() == ""


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    bm = _turbo.BlockManager(16, 4)
    tokens = list(range(100, 112))  # 3 full blocks
    a = _turbo.BlockTable()
    bm.match_prefix(tokens, a)
    bm.allocate(a, len(tokens))
    bm.cache_full_blocks(tokens, len(tokens), a)
    b = _turbo.BlockTable()
    # 12 tokens: at most (12 - 1) // 4 = 2 blocks may hit (the last token is always computed)
    assert bm.match_prefix(tokens, b) == 8
    assert b.blocks == a.blocks[:2]
    assert [bm.ref_count(x) for x in a.blocks] == [2, 2, 1]
    c = _turbo.BlockTable()
    assert bm.match_prefix(tokens + [1], c) == 12  # a longer prompt hits all three
    d = _turbo.BlockTable()
    assert bm.match_prefix([100, 101, 102, 999, 5, 6], d) == 0  # differs inside the first block
    for t in (a, b, c, d):
        bm.free(t)
    assert bm.num_blocks_free == 16 and bm.num_blocks_cached == 3
    assert bm.check() == ""


def test_salted_root_separates_prefixes():
    bm = _turbo.BlockManager(8, 4)
    tokens = list(range(9))
    a = _turbo.BlockTable()
    a.root = _turbo.root_hash("adapter-a")
    bm.allocate(a, 9)
    bm.cache_full_blocks(tokens, 9, a)
    b = _turbo.BlockTable()
    assert bm.match_prefix(tokens, b) == 0
    c = _turbo.BlockTable()
    c.root = _turbo.root_hash("adapter-a")
    assert bm.match_prefix(tokens, c) == 8


def test_eviction_order_lru_and_uncached_first():
    bm = _turbo.BlockManager(6, 2)
    seqs = []
    for i in range(3):  # three sequences of one full block + one partial block each
        t = _turbo.BlockTable()
        toks = [10 * i, 10 * i + 1, 10 * i + 2]
        bm.allocate(t, 3)
        bm.cache_full_blocks(toks, 3, t)
        seqs.append((t, toks))
    assert bm.num_blocks_free == 0
    cached = [t.blocks[0] for t, _ in seqs]
    partial = [t.blocks[1] for t, _ in seqs]
    for t, _ in seqs:  # freed in order 0, 1, 2
        bm.free(t)
    assert bm.num_blocks_cached == 3
    order = bm.free_order()
    assert set(order[:3]) == set(partial)  # uncached blocks are handed out first
    assert order[3:] == cached  # then cached ones, least recently freed first
    t = _turbo.BlockTable()
    bm.allocate(t, 8)  # 4 blocks: the 3 uncached, then evicts seq 0's cached block
    assert set(t.blocks) == set(partial) | {cached[0]}
    assert bm.num_blocks_cached == 2 and not bm.has_hash(cached[0])
    probe = _turbo.BlockTable()
    assert bm.match_prefix(seqs[0][1], probe) == 0  # evicted
    bm.free(probe)
    probe = _turbo.BlockTable()
    assert bm.match_prefix(seqs[2][1], probe) == 2  # still cached
    assert bm.num_blocks_cached == 1  # the hit took it off the free list
    bm.free(probe)
    bm.free(t)
    assert bm.check() == ""


def test_tail_first_free_keeps_prefix_longest():
    bm = _turbo.BlockManager(4, 2)
    toks = [1, 2, 3, 4, 5, 6, 7, 8]
    t = _turbo.BlockTable()
    bm.allocate(t, 8)
    bm.cache_full_blocks(toks, 8, t)
    blocks = list(t.blocks)
    bm.free(t)
    assert bm.free_order() == blocks[::-1]  # the tail is evicted first; the prefix survives longest


def test_disabled_prefix_caching():
    bm = _turbo.BlockManager(4, 2, False)
    t = _turbo.BlockTable()
    bm.allocate(t, 4)
    bm.cache_full_blocks([1, 2, 3, 4], 4, t)
    bm.free(t)
    assert bm.num_blocks_cached == 0
    assert bm.match_prefix([1, 2, 3, 4, 5], _turbo.BlockTable()) == 0


def test_double_free_is_refused():
    bm = _turbo.BlockManager(4, 2)
    t = _turbo.BlockTable()
    bm.allocate(t, 2)
    bm.free(t)
    assert bm.num_blocks_free == 4
    bm.free(t)  # the table is empty after a free: a no-op
    assert bm.check() == ""
