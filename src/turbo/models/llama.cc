#include "turbo/models/llama.h"

#include <cmath>
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
                             scale, window, b.min_split_tokens);
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

at::Tensor LlamaModel::forward(const ForwardBatch& b, KVCache& kv) const {
  const int64_t T = b.token_ids.size(0);
  const int64_t H = cfg_.num_heads, KVH = cfg_.num_kv_heads, D = cfg_.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  at::Tensor x = at::index_select(embed_, 0, b.token_ids);  // [T, hidden]
  at::Tensor residual;
  at::Tensor attn = at::empty({T, H, D}, x.options());
  at::Tensor prefill_cu;  // defined when the batch is split between the two attention kernels (see attend)
  const int64_t S = b.kv_lens.size(0);
  if (!x.device().is_cpu() && b.max_query_len > 1 && b.num_decodes > 0 && b.num_decodes < S)
    prefill_cu = b.cu_q_lens.narrow(0, b.num_decodes, S - b.num_decodes + 1) - static_cast<int>(b.num_decodes);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    if (i == 0) {
      residual = x;
      x = at::empty_like(residual);
      kernels::rms_norm(x, residual, l.input_norm, cfg_.rms_norm_eps);
    } else {
      kernels::fused_add_rms_norm(x, residual, l.input_norm, cfg_.rms_norm_eps);
    }
    at::Tensor qkv = l.qkv->forward(x);  // [T, (H + 2 KVH) D]
    at::Tensor q = qkv.narrow(1, 0, H * D).view({T, H, D});
    at::Tensor k = qkv.narrow(1, H * D, KVH * D).view({T, KVH, D});
    at::Tensor v = qkv.narrow(1, (H + KVH) * D, KVH * D).view({T, KVH, D});
    if (cfg_.qk_norm) {
      kernels::rms_norm(q, q, l.q_norm, cfg_.rms_norm_eps);
      kernels::rms_norm(k, k, l.k_norm, cfg_.rms_norm_eps);
    }
    kernels::rotary_write_kv(q, k, v, b.positions, rope_, kv.k[i], kv.v[i], b.slot_mapping);
    attend(attn, q, kv.k[i], kv.v[i], b, prefill_cu, scale, cfg_.sliding_window);
    x = l.o->forward(attn.view({T, H * D}));
    kernels::fused_add_rms_norm(x, residual, l.post_norm, cfg_.rms_norm_eps);
    x = l.down->forward(kernels::silu_mul(l.gate_up->forward(x)));
  }
  // Only the rows that sample need the final norm and the LM head.
  at::Tensor xs = at::index_select(x, 0, b.sample_rows);
  at::Tensor rs = at::index_select(residual, 0, b.sample_rows);
  kernels::fused_add_rms_norm(xs, rs, norm_, cfg_.rms_norm_eps);
  return lm_head_->forward(xs);
}

}  // namespace turbo
