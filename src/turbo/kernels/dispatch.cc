#include "turbo/kernels/kernels.h"

#include "turbo/kernels/cpu/cpu_kernels.h"
#ifdef TURBO_WITH_CUDA
#include "turbo/kernels/cuda/cuda_kernels.h"
#endif

namespace turbo::kernels {
namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32 (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

// Every op runs on CPU for now; a CUDA build routes CUDA tensors to kernels/cuda/.
void check_device(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "turbo: no ", t.device().type(),
              " kernels in this build (CPU only; the CUDA kernels are not implemented yet)");
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps) {
  check_device(x);
  check_float(x, "x");
  check_float(out, "out");
  check_float(w, "weight");
  TORCH_CHECK(x.dim() >= 1 && x.dim() <= 3, "rms_norm: x must have 1 to 3 dims");
  TORCH_CHECK(out.sizes() == x.sizes(), "rms_norm: out and x shapes differ");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "rms_norm: weight must be [D]");
  cpu::rms_norm(out, x, w.contiguous(), eps);
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps) {
  check_device(x);
  check_float(x, "x");
  check_float(residual, "residual");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes(),
              "fused_add_rms_norm: x and residual must be contiguous [N, D] of one shape");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "fused_add_rms_norm: weight must be [D]");
  cpu::fused_add_rms_norm(x, residual, w.contiguous(), eps);
}

void rotary(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  check_device(x);
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "rotary: x must be [T, heads, D] with even D");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == x.size(0),
              "rotary: positions must be int64 [T]");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == x.size(2) / 2 && cos.sizes() == sin.sizes(),
              "rotary: cos/sin must be [P, D/2]");
  cpu::rotary(x, positions.contiguous(), cos.contiguous(), sin.contiguous());
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_device(gate_up);
  check_float(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be [T, 2I]");
  return cpu::silu_mul(gate_up.contiguous());
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  check_device(k);
  check_float(k, "k");
  check_float(v, "v");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4,
              "write_kv: caches must be contiguous [NB, BS, KVH, D]");
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3) && v.sizes() == k.sizes(),
              "write_kv: k/v must be [T, KVH, D] matching the cache");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == k.size(0),
              "write_kv: slot_mapping must be int64 [T]");
  cpu::write_kv(k, v, k_cache, v_cache, slot_mapping.contiguous());
}

void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& cu_q_lens, const at::Tensor& kv_lens,
                     double scale, int64_t sliding_window) {
  check_device(q);
  check_float(q, "q");
  check_float(k_cache, "k_cache");
  TORCH_CHECK(q.dim() == 3 && out.is_contiguous() && out.sizes() == q.sizes(), "paged_attention: q/out [T, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q.size(2),
              "paged_attention: caches must be contiguous [NB, BS, KVH, D]");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "paged_attention: heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2, "block_tables: int32 [S, B]");
  TORCH_CHECK(cu_q_lens.scalar_type() == at::kInt && cu_q_lens.numel() == block_tables.size(0) + 1,
              "cu_q_lens: int32 [S+1]");
  TORCH_CHECK(kv_lens.scalar_type() == at::kInt && kv_lens.numel() == block_tables.size(0), "kv_lens: int32 [S]");
  cpu::paged_attention(out, q, k_cache, v_cache, block_tables.contiguous(), cu_q_lens.contiguous(),
                       kv_lens.contiguous(), scale, sliding_window);
}

void sample(const at::Tensor& logits, const std::vector<SampleRow>& rows, std::vector<int32_t>& tokens,
            std::vector<TokenLogprob>& logprobs) {
  check_device(logits);
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == static_cast<int64_t>(rows.size()),
              "sample: logits must be [n, V], one row per request");
  cpu::sample(logits.to(at::kFloat).contiguous(), rows, tokens, logprobs);
}

}  // namespace turbo::kernels
