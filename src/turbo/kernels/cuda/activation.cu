// SiLU-and-multiply of the gated MLP: out = silu(gate) * up, with PyTorch's rounding (silu rounded to the dtype).
// Aligned rows take 16-byte vectors (one per thread); others the scalar kernel.
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo {
namespace cuda {
namespace {

template <typename T>
__global__ void silu_mul_kernel(T* __restrict__ out, int64_t out_stride, const T* __restrict__ gate_up,
                                int64_t in_stride, int inter) {
    const T* gate = gate_up + blockIdx.x * in_stride;
    const T* up = gate + inter;
    T* orow = out + blockIdx.x * out_stride;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < inter; i += gridDim.y * blockDim.x) {
        const float g = to_float<T>(gate[i]);
        const float s = round_to<T>(g / (1.f + expf(-g)));
        orow[i] = from_float<T>(s * to_float<T>(up[i]));
    }
}

// 16-byte vectors (inter a multiple of VEC, rows 16-byte aligned): thread i of the row takes gate/up vector i.
template <typename T>
__global__ void silu_mul_vec_kernel(T* __restrict__ out, int64_t out_stride, const T* __restrict__ gate_up,
                                    int64_t in_stride, int inter) {
    constexpr int VEC = Vec16<T>::VEC;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= inter / VEC) return;
    const uint4* gate = reinterpret_cast<const uint4*>(gate_up + blockIdx.x * in_stride);
    const uint4* up = reinterpret_cast<const uint4*>(gate_up + blockIdx.x * in_stride + inter);
    Vec16<T> g, u, o;
    g.raw = gate[i];
    u.raw = up[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const float gf = to_float<T>(g.v[j]);
        o.v[j] = from_float<T>(round_to<T>(gf / (1.f + expf(-gf))) * to_float<T>(u.v[j]));
    }
    reinterpret_cast<uint4*>(out + blockIdx.x * out_stride)[i] = o.raw;
}

}  // namespace

void silu_mul(at::Tensor& out, const at::Tensor& gate_up) {
    TURBO_CHECK_CUDA_TENSOR(gate_up);
    TURBO_CHECK_CUDA_TENSOR(out);
    TORCH_CHECK(gate_up.dim() == 2 && out.dim() == 2, "gate_up [T, 2I] and out [T, I]");
    TORCH_CHECK(gate_up.stride(1) == 1 && out.stride(1) == 1, "rows must be contiguous");
    TORCH_CHECK(gate_up.size(0) == out.size(0) && gate_up.size(1) == 2 * out.size(1), "gate_up must be [T, 2I]");
    TORCH_CHECK(out.scalar_type() == gate_up.scalar_type(), "out and gate_up must share a dtype");
    const int64_t rows = out.size(0);
    const int inter = static_cast<int>(out.size(1));
    if (rows == 0 || inter == 0) return;
    const c10::cuda::CUDAGuard guard(out.device());
    const int threads = 256;
    const int vec = 16 / static_cast<int>(out.element_size());
    if (inter % vec == 0 && rows_aligned16(out) && rows_aligned16(gate_up)) {
        dim3 vgrid(static_cast<unsigned>(rows), ceil_div(inter / vec, threads));
        TURBO_DISPATCH_FLOAT_TYPES(out.scalar_type(), "silu_mul", [&] {
            silu_mul_vec_kernel<scalar_t><<<vgrid, threads, 0, current_stream()>>>(
                reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0),
                reinterpret_cast<const scalar_t*>(gate_up.data_ptr()), gate_up.stride(0), inter);
        });
        TURBO_CHECK_LAUNCH();
        return;
    }
    dim3 grid(static_cast<unsigned>(rows), std::min(ceil_div(inter, threads), 64));
    TURBO_DISPATCH_FLOAT_TYPES(out.scalar_type(), "silu_mul", [&] {
        silu_mul_kernel<scalar_t><<<grid, threads, 0, current_stream()>>>(
            reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0),
            reinterpret_cast<const scalar_t*>(gate_up.data_ptr()), gate_up.stride(0), inter);
    });
    TURBO_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace turbo
