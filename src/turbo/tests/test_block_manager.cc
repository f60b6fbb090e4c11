// CTest unit test of the block manager (pure C++): ctest --test-dir build/<dir>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "turbo/kv/block_manager.h"

using namespace turbo;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

int main() {
  // Hash vectors (also in tests/data/block_hash_vectors.json).
  CHECK(hash_block(0, nullptr, 0) == 12161962213042174405ULL);
  const int32_t t4[] = {1, 2, 3, 4};
  CHECK(hash_block(0, t4, 4) == 9112394090187407297ULL);

  BlockManager bm(8, 4, true);
  std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  BlockTable a;
  CHECK(bm.match_prefix(tokens.data(), 10, a) == 0);
  CHECK(bm.allocate(a, 10));
  CHECK(a.blocks.size() == 3 && bm.num_blocks_free() == 5);
  bm.cache_full_blocks(tokens.data(), 10, a);
  CHECK(a.hashes.size() == 2);
  BlockTable b;
  CHECK(bm.match_prefix(tokens.data(), 10, b) == 8);
  CHECK(bm.ref_count(a.blocks[0]) == 2 && bm.ref_count(a.blocks[2]) == 1);
  bm.free(a);
  bm.free(b);
  CHECK(bm.num_blocks_free() == 8 && bm.num_blocks_cached() == 2);
  CHECK(bm.check().empty());
  BlockTable c;
  CHECK(!bm.allocate(c, 100));
  CHECK(c.blocks.empty());
  CHECK(bm.allocate(c, 32));
  CHECK(bm.num_blocks_free() == 0 && bm.num_blocks_cached() == 0);
  bm.free(c);
  CHECK(bm.check().empty());
  std::puts("block manager: ok");
  return 0;
}
