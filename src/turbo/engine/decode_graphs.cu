// Decode CUDA graphs per batch bucket: capture on first use, replay with the step's inputs copied into static
// buffers. Host code only; a .cu so that nvcc supplies the CUDA include paths that ATen/cuda needs.
#include "turbo/engine/decode_graphs.h"

#include "turbo/kernels/cuda/cuda_kernels.h"

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <numeric>
#include <string>
#include <vector>

namespace turbo::cuda {

struct DecodeGraphs::Impl {
  Impl(const LlamaModel& m, KVCache& k, c10::cuda::CUDAStream s) : model(m), kv(k), stream(s) {}

  const LlamaModel& model;
  KVCache& kv;
  c10::cuda::CUDAStream stream;  // warm-up and capture (a graph cannot be captured on the default stream)
  int64_t max_bs = 0, width = 0;
  std::vector<int64_t> buckets;              // 1, 2, 4, 8, 16, 24, ..., max_bs
  at::Tensor idx, i32, cu, logits;           // static device buffers (layout in the header)
  decltype(at::cuda::graph_pool_handle()) pool;
  std::map<int64_t, std::unique_ptr<at::cuda::CUDAGraph>> graphs;

  // The static inputs of bucket B as a ForwardBatch (every view's address is fixed for the graph's life).
  ForwardBatch views(int64_t B) const {
    ForwardBatch fb;
    fb.token_ids = idx.narrow(0, 0, B);
    fb.positions = idx.narrow(0, B, B);
    fb.slot_mapping = idx.narrow(0, 2 * B, B);
    fb.sample_rows = idx.narrow(0, 3 * B, B);
    fb.block_tables = i32.narrow(0, 0, B * width).view({B, width});
    fb.kv_lens = i32.narrow(0, B * width, B);
    fb.min_split_tokens = i32.narrow(0, B * width + B, 1);
    fb.cu_q_lens = cu.narrow(0, 0, B + 1);
    fb.max_query_len = 1;
    fb.is_decode = true;
    fb.num_decodes = B;
    return fb;
  }

  // Copies the batch, padded to B rows, into the static inputs: one pinned staging buffer per dtype, two copies.
  // The graph's rows are the batch's sorted by context, longest first (TURBO_DECODE_SORT=0: in batch order), so
  // the decode attention's CTAs of the longest contexts start first and the short ones fill in behind them; the
  // sampled rows gather the logits back into the batch's order, and order[] gathers device token ids the same way.
  void load(const ForwardBatch& batch, int64_t B) {
    static const bool sort_rows = [] {
      const char* env = std::getenv("TURBO_DECODE_SORT");
      return env == nullptr || std::string(env) != "0";
    }();
    const int64_t S = batch.token_ids.size(0);
    const auto pinned = at::TensorOptions().pinned_memory(true);
    at::Tensor h64 = at::empty({5 * B}, pinned.dtype(at::kLong));
    at::Tensor h32 = at::zeros({B * width + B + 1}, pinned.dtype(at::kInt));
    const at::Tensor tok = batch.token_ids.cpu().to(at::kLong), pos = batch.positions.cpu().to(at::kLong);
    const at::Tensor slot = batch.slot_mapping.cpu().to(at::kLong), sr = batch.sample_rows.cpu().to(at::kLong);
    const at::Tensor bt = batch.block_tables.cpu().contiguous(), kvl = batch.kv_lens.cpu().contiguous();
    const int32_t* lens = kvl.data_ptr<int32_t>();
    std::vector<int64_t> order(S), where(S);  // graph row r holds batch row order[r]; batch row i is where[i]
    std::iota(order.begin(), order.end(), 0);
    if (sort_rows)
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
    for (int64_t r = 0; r < S; ++r) where[order[r]] = r;
    int64_t* p = h64.data_ptr<int64_t>();
    int32_t* q = h32.data_ptr<int32_t>();
    const int64_t w = bt.size(1);
    for (int64_t r = 0; r < S; ++r) {
      const int64_t i = order[r];
      p[r] = tok.data_ptr<int64_t>()[i];
      p[B + r] = pos.data_ptr<int64_t>()[i];
      p[2 * B + r] = slot.data_ptr<int64_t>()[i];
      p[3 * B + r] = where[sr.data_ptr<int64_t>()[r]];
      p[4 * B + r] = i;
      std::copy_n(bt.data_ptr<int32_t>() + i * w, w, q + r * width);
      q[B * width + r] = lens[i];  // padding rows: kv_len 0, no attention
    }
    for (int64_t r = S; r < B; ++r) {
      p[r] = p[B + r] = 0;
      p[2 * B + r] = -1;  // padding rows write no KV
      p[3 * B + r] = r;
      p[4 * B + r] = 0;
    }
    const int64_t total = std::accumulate(lens, lens + S, int64_t{0});
    const ModelConfig& cfg = model.config();
    q[B * width + B] = static_cast<int32_t>(
        decode_min_split_tokens(total, cfg.num_heads, cfg.num_kv_heads, device_num_sms()));
    idx.narrow(0, 0, 5 * B).copy_(h64, /*non_blocking=*/true);
    i32.narrow(0, 0, B * width + B + 1).copy_(h32, /*non_blocking=*/true);
  }

  // Warm-up run (cuBLAS handles and workspaces, lazy module loads) and capture, both on the side stream, over
  // padding-only inputs: nothing is written to the KV cache.
  void capture(int64_t B) {
    const ForwardBatch fb = views(B);
    idx.narrow(0, 0, 2 * B).zero_();
    idx.narrow(0, 2 * B, B).fill_(-1);
    idx.narrow(0, 3 * B, 2 * B).zero_();
    i32.narrow(0, 0, B * width + B + 1).zero_();
    c10::cuda::device_synchronize();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    {
      c10::cuda::CUDAStreamGuard guard(stream);
      logits.narrow(0, 0, B).copy_(model.forward(fb, kv));
      stream.synchronize();
      graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
      logits.narrow(0, 0, B).copy_(model.forward(fb, kv));
      graph->capture_end();
    }
    graphs[B] = std::move(graph);
  }
};

DecodeGraphs::DecodeGraphs(const LlamaModel& model, KVCache& kv, int64_t max_num_seqs, int64_t max_blocks_per_seq) {
  const at::Device dev = model.options().device();
  TORCH_CHECK(dev.is_cuda(), "DecodeGraphs: the model must be on a CUDA device");
  impl_ = std::make_unique<Impl>(model, kv, c10::cuda::getStreamFromPool(false, dev.index()));
  Impl& m = *impl_;
  m.max_bs = std::max<int64_t>(1, max_num_seqs);
  m.width = std::max<int64_t>(1, max_blocks_per_seq);
  for (int64_t b : {1, 2, 4, 8})
    if (b < m.max_bs) m.buckets.push_back(b);
  for (int64_t b = 16; b < m.max_bs; b += 8) m.buckets.push_back(b);
  m.buckets.push_back(m.max_bs);
  const auto opts = at::TensorOptions().device(dev);
  m.idx = at::zeros({5 * m.max_bs}, opts.dtype(at::kLong));
  m.i32 = at::zeros({m.max_bs * m.width + m.max_bs + 1}, opts.dtype(at::kInt));
  m.cu = at::arange(m.max_bs + 1, opts.dtype(at::kInt));
  m.logits = at::empty({m.max_bs, model.config().vocab_size}, model.options());
  m.pool = at::cuda::graph_pool_handle();
}

DecodeGraphs::~DecodeGraphs() = default;

int64_t DecodeGraphs::bucket(int64_t num_seqs) const {
  auto it = std::lower_bound(impl_->buckets.begin(), impl_->buckets.end(), num_seqs);
  return it == impl_->buckets.end() ? -1 : *it;
}

void DecodeGraphs::capture_all() {
  for (auto it = impl_->buckets.rbegin(); it != impl_->buckets.rend(); ++it)
    if (!impl_->graphs.count(*it)) impl_->capture(*it);
}

int64_t DecodeGraphs::num_graphs() const { return static_cast<int64_t>(impl_->graphs.size()); }

bool DecodeGraphs::accepts(const ForwardBatch& batch) const {
  const int64_t S = batch.token_ids.size(0);
  return batch.max_query_len == 1 && S >= 1 && S <= impl_->max_bs && batch.kv_lens.size(0) == S &&
         batch.sample_rows.size(0) == S && batch.block_tables.size(1) <= impl_->width;
}

at::Tensor DecodeGraphs::run(const ForwardBatch& batch, const at::Tensor& device_token_ids) {
  TORCH_CHECK(accepts(batch), "DecodeGraphs: not a decode batch this object can replay");
  const int64_t S = batch.token_ids.size(0), B = bucket(S);
  auto it = impl_->graphs.find(B);
  if (it == impl_->graphs.end()) {
    impl_->capture(B);
    it = impl_->graphs.find(B);
  }
  impl_->load(batch, B);
  if (device_token_ids.defined()) {  // into the graph's row order
    at::Tensor dst = impl_->idx.narrow(0, 0, S);
    at::index_select_out(dst, device_token_ids.view({S}), 0, impl_->idx.narrow(0, 4 * B, S));
  }
  it->second->replay();
  return impl_->logits.narrow(0, 0, S);
}

}  // namespace turbo::cuda
