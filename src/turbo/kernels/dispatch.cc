// Argument checks and device routing for every op of kernels.h. CPU tensors go to kernels/cpu/ (float32 only);
// CUDA tensors to the turbo::cuda launchers (float32, float16, bfloat16) when built with TURBO_WITH_CUDA.
#include "turbo/kernels/kernels.h"

#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "turbo/kernels/cpu/cpu_kernels.h"
#ifdef TURBO_WITH_CUDA
#include "turbo/kernels/cuda/cuda_kernels.h"
#include "turbo/kernels/cuda/sample_rows.h"
#endif

namespace turbo::kernels {
namespace {

// True for a CUDA tensor (routed to kernels/cuda/), false for a CPU one; anything else is refused.
bool on_cuda(const at::Tensor& t) {
  if (t.device().is_cpu()) return false;
#ifdef TURBO_WITH_CUDA
  if (t.device().is_cuda()) return true;
#endif
  TORCH_CHECK(false, "turbo: no ", t.device().type(), " kernels in this build");
  return false;
}

// CPU kernels compute in float32; the CUDA kernels take float32, float16 or bfloat16.
void check_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  if (t.device().is_cpu()) {
    TORCH_CHECK(dt == at::kFloat, name, " must be float32 on CPU (got ", dt, ")");
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
                " must be float32, float16 or bfloat16 (got ", dt, ")");
  }
  TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

#ifdef TURBO_WITH_CUDA
// The CUDA rotary kernels' tables: cos_sin [P, D] = [cos | sin].
void check_cuda_rope(const at::Tensor& q, const RopeTables& rope) {
  check_float(q, "q");
  TORCH_CHECK(rope.cos_sin.defined() && rope.cos_sin.size(1) == q.size(2), "rotary: cos_sin must be [P, D]");
}
#endif

void check_write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  check_float(k, "k");
  check_float(v, "v");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4,
              "write_kv: caches must be contiguous [NB, BS, KVH, D]");
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3) && v.sizes() == k.sizes(),
              "write_kv: k/v must be [T, KVH, D] matching the cache");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == k.size(0),
              "write_kv: slot_mapping must be int64 [T]");
}

#ifdef TURBO_WITH_CUDA
// The CUDA RMSNorm takes [T, D] with one row stride; other shapes go through a contiguous [rows, D] copy.
void cuda_rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps) {
  if (x.dim() == 2) {
    turbo::cuda::rms_norm(out, x, w, eps);
    return;
  }
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  at::Tensor o2 = at::empty_like(x2);
  turbo::cuda::rms_norm(o2, x2, w, eps);
  out.copy_(o2.view(out.sizes()));
}

// Decode-only batches: split-K flash decoding (workspace from the caching allocator, splits that fill the GPU).
void cuda_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& kv_lens,
                           double scale, int64_t window, const at::Tensor& min_split_tokens) {
  const int64_t S = q.size(0);
  const int64_t splits = turbo::cuda::decode_num_splits(S, k_cache.size(2), block_tables.size(1), k_cache.size(1),
                                                        turbo::cuda::device_num_sms());
  const int64_t bytes = turbo::cuda::decode_workspace_size(S, q.size(1), q.size(2), splits);
  at::Tensor workspace = at::empty({std::max<int64_t>(bytes, 16)}, q.options().dtype(at::kByte));
  turbo::cuda::paged_attention_decode(out, q, k_cache, v_cache, block_tables, kv_lens, scale, splits, workspace,
                                      window, min_split_tokens);
}
#endif

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps) {
  check_float(x, "x");
  check_float(out, "out");
  check_float(w, "weight");
  TORCH_CHECK(x.dim() >= 1 && x.dim() <= 3, "rms_norm: x must have 1 to 3 dims");
  TORCH_CHECK(out.sizes() == x.sizes(), "rms_norm: out and x shapes differ");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "rms_norm: weight must be [D]");
#ifdef TURBO_WITH_CUDA
  if (on_cuda(x)) return cuda_rms_norm(out, x, w.contiguous(), eps);
#else
  on_cuda(x);
#endif
  cpu::rms_norm(out, x, w.contiguous(), eps);
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps) {
  check_float(x, "x");
  check_float(residual, "residual");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes(),
              "fused_add_rms_norm: x and residual must be contiguous [N, D] of one shape");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "fused_add_rms_norm: weight must be [D]");
#ifdef TURBO_WITH_CUDA
  if (on_cuda(x)) return turbo::cuda::fused_add_rms_norm(x, residual, w.contiguous(), eps);
#else
  on_cuda(x);
#endif
  cpu::fused_add_rms_norm(x, residual, w.contiguous(), eps);
}

void rotary(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(!on_cuda(x), "rotary: on CUDA use rotary(q, k, positions, RopeTables)");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "rotary: x must be [T, heads, D] with even D");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == x.size(0),
              "rotary: positions must be int64 [T]");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == x.size(2) / 2 && cos.sizes() == sin.sizes(),
              "rotary: cos/sin must be [P, D/2]");
  cpu::rotary(x, positions.contiguous(), cos.contiguous(), sin.contiguous());
}

void rotary(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const RopeTables& rope) {
#ifdef TURBO_WITH_CUDA
  if (on_cuda(q)) {
    check_cuda_rope(q, rope);
    return turbo::cuda::rotary(q, k, positions, rope.cos_sin);
  }
#endif
  rotary(q, positions, rope.cos, rope.sin);
  rotary(k, positions, rope.cos, rope.sin);
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_float(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be [T, 2I]");
#ifdef TURBO_WITH_CUDA
  if (on_cuda(gate_up)) {
    at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
    turbo::cuda::silu_mul(out, gate_up);
    return out;
  }
#endif
  return cpu::silu_mul(gate_up.contiguous());
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  check_write_kv(k, v, k_cache, v_cache, slot_mapping);
#ifdef TURBO_WITH_CUDA
  if (on_cuda(k)) return turbo::cuda::write_kv(k, v, k_cache, v_cache, slot_mapping.contiguous());
#endif
  cpu::write_kv(k, v, k_cache, v_cache, slot_mapping.contiguous());
}

void rotary_write_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     const RopeTables& rope, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& slot_mapping) {
#ifdef TURBO_WITH_CUDA
  // TURBO_ROTARY_WRITE_KV=0: the two kernels, for A/B runs.
  static const bool fused = [] {
    const char* env = std::getenv("TURBO_ROTARY_WRITE_KV");
    return !(env && std::string(env) == "0");
  }();
  if (fused && on_cuda(q)) {
    check_cuda_rope(q, rope);
    check_write_kv(k, v, k_cache, v_cache, slot_mapping);
    return turbo::cuda::rotary_write_kv(q, k, v, positions, rope.cos_sin, k_cache, v_cache,
                                        slot_mapping.contiguous());
  }
#endif
  rotary(q, k, positions, rope);
  write_kv(k, v, k_cache, v_cache, slot_mapping);
}

void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& cu_q_lens, const at::Tensor& kv_lens,
                     int64_t max_query_len, double scale, int64_t sliding_window,
                     const at::Tensor& min_split_tokens) {
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
  TORCH_CHECK(max_query_len >= 1, "paged_attention: max_query_len must be >= 1");
#ifdef TURBO_WITH_CUDA
  if (on_cuda(q)) {
    if (max_query_len == 1 && q.size(0) == block_tables.size(0))
      return cuda_decode_attention(out, q, k_cache, v_cache, block_tables.contiguous(), kv_lens.contiguous(), scale,
                                   sliding_window, min_split_tokens);
    return turbo::cuda::paged_attention_prefill(out, q, k_cache, v_cache, block_tables.contiguous(),
                                                cu_q_lens.contiguous(), kv_lens.contiguous(), max_query_len, scale,
                                                sliding_window);
  }
#endif
  cpu::paged_attention(out, q, k_cache, v_cache, block_tables.contiguous(), cu_q_lens.contiguous(),
                       kv_lens.contiguous(), scale, sliding_window);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: x [T, in] and w [out, in]");
#ifdef TURBO_WITH_CUDA
  static const int64_t gemv_rows = [] {
    const char* env = std::getenv("TURBO_GEMV_ROWS");
    return env ? std::clamp<int64_t>(std::atoll(env), 0, turbo::cuda::kGemvMaxRows) : int64_t{1};
  }();
  if (on_cuda(x) && x.size(0) <= gemv_rows && turbo::cuda::gemv_supported(x, w)) {
    at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
    turbo::cuda::gemv(y, x, w, bias);
    return y;
  }
#endif
  return bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
}

void sample(const at::Tensor& logits, const std::vector<SampleRow>& rows, std::vector<int32_t>& tokens,
            std::vector<TokenLogprob>& logprobs) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == static_cast<int64_t>(rows.size()),
              "sample: logits must be [n, V], one row per request");
#ifdef TURBO_WITH_CUDA
  if (on_cuda(logits)) return turbo::cuda::sample_rows(logits.contiguous(), rows, tokens, logprobs);
#else
  on_cuda(logits);
#endif
  cpu::sample(logits.to(at::kFloat).contiguous(), rows, tokens, logprobs);
}

TokenFuture argmax_async(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "argmax_async: logits must be [n, V]");
  TokenFuture f;
  f.device = logits.argmax(1);
  if (logits.device().is_cpu()) {
    f.host = f.device;
    return f;
  }
  f.host = at::empty(f.device.sizes(), f.device.options().device(at::kCPU).pinned_memory(true));
  f.host.copy_(f.device, /*non_blocking=*/true);
  const c10::impl::VirtualGuardImpl impl(logits.device().type());
  auto event = std::make_shared<c10::Event>(logits.device().type());
  event->record(impl.getStream(logits.device()));
  f.ready = event;
  return f;
}

std::vector<int32_t> wait(const TokenFuture& tokens) {
  if (tokens.ready) static_cast<c10::Event*>(tokens.ready.get())->synchronize();
  const int64_t* h = tokens.host.data_ptr<int64_t>();
  return std::vector<int32_t>(h, h + tokens.host.numel());
}

}  // namespace turbo::kernels
