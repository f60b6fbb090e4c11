#include "turbo/models/llama.h"

#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <stdexcept>

#include "turbo/kernels/kernels.h"

namespace turbo {
namespace {

// A weight by name, checked against the model's device and dtype (`like`: the embedding).
at::Tensor get(const WeightMap& w, const std::string& name, const at::Tensor& like, bool required = true) {
  auto it = w.find(name);
  if (it == w.end()) {
    if (required) throw std::invalid_argument("turbo: missing weight '" + name + "'");
    return {};
  }
  at::Tensor t = it->second;
  if (like.defined()) {
    TORCH_CHECK(t.device() == like.device(), "turbo: weight ", name, " is on ", t.device(), ", not ", like.device());
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "turbo: weight ", name, " is ", t.scalar_type(), ", not ",
                like.scalar_type());
  }
  return t.is_contiguous() ? t : t.contiguous();
}

kernels::RopeTables rope_tables(const WeightMap& w, const at::Tensor& embed, int64_t head_dim) {
  kernels::RopeTables r;
  r.cos = get(w, "rope.cos", {}).to(embed.device(), at::kFloat).contiguous();
  r.sin = get(w, "rope.sin", {}).to(embed.device(), at::kFloat).contiguous();
  TORCH_CHECK(r.cos.dim() == 2 && r.cos.size(1) == head_dim / 2 && r.sin.sizes() == r.cos.sizes(),
              "rope tables must be [P, head_dim/2]");
  if (!embed.device().is_cpu()) r.cos_sin = at::cat({r.cos, r.sin}, 1).contiguous();
  return r;
}

// A dense layer on a GPU: kernels::linear (turbo's GEMV for decode-sized inputs, cuBLAS otherwise).
class GpuLinear final : public Linear {
 public:
  GpuLinear(at::Tensor w, at::Tensor b) : w_(std::move(w)), b_(std::move(b)) {}
  at::Tensor forward(const at::Tensor& x) const override { return kernels::linear(x, w_, b_); }
  int64_t out_features() const override { return w_.size(0); }

 private:
  at::Tensor w_;  // [out, in]
  at::Tensor b_;  // [out] or undefined
};

std::unique_ptr<Linear> dense(at::Tensor w, at::Tensor b = {}) {
  if (w.device().is_cpu()) return std::make_unique<DenseLinear>(std::move(w), std::move(b));
  return std::make_unique<GpuLinear>(std::move(w), std::move(b));
}

// Attention of one layer. On a GPU, a mixed batch's leading decode rows go to the split-K decode kernel and the
// rest to the prefill kernel, which would give every one-query row a whole 64-query tile per query head.
// prefill_cu: cu_q_lens of the prefill part (rows from num_decodes on), made once per step by forward().
void attend(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const ForwardBatch& b, const at::Tensor& prefill_cu, double scale, int64_t window) {
  if (!prefill_cu.defined()) {
    kernels::paged_attention(out, q, k_cache, v_cache, b.block_tables, b.cu_q_lens, b.kv_lens, b.max_query_len,
                             scale, window);
    return;
  }
  const int64_t D = b.num_decodes, T = q.size(0), S = b.kv_lens.size(0);
  at::Tensor out_d = out.narrow(0, 0, D), out_p = out.narrow(0, D, T - D);
  kernels::paged_attention(out_d, q.narrow(0, 0, D), k_cache, v_cache, b.block_tables.narrow(0, 0, D),
                           b.cu_q_lens.narrow(0, 0, D + 1), b.kv_lens.narrow(0, 0, D), 1, scale, window);
  kernels::paged_attention(out_p, q.narrow(0, D, T - D), k_cache, v_cache, b.block_tables.narrow(0, D, S - D),
                           prefill_cu, b.kv_lens.narrow(0, D, S - D), b.max_query_len, scale, window);
}

}  // namespace

LlamaModel::LlamaModel(const ModelConfig& cfg, const WeightMap& w) : cfg_(cfg) {
  embed_ = get(w, "embed", {});
  const at::Tensor& e = embed_;
  TORCH_CHECK(e.device().is_cpu() ? e.scalar_type() == at::kFloat : at::isFloatingType(e.scalar_type()),
              "turbo: weights on CPU must be float32 (got ", e.scalar_type(), ")");
  norm_ = get(w, "norm", e);
  lm_head_ = dense(get(w, "lm_head", e));
  rope_ = rope_tables(w, e, cfg.head_dim);
  const int64_t qkv_out = static_cast<int64_t>(cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim;
  for (int i = 0; i < cfg.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    Layer l;
    l.input_norm = get(w, p + "input_norm", e);
    l.post_norm = get(w, p + "post_norm", e);
    at::Tensor qkv = get(w, p + "qkv", e);
    TORCH_CHECK(qkv.size(0) == qkv_out && qkv.size(1) == cfg.hidden_size, "turbo: ", p, "qkv has a wrong shape");
    l.qkv = dense(qkv, cfg.qkv_bias ? get(w, p + "qkv_bias", e) : at::Tensor());
    if (cfg.qk_norm) {
      l.q_norm = get(w, p + "q_norm", e);
      l.k_norm = get(w, p + "k_norm", e);
    }
    l.o = dense(get(w, p + "o", e));
    l.gate_up = dense(get(w, p + "gate_up", e));
    l.down = dense(get(w, p + "down", e));
    layers_.push_back(std::move(l));
  }
}

at::Tensor LlamaModel::attention_input(size_t i, const at::Tensor& x, const ForwardBatch& b, KVCache& kv) const {
  const Layer& l = layers_[i];
  const int64_t T = x.size(0), H = cfg_.num_heads, KVH = cfg_.num_kv_heads, D = cfg_.head_dim;
  at::Tensor qkv = l.qkv->forward(x);  // [T, (H + 2 KVH) D]
  at::Tensor q = qkv.narrow(1, 0, H * D).view({T, H, D});
  at::Tensor k = qkv.narrow(1, H * D, KVH * D).view({T, KVH, D});
  at::Tensor v = qkv.narrow(1, (H + KVH) * D, KVH * D).view({T, KVH, D});
  if (cfg_.qk_norm) {
    kernels::rms_norm(q, q, l.q_norm, cfg_.rms_norm_eps);
    kernels::rms_norm(k, k, l.k_norm, cfg_.rms_norm_eps);
  }
  kernels::rotary(q, k, b.positions, rope_);
  kernels::write_kv(k, v, kv.k[i], kv.v[i], b.slot_mapping);
  return qkv;
}

at::Tensor LlamaModel::layer_output(size_t i, const at::Tensor& attn, at::Tensor& residual) const {
  const Layer& l = layers_[i];
  at::Tensor x = l.o->forward(attn.view({attn.size(0), -1}));
  kernels::fused_add_rms_norm(x, residual, l.post_norm, cfg_.rms_norm_eps);
  x = l.down->forward(kernels::silu_mul(l.gate_up->forward(x)));
  if (i + 1 < layers_.size()) kernels::fused_add_rms_norm(x, residual, layers_[i + 1].input_norm, cfg_.rms_norm_eps);
  return x;
}

at::Tensor LlamaModel::forward(const ForwardBatch& b, KVCache& kv) const {
  const int64_t T = b.token_ids.size(0), S = b.kv_lens.size(0);
  const int64_t H = cfg_.num_heads, D = cfg_.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  at::Tensor residual = at::index_select(embed_, 0, b.token_ids);  // [T, hidden]
  at::Tensor x = at::empty_like(residual);
  kernels::rms_norm(x, residual, layers_[0].input_norm, cfg_.rms_norm_eps);
  if (nano_batch_rows_ > 0 && b.is_decode && T >= std::max<int64_t>(nano_batch_rows_, 2) && T == S) {
    x = forward_nano_batches(b, kv, x, residual);
  } else {
    at::Tensor attn = at::empty({T, H, D}, x.options());
    at::Tensor prefill_cu;  // defined when the batch is split between the two attention kernels (see attend)
    if (!x.device().is_cpu() && b.max_query_len > 1 && b.num_decodes > 0 && b.num_decodes < S)
      prefill_cu = b.cu_q_lens.narrow(0, b.num_decodes, S - b.num_decodes + 1) - static_cast<int>(b.num_decodes);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const at::Tensor qkv = attention_input(i, x, b, kv);
      attend(attn, qkv.narrow(1, 0, H * D).view({T, H, D}), kv.k[i], kv.v[i], b, prefill_cu, scale,
             cfg_.sliding_window);
      x = layer_output(i, attn, residual);
    }
  }
  // Only the rows that sample need the final norm and the LM head.
  at::Tensor xs = at::index_select(x, 0, b.sample_rows);
  at::Tensor rs = at::index_select(residual, 0, b.sample_rows);
  kernels::fused_add_rms_norm(xs, rs, norm_, cfg_.rms_norm_eps);
  return lm_head_->forward(xs);
}

// Two nano-batches (NanoFlow's idea, at its simplest): the rows split in halves A and B, B half a layer behind
// A. The current stream runs every GEMM and small op in the order
//   A: attention input (layer i) | B: layer output (i - 1), attention input (i) | A: layer output (i) | ...
// and a second, high-priority stream runs each half's attention as soon as its input is written, so that one
// half's attention (bound by reading the KV cache) runs beside the other half's GEMMs (bound by the tensor
// cores) instead of after them. Tensors the side stream reads (qkv, attn) are freed only after the current
// stream has waited for it. On a CPU the same order runs on one stream, with the same results.
at::Tensor LlamaModel::forward_nano_batches(const ForwardBatch& b, KVCache& kv, at::Tensor x,
                                            at::Tensor& residual) const {
  const int64_t T = x.size(0), H = cfg_.num_heads, D = cfg_.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  struct Half {
    ForwardBatch b;
    at::Tensor x, residual, attn, qkv;
    std::optional<c10::Event> attended;  // the side stream's attention of this half, up to the last layer issued
  };
  const int64_t split = std::min(T - 1, (T / 2 + 7) / 8 * 8);
  at::Tensor attn = at::empty({T, H, D}, x.options());
  Half halves[2];
  for (int h = 0; h < 2; ++h) {
    const int64_t begin = h == 0 ? 0 : split, n = h == 0 ? split : T - split;
    Half& s = halves[h];
    s.b.token_ids = b.token_ids.narrow(0, begin, n);
    s.b.positions = b.positions.narrow(0, begin, n);
    s.b.slot_mapping = b.slot_mapping.narrow(0, begin, n);
    s.b.block_tables = b.block_tables.narrow(0, begin, n);
    s.b.cu_q_lens = b.cu_q_lens.narrow(0, begin, n + 1) - static_cast<int>(begin);
    s.b.kv_lens = b.kv_lens.narrow(0, begin, n);
    s.b.max_query_len = 1;
    s.b.is_decode = true;
    s.b.num_decodes = n;
    s.x = x.narrow(0, begin, n);
    s.residual = residual.narrow(0, begin, n);
    s.attn = attn.narrow(0, begin, n);
  }
  const c10::Device dev = x.device();
  const bool streams = !dev.is_cpu();
  std::optional<c10::impl::VirtualGuardImpl> impl;
  std::optional<c10::Stream> main, side;
  if (streams) {
    impl.emplace(dev.type());
    main = impl->getStream(dev);
    // High priority: attention CTAs take SMs as the GEMM's retire (env TURBO_NANO_PRIORITY=0: the same priority).
    const char* prio = std::getenv("TURBO_NANO_PRIORITY");
    side = impl->getStreamFromGlobalPool(dev, /*isHighPriority=*/!(prio && std::string(prio) == "0"));
  }
  // Experiment: the current stream's GEMMs through cuBLASLt on all but N SMs (env TURBO_NANO_SM_CARVEOUT=N), so
  // that they leave room for the attention beside them (cuBLAS's Hopper kernels are persistent: one CTA per SM).
  struct BlasScope {
    at::BlasBackend backend = at::globalContext().blasPreferredBackend();
    std::optional<int32_t> carveout = at::globalContext()._SMCarveout_EXPERIMENTAL();
    bool set = false;
    ~BlasScope() {
      if (!set) return;
      at::globalContext().setBlasPreferredBackend(backend);
      at::globalContext()._setSMCarveout_EXPERIMENTAL(carveout);
    }
  } blas;
  if (const char* c = std::getenv("TURBO_NANO_SM_CARVEOUT"); streams && c && std::atoi(c) > 0) {
    at::globalContext().setBlasPreferredBackend(at::BlasBackend::Cublaslt);
    at::globalContext()._setSMCarveout_EXPERIMENTAL(std::atoi(c));
    blas.set = true;
  }
  // Issue half h's attention of layer i: on the side stream once the current one has written its input.
  auto attend_half = [&](Half& s, size_t i) {
    const at::Tensor q = s.qkv.narrow(1, 0, H * D).view({s.b.num_decodes, H, D});
    if (!streams) {
      attend(s.attn, q, kv.k[i], kv.v[i], s.b, {}, scale, cfg_.sliding_window);
      return;
    }
    c10::Event ready(dev.type());
    ready.record(*main);
    ready.block(*side);
    {
      const c10::StreamGuard guard(*side);
      attend(s.attn, q, kv.k[i], kv.v[i], s.b, {}, scale, cfg_.sliding_window);
    }
    if (!s.attended) s.attended.emplace(dev.type());
    s.attended->record(*side);
  };
  // Half h's output of layer i, once its attention is done.
  auto finish_half = [&](Half& s, size_t i) {
    if (streams) s.attended->block(*main);
    s.x = layer_output(i, s.attn, s.residual);
    s.qkv = at::Tensor();
  };
  for (size_t i = 0; i < layers_.size(); ++i) {
    for (int h = 0; h < 2; ++h) {
      Half& s = halves[h];
      if (i > 0) finish_half(s, i - 1);
      s.qkv = attention_input(i, s.x, s.b, kv);
      attend_half(s, i);
    }
  }
  for (Half& s : halves) finish_half(s, layers_.size() - 1);
  return at::cat({halves[0].x, halves[1].x}, 0);
}

}  // namespace turbo
