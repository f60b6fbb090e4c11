// Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2 with qkv bias, Qwen3 with qk norm) over the blocked
// KV cache. Weights arrive fused (qkv, gate_up) in turbo's own names (lmkit/turbo/weights.py).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "turbo/kernels/kernels.h"
#include "turbo/kv/kv_cache.h"
#include "turbo/models/linear.h"

namespace turbo {

struct ModelConfig {
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 4096;
  double rms_norm_eps = 1e-6;
  bool qkv_bias = false;
  bool qk_norm = false;
  int sliding_window = 0;  // 0 = global attention
};

// One step's flattened batch: T tokens of S sequences.
struct ForwardBatch {
  at::Tensor token_ids;     // int64 [T]
  at::Tensor positions;     // int64 [T]
  at::Tensor slot_mapping;  // int64 [T]
  at::Tensor block_tables;  // int32 [S, max_blocks]
  at::Tensor cu_q_lens;     // int32 [S + 1]
  at::Tensor kv_lens;       // int32 [S]
  at::Tensor sample_rows;   // int64 [n]: rows of T whose logits are wanted
  // int32 [1] on the GPU, or undefined: the decode kernel's split hint (DecodeGraphs sets it per step).
  at::Tensor min_split_tokens;
  // Host facts of the batch (kernel choice without a device->host sync).
  int64_t max_query_len = 1;  // the longest q_len of the batch
  bool is_decode = false;     // every q_len == 1
  int64_t num_decodes = 0;    // leading sequences with q_len == 1 (the scheduler puts decodes first)
};

using WeightMap = std::unordered_map<std::string, at::Tensor>;

class LlamaModel {
 public:
  // weights: embed, norm, lm_head, rope.cos, rope.sin, layers.{i}.{input_norm, qkv, qkv_bias?, q_norm?, k_norm?,
  //          o, post_norm, gate_up, down}. All on one device in one dtype (the embedding's: float32 on CPU;
  //          float32, float16 or bfloat16 on CUDA), except the rope tables (float32).
  LlamaModel(const ModelConfig& cfg, const WeightMap& weights);
  // Runs the batch, writes its KV into `kv`, returns logits [n, vocab] of batch.sample_rows.
  at::Tensor forward(const ForwardBatch& batch, KVCache& kv) const;
  const ModelConfig& config() const { return cfg_; }
  // Device and dtype of the weights (the KV cache and the step's inputs follow them).
  at::TensorOptions options() const { return embed_.options(); }

 private:
  struct Layer {
    at::Tensor input_norm, post_norm, q_norm, k_norm;
    std::unique_ptr<Linear> qkv, o, gate_up, down;
  };
  ModelConfig cfg_;
  at::Tensor embed_, norm_;
  kernels::RopeTables rope_;
  std::unique_ptr<Linear> lm_head_;
  std::vector<Layer> layers_;
};

}  // namespace turbo
