// CPU kernels: RMSNorm (+ fused residual add), rotary, SiLU*mul, KV write. Inner loops over the contiguous
// last dim are written so the compiler vectorizes them (omp simd reductions; -fopenmp-simd).
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

#include "turbo/kernels/cpu/cpu_kernels.h"

namespace turbo::kernels::cpu {
namespace {

inline float sum_squares(const float* x, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
  return acc;
}

inline void scale_mul(float* out, const float* x, const float* w, float r, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// Rows (i0, i1) of a [N0, N1, D] view with strides s0, s1 (last dim contiguous).
template <typename F>
void for_rows(int64_t n0, int64_t n1, int64_t grain, const F& f) {
  at::parallel_for(0, n0 * n1, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r / n1, r % n1);
  });
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t D = x.size(-1);
  const int64_t n0 = x.dim() >= 2 ? x.size(0) : 1, n1 = x.dim() == 3 ? x.size(1) : 1;
  const int64_t xs0 = x.dim() >= 2 ? x.stride(0) : 0, xs1 = x.dim() == 3 ? x.stride(1) : 0;
  const int64_t os0 = out.dim() >= 2 ? out.stride(0) : 0, os1 = out.dim() == 3 ? out.stride(1) : 0;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  for_rows(n0, n1, std::max<int64_t>(1, 16384 / D), [&](int64_t i, int64_t j) {
    const float* xr = xp + i * xs0 + j * xs1;
    float r = 1.f / std::sqrt(sum_squares(xr, D) / D + feps);
    scale_mul(op + i * os0 + j * os1, xr, wp, r, D);
  });
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps) {
  const int64_t N = x.size(0), D = x.size(1);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* xr = xp + i * D;
      float* rr = rp + i * D;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) rr[k] += xr[k];
      float r = 1.f / std::sqrt(sum_squares(rr, D) / D + feps);
      scale_mul(xr, rr, wp, r, D);
    }
  });
}

void rotary(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rotary: position ", pos[t], " outside the table");
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  for_rows(T, H, std::max<int64_t>(1, 8192 / D), [&](int64_t t, int64_t h) {
    float* r = xp + t * s0 + h * s1;
    const float* c = cp + pos[t] * half;
    const float* s = sp + pos[t] * half;
#pragma omp simd
    for (int64_t k = 0; k < half; ++k) {
      float x1 = r[k], x2 = r[k + half];
      r[k] = x1 * c[k] - x2 * s[k];
      r[k + half] = x2 * c[k] + x1 * s[k];
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  if (T > 4) {  // ATen's vectorized SiLU (AVX2/AVX-512 at run time) for prefill-sized inputs
    at::Tensor out = at::silu(gate_up.narrow(1, 0, I));
    out.mul_(gate_up.narrow(1, I, I));
    return out;
  }
  at::Tensor out = at::empty({T, I}, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) {
      float a = g[t * 2 * I + i], b = g[t * 2 * I + I + i];
      o[t * I + i] = a / (1.f + std::exp(-a)) * b;
    }
  return out;
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  const int64_t T = k.size(0), KVH = k.size(1), D = k.size(2);
  const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slots[t] < n_slots, "write_kv: slot ", slots[t], " out of range");
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      float* kd = kc + slots[t] * KVH * D;
      float* vd = vc + slots[t] * KVH * D;
      for (int64_t h = 0; h < KVH; ++h) {
        std::memcpy(kd + h * D, kp + t * ks0 + h * ks1, sizeof(float) * D);
        std::memcpy(vd + h * D, vp + t * vs0 + h * vs1, sizeof(float) * D);
      }
    }
  });
}

}  // namespace turbo::kernels::cpu
