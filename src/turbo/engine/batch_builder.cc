#include "turbo/engine/batch_builder.h"

#include <algorithm>

namespace turbo {
namespace {

// Host tensors, pinned for a GPU model so that the copies below do not block the loop thread.
struct HostAlloc {
  bool pin;
  at::Tensor operator()(at::IntArrayRef sizes, at::ScalarType dt) const {
    return at::empty(sizes, at::TensorOptions().dtype(dt).pinned_memory(pin));
  }
};

}  // namespace

ForwardBatch to_device(const ForwardBatch& host, at::Device device) {
  ForwardBatch fb = host;
  if (device.is_cpu()) return fb;
  for (at::Tensor* t : {&fb.token_ids, &fb.positions, &fb.slot_mapping, &fb.block_tables, &fb.cu_q_lens, &fb.kv_lens,
                        &fb.sample_rows})
    *t = t->to(device, /*non_blocking=*/true);
  return fb;
}

ForwardBatch build_forward_batch(const ScheduledBatch& batch, int block_size, bool pinned,
                                 std::vector<int>& sample_seq) {
  const int64_t S = static_cast<int64_t>(batch.seqs.size());
  const int64_t BS = block_size;
  int64_t T = 0, max_blocks = 1, max_q = 1;
  for (int64_t i = 0; i < S; ++i) {
    T += batch.num_new_tokens[i];
    max_q = std::max<int64_t>(max_q, batch.num_new_tokens[i]);
    max_blocks = std::max<int64_t>(max_blocks, batch.seqs[i]->table.blocks.size());
  }
  const HostAlloc host{pinned};
  ForwardBatch fb;
  fb.max_query_len = max_q;
  fb.is_decode = max_q == 1;
  fb.token_ids = host({T}, at::kLong);
  fb.positions = host({T}, at::kLong);
  fb.slot_mapping = host({T}, at::kLong);
  fb.block_tables = host({S, max_blocks}, at::kInt).zero_();
  fb.cu_q_lens = host({S + 1}, at::kInt);
  fb.kv_lens = host({S}, at::kInt);
  int64_t* tok = fb.token_ids.data_ptr<int64_t>();
  int64_t* pos = fb.positions.data_ptr<int64_t>();
  int64_t* slot = fb.slot_mapping.data_ptr<int64_t>();
  int32_t* bt = fb.block_tables.data_ptr<int32_t>();
  int32_t* cu = fb.cu_q_lens.data_ptr<int32_t>();
  int32_t* kvl = fb.kv_lens.data_ptr<int32_t>();
  std::vector<int64_t> rows;
  int64_t r = 0;
  cu[0] = 0;
  fb.num_decodes = 0;
  while (fb.num_decodes < S && batch.num_new_tokens[fb.num_decodes] == 1) ++fb.num_decodes;
  for (int64_t i = 0; i < S; ++i) {
    const Sequence& seq = *batch.seqs[i];
    const int64_t start = seq.num_computed_tokens, n = batch.num_new_tokens[i];
    for (int64_t j = 0; j < n; ++j, ++r) {
      const int64_t p = start + j;
      tok[r] = seq.tokens[p];
      pos[r] = p;
      slot[r] = static_cast<int64_t>(seq.table.blocks[p / BS]) * BS + p % BS;
    }
    std::copy(seq.table.blocks.begin(), seq.table.blocks.end(), bt + i * max_blocks);
    cu[i + 1] = static_cast<int32_t>(r);
    kvl[i] = static_cast<int32_t>(start + n);
    if (batch.samples(i)) {
      rows.push_back(r - 1);
      sample_seq.push_back(static_cast<int>(i));
    }
  }
  fb.sample_rows = host({static_cast<int64_t>(rows.size())}, at::kLong);
  std::copy(rows.begin(), rows.end(), fb.sample_rows.data_ptr<int64_t>());
  return fb;
}

}  // namespace turbo
