// Skinny GEMM for decode (a few rows): y [M, N] = x [M, K] w[N, K]^T (+ bias), bandwidth-bound on the weight.
//
// One warp per output column n: the warp streams w's row n in 16-byte pieces (UNROLL pieces in flight per lane)
// and dots it with each of the M rows of x (small, read through L1), then reduces across the lanes. A decode
// step reads every weight once, so the step's time is the weight bytes over the bandwidth this kernel reaches.
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo {
namespace cuda {
namespace {

constexpr int kGemvWarps = 8;  // warps (output columns) per CTA
#ifndef TURBO_GEMV_UNROLL
#define TURBO_GEMV_UNROLL 4  // 16-byte weight loads in flight per lane (8 and 16 measured slower on an H100)
#endif
constexpr int kGemvUnroll = TURBO_GEMV_UNROLL;

template <typename T, int M>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(T* __restrict__ y, int64_t y_stride, const T* __restrict__ x, int64_t x_stride,
                const T* __restrict__ w, const T* __restrict__ bias, int N, int K) {
    constexpr int VEC = Vec16<T>::VEC;
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
    if (n >= N) return;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(n) * K);
    const int pieces = K / VEC;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    for (int p0 = lane; p0 < pieces; p0 += 32 * kGemvUnroll) {
        Vec16<T> wv[kGemvUnroll];
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
            const int p = p0 + u * 32;
            wv[u].raw = p < pieces ? load_stream(wrow + p) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
            const int p = p0 + u * 32;
            if (p >= pieces) break;
            float wf[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) wf[i] = to_float<T>(wv[u].v[i]);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float xf[VEC];
                load16_to_float<T>(x + m * x_stride + p * VEC, xf);
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[m] = fmaf(wf[i], xf[i], acc[m]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float s = warp_sum(acc[m]);
        if (lane == 0) y[m * y_stride + n] = from_float<T>(bias ? s + to_float<T>(bias[n]) : s);
    }
}

template <typename T, int M>
void launch(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
    const int N = static_cast<int>(w.size(0)), K = static_cast<int>(w.size(1));
    gemv_kernel<T, M><<<ceil_div(N, kGemvWarps), kGemvWarps * 32, 0, current_stream()>>>(
        reinterpret_cast<T*>(y.data_ptr()), y.stride(0), reinterpret_cast<const T*>(x.data_ptr()), x.stride(0),
        reinterpret_cast<const T*>(w.data_ptr()), bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr,
        N, K);
}

}  // namespace

bool gemv_supported(const at::Tensor& x, const at::Tensor& w) {
    return x.is_cuda() && w.is_cuda() && x.dim() == 2 && w.dim() == 2 && x.size(0) >= 1 &&
           x.size(0) <= kGemvMaxRows && x.size(1) == w.size(1) && x.scalar_type() == w.scalar_type() &&
           x.stride(1) == 1 && w.is_contiguous() && rows_aligned16(x) && rows_aligned16(w) &&
           w.size(0) <= INT32_MAX && w.size(1) <= INT32_MAX;
}

void gemv(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
    TORCH_CHECK(gemv_supported(x, w), "gemv: x [M <= ", kGemvMaxRows, ", K] and w [N, K] contiguous, one dtype, "
                "16-byte aligned rows");
    TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == w.size(0) && y.stride(1) == 1 &&
                    y.scalar_type() == x.scalar_type() && y.is_cuda(),
                "gemv: y must be [M, N] with contiguous rows");
    TORCH_CHECK(!bias.defined() || (bias.is_contiguous() && bias.numel() == w.size(0) &&
                                    bias.scalar_type() == w.scalar_type()),
                "gemv: bias must be [N] of w's dtype");
    const c10::cuda::CUDAGuard guard(x.device());
    TURBO_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gemv", [&] {
        switch (x.size(0)) {
            case 1: launch<scalar_t, 1>(y, x, w, bias); break;
            case 2: launch<scalar_t, 2>(y, x, w, bias); break;
            case 3: launch<scalar_t, 3>(y, x, w, bias); break;
            case 4: launch<scalar_t, 4>(y, x, w, bias); break;
            case 5: launch<scalar_t, 5>(y, x, w, bias); break;
            case 6: launch<scalar_t, 6>(y, x, w, bias); break;
            case 7: launch<scalar_t, 7>(y, x, w, bias); break;
            default: launch<scalar_t, 8>(y, x, w, bias); break;
        }
    });
    TURBO_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace turbo
