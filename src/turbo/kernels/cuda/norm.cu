// RMSNorm and fused residual-add + RMSNorm. One CTA per row; fp32 statistics; HF's rounding order:
// weight * (x * rsqrt(mean(x^2) + eps)).to(dtype).
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo {
namespace cuda {
namespace {

template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out, int64_t out_stride, const T* __restrict__ x, int64_t x_stride,
                                const T* __restrict__ weight, int hidden, float eps) {
    __shared__ float red[33];
    const T* xr = x + blockIdx.x * x_stride;
    T* orow = out + blockIdx.x * out_stride;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = to_float<T>(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float r = rsqrtf(ss / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float n = round_to<T>(to_float<T>(xr[i]) * r);
        orow[i] = from_float<T>(to_float<T>(weight[i]) * n);
    }
}

template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, int64_t x_stride, T* __restrict__ residual,
                                          int64_t res_stride, const T* __restrict__ weight, int hidden, float eps) {
    __shared__ float red[33];
    T* xr = x + blockIdx.x * x_stride;
    T* rr = residual + blockIdx.x * res_stride;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = round_to<T>(to_float<T>(xr[i]) + to_float<T>(rr[i]));
        rr[i] = from_float<T>(v);
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float r = rsqrtf(ss / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {  // each thread re-reads only what it wrote
        float n = round_to<T>(to_float<T>(rr[i]) * r);
        xr[i] = from_float<T>(to_float<T>(weight[i]) * n);
    }
}

int norm_threads(int hidden) {
    int t = ((hidden / 4 + 31) / 32) * 32;
    return t < 64 ? 64 : (t > 1024 ? 1024 : t);
}

void check_rows(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.dim() == 2, name, " must be [T, H]");
    TORCH_CHECK(t.stride(1) == 1, name, " rows must be contiguous");
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_rows(x, "x");
    check_rows(out, "out");
    TURBO_CHECK_CUDA_TENSOR(weight);
    TURBO_CHECK_CONTIGUOUS(weight);
    TORCH_CHECK(out.sizes() == x.sizes(), "out must have x's shape");
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must be [H]");
    TORCH_CHECK(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
                "x, out and weight must share a dtype");
    const int rows = static_cast<int>(x.size(0)), hidden = static_cast<int>(x.size(1));
    if (rows == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    TURBO_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm", [&] {
        rms_norm_kernel<scalar_t><<<rows, norm_threads(hidden), 0, current_stream()>>>(
            reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0),
            reinterpret_cast<const scalar_t*>(x.data_ptr()), x.stride(0),
            reinterpret_cast<const scalar_t*>(weight.data_ptr()), hidden, static_cast<float>(eps));
    });
    TURBO_CHECK_LAUNCH();
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
    check_rows(x, "x");
    check_rows(residual, "residual");
    TURBO_CHECK_CUDA_TENSOR(weight);
    TURBO_CHECK_CONTIGUOUS(weight);
    TORCH_CHECK(residual.sizes() == x.sizes(), "residual must have x's shape");
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must be [H]");
    TORCH_CHECK(residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
                "x, residual and weight must share a dtype");
    const int rows = static_cast<int>(x.size(0)), hidden = static_cast<int>(x.size(1));
    if (rows == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    TURBO_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fused_add_rms_norm", [&] {
        fused_add_rms_norm_kernel<scalar_t><<<rows, norm_threads(hidden), 0, current_stream()>>>(
            reinterpret_cast<scalar_t*>(x.data_ptr()), x.stride(0), reinterpret_cast<scalar_t*>(residual.data_ptr()),
            residual.stride(0), reinterpret_cast<const scalar_t*>(weight.data_ptr()), hidden, static_cast<float>(eps));
    });
    TURBO_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace turbo
