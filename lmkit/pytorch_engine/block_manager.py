"""Paged KV block bookkeeping: ref counts, a free list in LRU order, automatic prefix caching.

Never touches a tensor: a block is an id into the KV cache tensors that the model runner owns.

Prefix caching: a full block is registered under the chained hash of its tokens (lmkit/block_hash.py);
a new sequence takes the longest run of registered blocks that match its prompt. A hash hit must also
match the block's parent hash and its tokens, so a hash collision costs a miss, never wrong output.
Freed blocks keep their content and stay findable until the free list hands them out again:

    free list:  [uncached ... | cached, least recently freed ... most recently freed]
                 ^ allocation pops from here
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmkit.block_hash import ROOT_HASH, hash_block
from lmkit.pytorch_engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    """Set while the block is registered in the prefix cache."""
    parent_hash: int = ROOT_HASH
    token_ids: tuple[int, ...] = ()


class BlockManager:
    """Hands out KV blocks to sequences and keeps a prefix cache of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self._num_cached_free = 0  # a counter, so stats() from another thread never iterates the free list

    # ---- counts ----
    @property
    def num_blocks_total(self) -> int:
        return len(self.blocks)

    @property
    def num_blocks_free(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_blocks_used(self) -> int:
        return self.num_blocks_total - self.num_blocks_free

    @property
    def num_blocks_cached(self) -> int:
        """Free blocks that still hold registered prefix content."""
        return self._num_cached_free

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation ----
    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence without blocks the longest cached prefix of its tokens; returns the tokens hit.

        At most len(seq) - 1 tokens are served from cache: the last one is always computed so the step
        has logits to sample from.
        """
        assert not seq.block_table, "match_prefix is for a sequence that holds no blocks"
        seq.num_computed_tokens = 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent = ROOT_HASH
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent_hash != parent:
                break  # a hash collision: treat as a miss
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make block_table cover num_computed_tokens + num_new_tokens; False (nothing taken) if short."""
        need = self.num_blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self.free_block_ids):
            return False
        for _ in range(need):
            block_id, _ = self.free_block_ids.popitem(last=False)
            self._evict(self.blocks[block_id])
            self.blocks[block_id].ref_count = 1
            seq.block_table.append(block_id)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that num_computed_tokens has filled since the last call."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            seq.block_hashes.append(h)
            if h in self.hash_to_block_id:
                continue  # identical content already cached (or a collision): keep the first copy
            block = self.blocks[seq.block_table[i]]
            block.hash, block.parent_hash, block.token_ids = h, parent, tokens
            self.hash_to_block_id[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; it keeps its tokens but no KV (num_computed_tokens = 0)."""
        # Tail blocks first, so that under LRU a prefix outlives the blocks that extend it.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash is None:  # nothing worth keeping: hand it out before cached blocks
                    self.free_block_ids.move_to_end(block_id, last=False)
                else:
                    self._num_cached_free += 1
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    # ---- internals ----
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
            self._num_cached_free -= 1  # only registered blocks are found by hash
        block.ref_count += 1

    def _evict(self, block: Block) -> None:
        """Drop the prefix-cache content of a block just taken from the free list."""
        if block.hash is not None:
            self._num_cached_free -= 1
            if self.hash_to_block_id.get(block.hash) == block.block_id:
                del self.hash_to_block_id[block.hash]
            block.hash, block.parent_hash, block.token_ids = None, ROOT_HASH, ()
