// SiLU-and-multiply of the gated MLP: out = silu(gate) * up, with PyTorch's rounding (silu rounded to the dtype).
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
