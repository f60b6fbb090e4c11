// KV storage: per layer K and V of [num_blocks, block_size, num_kv_heads, head_dim]. A block id from the
// BlockManager indexes dim 0 of every layer; token slot = block_id * block_size + offset.
// `quant` leaves room for int8/int4 KV (quant_policy 8/4): the caches then hold int8 (int4 packed in pairs)
// with per-(token, head) scales in k_scale/v_scale. Only kNone is implemented.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace turbo {

enum class KVQuant : int { kNone = 0, kInt8 = 8, kInt4 = 4 };

struct KVCache {
  int num_blocks = 0;
  int block_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  KVQuant quant = KVQuant::kNone;
  std::vector<at::Tensor> k, v;              // per layer
  std::vector<at::Tensor> k_scale, v_scale;  // per layer, quantized caches only

  KVCache() = default;
  KVCache(int layers, int num_blocks_, int block_size_, int kv_heads, int head_dim_, at::TensorOptions opts)
      : num_blocks(num_blocks_), block_size(block_size_), num_kv_heads(kv_heads), head_dim(head_dim_) {
    for (int i = 0; i < layers; ++i) {
      // Uninitialized on purpose: attention reads only slots that were written.
      k.push_back(at::empty({num_blocks, block_size, kv_heads, head_dim}, opts));
      v.push_back(at::empty({num_blocks, block_size, kv_heads, head_dim}, opts));
    }
  }
  static int64_t bytes_per_block(int layers, int block_size, int kv_heads, int head_dim, int elem_bytes) {
    return 2LL * layers * block_size * kv_heads * head_dim * elem_bytes;
  }
};

}  // namespace turbo
