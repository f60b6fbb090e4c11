"""BlockManager: allocation, ref counts, prefix hits, the token check on hash hits, LRU reuse."""

from __future__ import annotations

from lmkit.pytorch_engine import block_manager as bm_module
from lmkit.pytorch_engine.block_manager import BlockManager
from lmkit.pytorch_engine.sequence import Sequence

BS = 4


def cached_free(bm: BlockManager) -> int:
    return sum(1 for i in bm.free_block_ids if bm.blocks[i].hash is not None)


def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """Admit seq as the scheduler does, with its whole prompt computed and its full blocks cached."""
    bm.match_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = len(seq)
    bm.cache_full_blocks(seq)
    return seq


def test_allocate_and_free_restore_counts():
    bm = BlockManager(8, BS)
    a = Sequence("a", list(range(10)))
    assert bm.allocate_slots(a, 10)
    assert len(a.block_table) == 3 and bm.num_blocks_free == 5 and bm.num_blocks_used == 3
    a.num_computed_tokens = 10
    assert bm.allocate_slots(a, 2)  # 12 tokens still fit in 3 blocks
    assert len(a.block_table) == 3
    assert bm.allocate_slots(a, 3)  # 13 need a 4th
    assert len(a.block_table) == 4
    b = Sequence("b", list(range(100, 120)))
    assert not bm.allocate_slots(b, 20)  # 5 blocks needed, 4 free: nothing taken
    assert b.block_table == [] and bm.num_blocks_free == 4
    bm.free(a)
    assert bm.num_blocks_free == 8 and a.block_table == [] and a.num_computed_tokens == 0
    assert all(blk.ref_count == 0 for blk in bm.blocks)


def test_prefix_hit_shares_blocks_and_ref_counts():
    bm = BlockManager(16, BS)
    prefix = list(range(1, 9))  # two full blocks
    a = computed(bm, Sequence("a", prefix + [50, 51, 52]))
    b = Sequence("b", prefix + [60])
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    assert bm.allocate_slots(b, 1)
    assert b.block_table[2] != a.block_table[2]
    # The last token is always computed: a prompt that is exactly cached blocks hits one block less.
    c = Sequence("c", prefix)
    assert bm.match_prefix(c) == 4
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_blocks_free == 16
    assert bm.num_blocks_cached == 2  # a's two full prompt blocks (a's third block held 3 tokens)
    # Cached-but-free blocks are found again after everyone let go.
    d = Sequence("d", prefix + [70])
    assert bm.match_prefix(d) == 8 and bm.num_blocks_cached == cached_free(bm) == 0


def test_prefix_chain_depends_on_earlier_blocks():
    bm = BlockManager(16, BS)
    computed(bm, Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = Sequence("b", [9, 9, 9, 9, 5, 6, 7, 8, 9])  # same second block, different first block
    assert bm.match_prefix(other) == 0


def test_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(16, BS)
    a = computed(bm, Sequence("a", [1, 2, 3, 4, 0]))
    assert bm.hash_to_block_id == {42: a.block_table[0]}
    b = Sequence("b", [5, 6, 7, 8, 0])
    assert bm.match_prefix(b) == 0 and b.block_table == []
    same = Sequence("c", [1, 2, 3, 4, 0])
    assert bm.match_prefix(same) == 4  # the genuine content still hits


def test_lru_reuse_order():
    bm = BlockManager(4, BS)
    a = computed(bm, Sequence("a", [1, 2, 3, 4, 0]))  # one cached full block + one partial block
    b = computed(bm, Sequence("b", [5, 6, 7, 8, 0]))
    a_full, b_full = a.block_table[0], b.block_table[0]
    bm.free(a)  # a's full block is now the least recently used cached block
    bm.free(b)
    assert bm.num_blocks_free == 4 and bm.num_blocks_cached == 2
    # Uncached free blocks go first, then cached ones in LRU order.
    c = Sequence("c", list(range(100, 112)))
    assert bm.allocate_slots(c, 8)
    assert bm.num_blocks_cached == 2 and a_full not in c.block_table and b_full not in c.block_table
    assert bm.allocate_slots(c, 12)
    assert c.block_table[2] == a_full and bm.num_blocks_cached == 1
    assert bm.match_prefix(Sequence("a2", [1, 2, 3, 4, 0])) == 0  # evicted
    assert bm.match_prefix(Sequence("b2", [5, 6, 7, 8, 0])) == 4  # still cached
    assert bm.num_blocks_cached == cached_free(bm) == 0


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    computed(bm, Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    assert bm.match_prefix(Sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 0])) == 0
    assert bm.hash_to_block_id == {}
