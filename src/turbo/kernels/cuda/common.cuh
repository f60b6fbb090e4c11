// Shared helpers of the turbo CUDA kernels: dtype dispatch, conversions, vector access, reductions.
#pragma once

#include <ATen/ATen.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h (which pulls in cuBLAS/cuSPARSE/cuSOLVER): same stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#define TURBO_CUDA_CHECK(expr)                                                                     \
    do {                                                                                           \
        cudaError_t turbo_err_ = (expr);                                                           \
        TORCH_CHECK(turbo_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(turbo_err_));    \
    } while (0)

// Check the launch just made on this thread (cheap: no device sync).
#define TURBO_CHECK_LAUNCH() TURBO_CUDA_CHECK(cudaGetLastError())

#define TURBO_CHECK_CUDA_TENSOR(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
#define TURBO_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define TURBO_CHECK_DTYPE(t, dt) TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", dt, ", got ", (t).scalar_type())

// Runs the body with `scalar_t` bound to float, __half or __nv_bfloat16 (the CUDA types of fp32/fp16/bf16).
#define TURBO_DISPATCH_FLOAT_TYPES(dtype, name, ...)                                               \
    [&] {                                                                                          \
        switch (dtype) {                                                                           \
            case at::ScalarType::Float: {                                                          \
                using scalar_t = float;                                                            \
                return __VA_ARGS__();                                                              \
            }                                                                                      \
            case at::ScalarType::Half: {                                                           \
                using scalar_t = __half;                                                           \
                return __VA_ARGS__();                                                              \
            }                                                                                      \
            case at::ScalarType::BFloat16: {                                                       \
                using scalar_t = __nv_bfloat16;                                                    \
                return __VA_ARGS__();                                                              \
            }                                                                                      \
            default:                                                                               \
                TORCH_CHECK(false, name, ": unsupported dtype ", dtype, " (float32, float16, bfloat16)"); \
        }                                                                                          \
    }()

// Runs the body with `index_t` bound to int32_t or int64_t.
#define TURBO_DISPATCH_INDEX_TYPES(dtype, name, ...)                                               \
    [&] {                                                                                          \
        switch (dtype) {                                                                           \
            case at::ScalarType::Int: {                                                            \
                using index_t = int32_t;                                                           \
                return __VA_ARGS__();                                                              \
            }                                                                                      \
            case at::ScalarType::Long: {                                                           \
                using index_t = int64_t;                                                           \
                return __VA_ARGS__();                                                              \
            }                                                                                      \
            default:                                                                               \
                TORCH_CHECK(false, name, ": index dtype must be int32 or int64, got ", dtype);     \
        }                                                                                          \
    }()

namespace turbo {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Round through T (what a PyTorch op of dtype T stores), back as float.
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float<T>(from_float<T>(x)); }

// 16 bytes of T: VEC elements, loaded/stored as one uint4.
template <typename T>
struct Vec16 {
    static constexpr int VEC = 16 / sizeof(T);
    union {
        uint4 raw;
        T v[VEC];
    };
};

template <typename T>
__device__ __forceinline__ void load16_to_float(const T* ptr, float* out) {
    Vec16<T> pk;
    pk.raw = __ldg(reinterpret_cast<const uint4*>(ptr));
#pragma unroll
    for (int i = 0; i < Vec16<T>::VEC; ++i) out[i] = to_float<T>(pk.v[i]);
}

// A 16-byte piece read once (weights of a decode step): past L1, which keeps what is read again.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// 16-byte global -> shared copy that bypasses registers; src_bytes 0 writes zeros (what lies past the operand).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// c += a b for one mma.sync m16n8k16 tile of T (bf16 or fp16; a row-major, b column-major), fp32 accumulators.
// a0..a3 and b0, b1 are the PTX fragment registers (two T each).
#define TURBO_MMA_M16N8K16(ab)                                                                              \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ab "." ab ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "    \
                 "{%8,%9}, {%0,%1,%2,%3};\n"                                                                \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                           \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        TURBO_MMA_M16N8K16("bf16");
    } else {
        static_assert(std::is_same<T, __half>::value, "mma_m16n8k16 takes bf16 or fp16");
        TURBO_MMA_M16N8K16("f16");
    }
}
#undef TURBO_MMA_M16N8K16

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum (blockDim.x a multiple of 32, <= 1024); every thread gets the result. Uses 33 floats of smem.
__device__ __forceinline__ float block_sum(float v, float* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // smem may still be read from a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? smem[lane] : 0.f;
    t = warp_sum(t);
    return t;
}

__device__ __forceinline__ float block_max(float v, float* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? smem[lane] : -INFINITY;
    return warp_max(t);
}

// The current stream of the current device (= at::cuda::getCurrentCUDAStream()).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Whether 16-byte vector loads can read t's rows: its data and every stride but the last on 16-byte boundaries.
inline bool rows_aligned16(const at::Tensor& t) {
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    for (int64_t d = 0; d + 1 < t.dim(); ++d) {
        if ((t.stride(d) * t.element_size()) % 16 != 0) return false;
    }
    return true;
}

// Host-side argument checks of rotary and write_kv (cuda_kernels.h), shared with rotary_write_kv.
void check_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                  const at::Tensor& cos_sin_cache);
void check_write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping);

// Host-side checks shared by the paged attention launchers (decode and prefill): q/out [rows, heads, head_dim]
// with contiguous head rows, caches [blocks, block_size, kv_heads, head_dim], one dtype, head_dim 64 or 128.
inline void check_paged_attention_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache) {
    TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [rows, num_heads, head_dim]");
    TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "head rows of q and out must be contiguous");
    TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "caches must be [blocks, bs, Hkv, D]");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
    TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type() &&
                    out.scalar_type() == q.scalar_type(),
                "q, out and the caches must share a dtype");
    const int64_t head_dim = q.size(2);
    TORCH_CHECK(head_dim == 64 || head_dim == 128, "head_dim must be 64 or 128, got ", head_dim);
    TORCH_CHECK(k_cache.size(3) == head_dim, "cache head_dim must match q");
    TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
}

}  // namespace cuda
}  // namespace turbo
