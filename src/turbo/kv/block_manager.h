// Blocked KV-cache bookkeeping: fixed blocks of block_size tokens, reference counts, a free list, and
// automatic prefix caching keyed by chained block hashes. Pure C++ (no torch, no CUDA): it hands out block
// ids; the KV storage itself lives in kv_cache.h.
//
// Block hash (identical to lmkit/block_hash.py, checked against tests/data/block_hash_vectors.json):
//   hash(block_i) = FNV-1a-64( le64(hash(block_{i-1})) ++ le32(t_0) ++ ... ++ le32(t_{bs-1}) ),
//   hash(block_{-1}) = root (0, or FNV-1a-64 of a salt).
// A hit also compares the block's tokens and parent hash, so a collision costs a miss, never wrong output.
//
// Free list order: [uncached free blocks ... | cached blocks, least recently freed ... most recently freed].
// Allocation takes from the front, so blocks without reusable content go first and cached blocks are
// evicted in LRU order. Blocks of a freed sequence are released tail first, so that a prefix outlives
// the blocks that extend it.
#pragma once

#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <vector>

namespace turbo {

constexpr uint64_t kFnvOffset = 0xCBF29CE484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001B3ULL;
constexpr uint64_t kRootHash = 0;

uint64_t fnv1a(const uint8_t* data, size_t n, uint64_t h = kFnvOffset);
uint64_t root_hash(const std::string& salt);
uint64_t hash_block(uint64_t parent, const int32_t* tokens, size_t n);

// What a sequence holds of the pool. Owned by the sequence; only the BlockManager mutates it.
struct BlockTable {
  std::vector<int32_t> blocks;   // block ids, in token order
  std::vector<uint64_t> hashes;  // chained hashes of the full blocks registered so far (prefix of blocks)
  uint64_t root = kRootHash;
};

class BlockManager {
 public:
  BlockManager(int num_blocks, int block_size, bool enable_prefix_caching);

  int num_blocks_total() const { return num_blocks_; }
  int num_blocks_free() const { return static_cast<int>(free_list_.size()); }  // cached-but-unreferenced count
  int num_blocks_cached() const { return num_cached_free_; }
  int block_size() const { return block_size_; }
  bool prefix_caching() const { return enable_prefix_caching_; }
  int blocks_needed(int64_t num_tokens) const {
    return static_cast<int>((num_tokens + block_size_ - 1) / block_size_);
  }

  // For a table that holds no blocks: take the longest cached prefix of `tokens`, at most
  // (n_tokens - 1) / block_size blocks (the last token is always computed). Returns the tokens hit.
  int match_prefix(const int32_t* tokens, int n_tokens, BlockTable& table);
  // Grow the table to cover num_tokens tokens; false (and nothing taken) when the pool is short.
  bool allocate(BlockTable& table, int64_t num_tokens);
  // Register the full blocks among the first num_computed tokens that are not registered yet.
  void cache_full_blocks(const int32_t* tokens, int64_t num_computed, BlockTable& table);
  // Drop the table's references (tail first) and clear it.
  void free(BlockTable& table);

  // Introspection (tests, stats).
  int ref_count(int block) const { return blocks_.at(block).ref_count; }
  bool has_hash(int block) const { return blocks_.at(block).cached; }
  uint64_t block_hash(int block) const { return blocks_.at(block).hash; }
  std::vector<int> free_order() const { return {free_list_.begin(), free_list_.end()}; }
  int64_t num_hits() const { return num_hits_; }
  int64_t num_evictions() const { return num_evictions_; }
  // Check every invariant; returns "" when consistent, else a description (tests, debug builds).
  std::string check() const;

 private:
  struct Block {
    int ref_count = 0;
    bool cached = false;  // holds registered prefix content (hash, parent, tokens valid)
    bool in_free_list = true;
    uint64_t hash = 0;
    uint64_t parent = 0;
    std::list<int>::iterator pos;
  };
  void take(int block);
  void evict(int block);
  const int32_t* block_tokens(int block) const { return &tokens_[static_cast<size_t>(block) * block_size_]; }

  int num_blocks_;
  int block_size_;
  bool enable_prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<int32_t> tokens_;  // the tokens of each cached block, for the check on a hit
  std::list<int> free_list_;
  int num_cached_free_ = 0;
  std::unordered_map<uint64_t, int> hash_to_block_;
  int64_t num_hits_ = 0;
  int64_t num_evictions_ = 0;
};

}  // namespace turbo
