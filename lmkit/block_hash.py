"""The prefix-cache block hash shared by both engines (turbo re-implements it in C++; same test vectors).

A full KV block is identified by the chain of its tokens from the start of the sequence:

    hash(block_i) = FNV-1a-64( le64(hash(block_{i-1})) ++ le32(t_0) ++ le32(t_1) ++ ... )

with hash(block_{-1}) = ROOT_HASH, or `root_hash(salt)` when blocks must not be shared across something
(a LoRA adapter, say). Token ids are written as unsigned 32-bit little-endian. The engine still compares a
block's tokens on a hit, so a collision can cost a cache miss but never corrupt output.
"""

from __future__ import annotations

from collections.abc import Sequence

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = 0xFFFFFFFFFFFFFFFF
ROOT_HASH = 0


def _fnv1a(data: bytes, h: int = FNV_OFFSET) -> int:
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def root_hash(salt: str = "") -> int:
    """The parent hash of a sequence's first block; ROOT_HASH when there is no salt."""
    return ROOT_HASH if not salt else _fnv1a(salt.encode())


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block (parent_hash is the previous block's hash or a root hash)."""
    data = bytearray((parent_hash & MASK64).to_bytes(8, "little"))
    for t in token_ids:
        data += (t & 0xFFFFFFFF).to_bytes(4, "little")
    return _fnv1a(bytes(data))


def hash_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of `token_ids` (a trailing partial block has none)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes
