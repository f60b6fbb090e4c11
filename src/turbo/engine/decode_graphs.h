// Decode steps replayed as CUDA graphs, one graph per batch bucket (nano-vllm's scheme). No CUDA headers here,
// so the engine can hold one; decode_graphs.cu is built only with TURBO_WITH_CUDA (CMakeLists.txt adds it to
// the CUDA sources).
//
// A decode batch of S sequences (every q_len 1, every row sampled) runs in the smallest bucket B >= S. Static
// device inputs, sized for the largest bucket, are views whose addresses the graphs captured:
//
//   idx [5 * B] int64:         token_ids | positions | slot_mapping | sample_rows | order
//                              (rows S..B-1: 0 | 0 | -1 | r | 0)
//   i32 [B * W + B + 1] int32: block_tables [B, W] | kv_lens [B] | split hint [1]   (rows S..B-1: 0 | 0)
//
// W = the engine's most blocks per sequence, so one graph serves every context length; padding rows write no
// KV (slot -1) and attend to nothing (kv_len 0). The graph's rows are the batch's, longest context first
// (order[r]: the batch row in graph row r); sample_rows puts the logits back in the batch's order. With the split
// hint (decode_min_split_tokens of the step's total context), the decode attention keeps contexts whole when the
// batch fills the GPU without splits, though a graph's split count is fixed for the longest context W allows.
// Each step: two host->device copies, one replay, and the logits land in one shared buffer [max_bs, vocab]. The
// graphs share one memory pool: they never run concurrently.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>

#include "turbo/kv/kv_cache.h"
#include "turbo/models/llama.h"

namespace turbo::cuda {

class DecodeGraphs {
 public:
  // model and kv must outlive this object. max_num_seqs: the largest bucket; max_blocks_per_seq: W.
  DecodeGraphs(const LlamaModel& model, KVCache& kv, int64_t max_num_seqs, int64_t max_blocks_per_seq);
  ~DecodeGraphs();
  DecodeGraphs(const DecodeGraphs&) = delete;
  DecodeGraphs& operator=(const DecodeGraphs&) = delete;

  // Whether `batch` can replay a graph: decode-only, every row sampled, at most max_num_seqs rows and W blocks.
  bool accepts(const ForwardBatch& batch) const;
  // Logits [S, vocab] of the batch (its tensors on the host, pinned for asynchronous copies, or on the device),
  // captured on first use of its bucket. The result is a view that the next run overwrites. device_token_ids
  // (int64 [S] on the device, optional) replace the batch's token ids: the previous step's tokens, never read back.
  at::Tensor run(const ForwardBatch& batch, const at::Tensor& device_token_ids = {});
  // Captures every bucket's graph now, largest first (smaller ones then reuse its pool memory).
  void capture_all();
  int64_t num_graphs() const;
  int64_t bucket(int64_t num_seqs) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace turbo::cuda
