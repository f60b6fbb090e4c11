// RMSNorm and fused residual-add + RMSNorm. One CTA per row; fp32 statistics; HF's rounding order:
// weight * (x * rsqrt(mean(x^2) + eps)).to(dtype). Aligned rows take the 16-byte vector kernels.
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

// 16-byte vector variants (rows 16-byte aligned, hidden a multiple of VEC): each thread keeps NV vectors of its
// row in registers between the statistics and the output, so x and residual are read once. Same rounding as above.

// out[idx] = weight * (v * r) for the NV vectors a thread holds, r = 1 / rms of the row.
template <typename T, int NV>
__device__ __forceinline__ void write_normed(uint4* out, const Vec16<T> (&v)[NV], const T* __restrict__ weight,
                                             int nvec, float r) {
    constexpr int VEC = Vec16<T>::VEC;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
        const int idx = threadIdx.x + j * blockDim.x;
        if (idx < nvec) {
            Vec16<T> w, o;
            w.raw = __ldg(reinterpret_cast<const uint4*>(weight) + idx);
#pragma unroll
            for (int i = 0; i < VEC; ++i)
                o.v[i] = from_float<T>(to_float<T>(w.v[i]) * round_to<T>(to_float<T>(v[j].v[i]) * r));
            out[idx] = o.raw;
        }
    }
}

template <typename T, int NV>
__global__ void rms_norm_vec_kernel(T* __restrict__ out, int64_t out_stride, const T* __restrict__ x,
                                    int64_t x_stride, const T* __restrict__ weight, int hidden, float eps) {
    constexpr int VEC = Vec16<T>::VEC;
    __shared__ float red[33];
    const int nvec = hidden / VEC;
    const uint4* xr = reinterpret_cast<const uint4*>(x + blockIdx.x * x_stride);
    uint4* orow = reinterpret_cast<uint4*>(out + blockIdx.x * out_stride);
    Vec16<T> v[NV];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
        const int idx = threadIdx.x + j * blockDim.x;
        if (idx < nvec) {
            v[j].raw = xr[idx];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float f = to_float<T>(v[j].v[i]);
                ss += f * f;
            }
        }
    }
    write_normed<T, NV>(orow, v, weight, nvec, rsqrtf(block_sum(ss, red) / hidden + eps));
}

template <typename T, int NV>
__global__ void fused_add_rms_norm_vec_kernel(T* __restrict__ x, int64_t x_stride, T* __restrict__ residual,
                                              int64_t res_stride, const T* __restrict__ weight, int hidden,
                                              float eps) {
    constexpr int VEC = Vec16<T>::VEC;
    __shared__ float red[33];
    const int nvec = hidden / VEC;
    uint4* xr = reinterpret_cast<uint4*>(x + blockIdx.x * x_stride);
    uint4* rr = reinterpret_cast<uint4*>(residual + blockIdx.x * res_stride);
    Vec16<T> v[NV];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
        const int idx = threadIdx.x + j * blockDim.x;
        if (idx < nvec) {
            Vec16<T> a, b;
            a.raw = xr[idx];
            b.raw = rr[idx];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float f = round_to<T>(to_float<T>(a.v[i]) + to_float<T>(b.v[i]));
                v[j].v[i] = from_float<T>(f);
                ss += f * f;
            }
            rr[idx] = v[j].raw;
        }
    }
    write_normed<T, NV>(xr, v, weight, nvec, rsqrtf(block_sum(ss, red) / hidden + eps));
}

constexpr int kNormMaxThreads = 512;

// Vectors per thread of the vector kernels (1, 2 or 4: rows up to 4 * 512 * VEC elements), 0 = scalar kernel.
int norm_vectors_per_thread(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w) {
    const int64_t e = a.element_size(), hidden = a.size(1), vec = 16 / e;
    auto ok = [&](const at::Tensor& t) {
        return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * e) % 16 == 0;
    };
    if (hidden % vec != 0 || !ok(a) || !ok(b) || reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 != 0) return 0;
    const int64_t nv = (hidden / vec + kNormMaxThreads - 1) / kNormMaxThreads;
    return nv <= 1 ? 1 : nv <= 2 ? 2 : nv <= 4 ? 4 : 0;
}

int vec_threads(int64_t hidden, int64_t elem_size, int nv) {
    const int64_t nvec = hidden / (16 / elem_size);
    const int64_t t = ((nvec + nv - 1) / nv + 31) / 32 * 32;
    return static_cast<int>(std::max<int64_t>(32, t));
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

// x and `other` (out or residual): CUDA [T, H] with contiguous rows and one shape; weight [H]; one dtype.
void check_norm_args(const at::Tensor& x, const at::Tensor& other, const char* other_name, const at::Tensor& weight) {
    check_rows(x, "x");
    check_rows(other, other_name);
    TURBO_CHECK_CUDA_TENSOR(weight);
    TURBO_CHECK_CONTIGUOUS(weight);
    TORCH_CHECK(other.sizes() == x.sizes(), other_name, " must have x's shape");
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must be [H]");
    TORCH_CHECK(other.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(), "x, ",
                other_name, " and weight must share a dtype");
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_norm_args(x, out, "out", weight);
    const int rows = static_cast<int>(x.size(0)), hidden = static_cast<int>(x.size(1));
    if (rows == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    const int nv = norm_vectors_per_thread(x, out, weight);
    if (nv > 0) {
        const int threads = vec_threads(hidden, x.element_size(), nv);
        TURBO_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm", [&] {
            auto kernel = nv == 1 ? rms_norm_vec_kernel<scalar_t, 1>
                                  : nv == 2 ? rms_norm_vec_kernel<scalar_t, 2> : rms_norm_vec_kernel<scalar_t, 4>;
            kernel<<<rows, threads, 0, current_stream()>>>(
                reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0),
                reinterpret_cast<const scalar_t*>(x.data_ptr()), x.stride(0),
                reinterpret_cast<const scalar_t*>(weight.data_ptr()), hidden, static_cast<float>(eps));
        });
        TURBO_CHECK_LAUNCH();
        return;
    }
    TURBO_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm", [&] {
        rms_norm_kernel<scalar_t><<<rows, norm_threads(hidden), 0, current_stream()>>>(
            reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0),
            reinterpret_cast<const scalar_t*>(x.data_ptr()), x.stride(0),
            reinterpret_cast<const scalar_t*>(weight.data_ptr()), hidden, static_cast<float>(eps));
    });
    TURBO_CHECK_LAUNCH();
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
    check_norm_args(x, residual, "residual", weight);
    const int rows = static_cast<int>(x.size(0)), hidden = static_cast<int>(x.size(1));
    if (rows == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    const int nv = norm_vectors_per_thread(x, residual, weight);
    if (nv > 0) {
        const int threads = vec_threads(hidden, x.element_size(), nv);
        TURBO_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fused_add_rms_norm", [&] {
            auto kernel = nv == 1   ? fused_add_rms_norm_vec_kernel<scalar_t, 1>
                          : nv == 2 ? fused_add_rms_norm_vec_kernel<scalar_t, 2>
                                    : fused_add_rms_norm_vec_kernel<scalar_t, 4>;
            kernel<<<rows, threads, 0, current_stream()>>>(
                reinterpret_cast<scalar_t*>(x.data_ptr()), x.stride(0),
                reinterpret_cast<scalar_t*>(residual.data_ptr()), residual.stride(0),
                reinterpret_cast<const scalar_t*>(weight.data_ptr()), hidden, static_cast<float>(eps));
        });
        TURBO_CHECK_LAUNCH();
        return;
    }
    TURBO_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fused_add_rms_norm", [&] {
        fused_add_rms_norm_kernel<scalar_t><<<rows, norm_threads(hidden), 0, current_stream()>>>(
            reinterpret_cast<scalar_t*>(x.data_ptr()), x.stride(0), reinterpret_cast<scalar_t*>(residual.data_ptr()),
            residual.stride(0), reinterpret_cast<const scalar_t*>(weight.data_ptr()), hidden, static_cast<float>(eps));
    });
    TURBO_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace turbo
