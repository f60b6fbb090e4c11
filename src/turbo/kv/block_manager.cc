#include "turbo/kv/block_manager.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

namespace turbo {

uint64_t fnv1a(const uint8_t* data, size_t n, uint64_t h) {
  for (size_t i = 0; i < n; ++i) h = (h ^ data[i]) * kFnvPrime;
  return h;
}

uint64_t root_hash(const std::string& salt) {
  if (salt.empty()) return kRootHash;
  return fnv1a(reinterpret_cast<const uint8_t*>(salt.data()), salt.size());
}

uint64_t hash_block(uint64_t parent, const int32_t* tokens, size_t n) {
  uint8_t buf[8];
  for (int i = 0; i < 8; ++i) buf[i] = static_cast<uint8_t>(parent >> (8 * i));
  uint64_t h = fnv1a(buf, 8);
  for (size_t j = 0; j < n; ++j) {
    uint32_t t = static_cast<uint32_t>(tokens[j]);
    uint8_t b[4] = {uint8_t(t), uint8_t(t >> 8), uint8_t(t >> 16), uint8_t(t >> 24)};
    h = fnv1a(b, 4, h);
  }
  return h;
}

BlockManager::BlockManager(int num_blocks, int block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size), enable_prefix_caching_(enable_prefix_caching) {
  if (num_blocks < 1 || block_size < 1) throw std::invalid_argument("num_blocks and block_size must be >= 1");
  blocks_.resize(num_blocks);
  tokens_.assign(static_cast<size_t>(num_blocks) * block_size, 0);
  for (int i = 0; i < num_blocks; ++i) blocks_[i].pos = free_list_.insert(free_list_.end(), i);
}

void BlockManager::take(int b) {
  Block& blk = blocks_[b];
  if (blk.ref_count == 0) {
    free_list_.erase(blk.pos);
    blk.in_free_list = false;
    if (blk.cached) --num_cached_free_;
  }
  ++blk.ref_count;
}

void BlockManager::evict(int b) {
  Block& blk = blocks_[b];
  if (!blk.cached) return;
  auto it = hash_to_block_.find(blk.hash);
  if (it != hash_to_block_.end() && it->second == b) hash_to_block_.erase(it);
  blk.cached = false;
  blk.hash = blk.parent = 0;
  ++num_evictions_;
}

int BlockManager::match_prefix(const int32_t* tokens, int n_tokens, BlockTable& table) {
  if (!table.blocks.empty()) throw std::logic_error("match_prefix needs a table without blocks");
  table.hashes.clear();
  if (!enable_prefix_caching_ || n_tokens < 1) return 0;
  uint64_t parent = table.root;
  const int n_full = (n_tokens - 1) / block_size_;
  for (int i = 0; i < n_full; ++i) {
    const int32_t* t = tokens + static_cast<size_t>(i) * block_size_;
    uint64_t h = hash_block(parent, t, block_size_);
    auto it = hash_to_block_.find(h);
    if (it == hash_to_block_.end()) break;
    int b = it->second;
    if (blocks_[b].parent != parent || std::memcmp(block_tokens(b), t, sizeof(int32_t) * block_size_) != 0) break;
    take(b);
    table.blocks.push_back(b);
    table.hashes.push_back(h);
    parent = h;
    ++num_hits_;
  }
  return static_cast<int>(table.blocks.size()) * block_size_;
}

bool BlockManager::allocate(BlockTable& table, int64_t num_tokens) {
  int need = blocks_needed(num_tokens) - static_cast<int>(table.blocks.size());
  if (need <= 0) return true;
  if (need > num_blocks_free()) return false;
  for (int i = 0; i < need; ++i) {
    int b = free_list_.front();
    free_list_.pop_front();
    Block& blk = blocks_[b];
    blk.in_free_list = false;
    if (blk.cached) --num_cached_free_;
    evict(b);
    blk.ref_count = 1;
    table.blocks.push_back(b);
  }
  return true;
}

void BlockManager::cache_full_blocks(const int32_t* tokens, int64_t num_computed, BlockTable& table) {
  if (!enable_prefix_caching_) return;
  const int64_t n_full = std::min<int64_t>(num_computed / block_size_, table.blocks.size());
  for (int64_t i = static_cast<int64_t>(table.hashes.size()); i < n_full; ++i) {
    uint64_t parent = table.hashes.empty() ? table.root : table.hashes.back();
    const int32_t* t = tokens + i * block_size_;
    uint64_t h = hash_block(parent, t, block_size_);
    table.hashes.push_back(h);
    if (hash_to_block_.count(h)) continue;  // identical content already cached (or a collision): keep the first
    int b = table.blocks[i];
    Block& blk = blocks_[b];
    if (blk.cached) continue;  // a shared prefix block, registered under its own hash
    blk.cached = true;
    blk.hash = h;
    blk.parent = parent;
    std::memcpy(&tokens_[static_cast<size_t>(b) * block_size_], t, sizeof(int32_t) * block_size_);
    hash_to_block_[h] = b;
  }
}

void BlockManager::free(BlockTable& table) {
  for (auto it = table.blocks.rbegin(); it != table.blocks.rend(); ++it) {
    int b = *it;
    Block& blk = blocks_[b];
    if (blk.ref_count <= 0) throw std::logic_error("block " + std::to_string(b) + " freed twice");
    if (--blk.ref_count == 0) {
      blk.in_free_list = true;
      if (blk.cached) {
        blk.pos = free_list_.insert(free_list_.end(), b);
        ++num_cached_free_;
      } else {
        blk.pos = free_list_.insert(free_list_.begin(), b);
      }
    }
  }
  table.blocks.clear();
  table.hashes.clear();
}

std::string BlockManager::check() const {
  std::ostringstream err;
  int n_free = 0, n_cached_free = 0;
  for (int b = 0; b < num_blocks_; ++b) {
    const Block& blk = blocks_[b];
    if (blk.ref_count < 0) err << "block " << b << " has a negative ref count; ";
    if ((blk.ref_count == 0) != blk.in_free_list) err << "block " << b << " free-list membership wrong; ";
    if (blk.in_free_list) {
      ++n_free;
      if (blk.cached) ++n_cached_free;
    }
    if (blk.cached) {
      auto it = hash_to_block_.find(blk.hash);
      if (it == hash_to_block_.end() || it->second != b) err << "cached block " << b << " not in the hash map; ";
    }
  }
  if (n_free != static_cast<int>(free_list_.size())) err << "free list size mismatch; ";
  if (n_cached_free != num_cached_free_) err << "cached free count mismatch; ";
  for (auto& [h, b] : hash_to_block_)
    if (!blocks_[b].cached || blocks_[b].hash != h) err << "hash map entry of block " << b << " stale; ";
  return err.str();
}

}  // namespace turbo
