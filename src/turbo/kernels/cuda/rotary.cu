// Neox-style (rotate-half) rotary embedding of q and k in place; fp32 arithmetic, one CTA per token. Where the rows
// allow it, each thread rotates 16 bytes of both halves (rotary_vec_kernel); the scalar kernel takes the rest.
// rotary_write_kv_kernel also stores the step's k and v into the paged cache (the model's one kernel between the
// QKV projection and attention).
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo {
namespace cuda {
namespace {

template <typename T, typename C, typename index_t>
__global__ void rotary_kernel(T* __restrict__ q, int64_t q_stride_t, int64_t q_stride_h, int num_q_heads,
                              T* __restrict__ k, int64_t k_stride_t, int64_t k_stride_h, int num_k_heads,
                              const index_t* __restrict__ positions, const C* __restrict__ cos_sin, int rot_dim) {
    const int t = blockIdx.x;
    const int half = rot_dim / 2;
    const C* cs = cos_sin + static_cast<int64_t>(positions[t]) * rot_dim;
    const int total = (num_q_heads + num_k_heads) * half;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        const int h = idx / half, i = idx - h * half;
        T* x = h < num_q_heads ? q + t * q_stride_t + h * q_stride_h
                               : k + t * k_stride_t + (h - num_q_heads) * k_stride_h;
        const float c = to_float<C>(cs[i]), s = to_float<C>(cs[half + i]);
        const float x1 = to_float<T>(x[i]), x2 = to_float<T>(x[i + half]);
        x[i] = from_float<T>(x1 * c - x2 * s);
        x[i + half] = from_float<T>(x2 * c + x1 * s);
    }
}

// Rotates dims i..i+V of both halves: a holds x[i..], b holds x[half + i..]; cos and sin point at their entries.
template <typename T, typename C>
__device__ __forceinline__ void rotate_pieces(Vec16<T>& a, Vec16<T>& b, const C* __restrict__ cos,
                                              const C* __restrict__ sin) {
#pragma unroll
    for (int e = 0; e < Vec16<T>::VEC; ++e) {
        const float c = to_float<C>(__ldg(cos + e)), s = to_float<C>(__ldg(sin + e));
        const float x1 = to_float<T>(a.v[e]), x2 = to_float<T>(b.v[e]);
        a.v[e] = from_float<T>(x1 * c - x2 * s);
        b.v[e] = from_float<T>(x2 * c + x1 * s);
    }
}

template <typename T, typename C, typename index_t>
__global__ void rotary_vec_kernel(T* __restrict__ q, int64_t q_stride_t, int64_t q_stride_h, int num_q_heads,
                                  T* __restrict__ k, int64_t k_stride_t, int64_t k_stride_h, int num_k_heads,
                                  const index_t* __restrict__ positions, const C* __restrict__ cos_sin, int rot_dim) {
    constexpr int V = Vec16<T>::VEC;
    const int t = blockIdx.x;
    const int half = rot_dim / 2, pieces = half / V;
    const C* cs = cos_sin + static_cast<int64_t>(positions[t]) * rot_dim;
    const int total = (num_q_heads + num_k_heads) * pieces;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        const int h = idx / pieces, i = (idx - h * pieces) * V;
        T* x = h < num_q_heads ? q + t * q_stride_t + h * q_stride_h
                               : k + t * k_stride_t + (h - num_q_heads) * k_stride_h;
        Vec16<T> a, b;
        a.raw = *reinterpret_cast<const uint4*>(x + i);
        b.raw = *reinterpret_cast<const uint4*>(x + i + half);
        rotate_pieces<T, C>(a, b, cs + i, cs + half + i);
        *reinterpret_cast<uint4*>(x + i) = a.raw;
        *reinterpret_cast<uint4*>(x + i + half) = b.raw;
    }
}

// rotary_vec_kernel and write_kv in one pass, for the common case (rot_dim == head_dim, 16-byte rows): the
// thread that rotates a piece of k also stores it into the cache, and the CTA's other threads copy v's pieces.
// The rotated k is written back into k as well, so the effect is that of the two kernels.
template <typename T, typename C, typename index_t>
__global__ void rotary_write_kv_kernel(T* __restrict__ q, int64_t q_stride_t, int64_t q_stride_h, int num_q_heads,
                                       T* __restrict__ k, int64_t k_stride_t, int64_t k_stride_h,
                                       const T* __restrict__ v, int64_t v_stride_t, int64_t v_stride_h,
                                       int num_kv_heads, const index_t* __restrict__ positions,
                                       const C* __restrict__ cos_sin, int head_dim, T* __restrict__ k_cache,
                                       T* __restrict__ v_cache, const int64_t* __restrict__ slots) {
    constexpr int V = Vec16<T>::VEC;
    const int t = blockIdx.x;
    const int half = head_dim / 2, pieces = half / V;
    const C* cs = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
    const int64_t slot = slots[t];  // < 0: a padding token, rotated but not cached
    const int64_t cache_row = slot * num_kv_heads * head_dim;
    const int rotate_items = (num_q_heads + num_kv_heads) * pieces;
    const int total = rotate_items + (slot >= 0 ? num_kv_heads * 2 * pieces : 0);
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        if (idx >= rotate_items) {  // v: a 16-byte piece to the cache
            const int j = idx - rotate_items, h = j / (2 * pieces), i = (j - h * 2 * pieces) * V;
            *reinterpret_cast<uint4*>(v_cache + cache_row + h * head_dim + i) =
                *reinterpret_cast<const uint4*>(v + t * v_stride_t + h * v_stride_h + i);
            continue;
        }
        const int h = idx / pieces, i = (idx - h * pieces) * V;
        const bool is_k = h >= num_q_heads;
        T* x = is_k ? k + t * k_stride_t + (h - num_q_heads) * k_stride_h : q + t * q_stride_t + h * q_stride_h;
        Vec16<T> a, b;
        a.raw = *reinterpret_cast<const uint4*>(x + i);
        b.raw = *reinterpret_cast<const uint4*>(x + i + half);
        rotate_pieces<T, C>(a, b, cs + i, cs + half + i);
        *reinterpret_cast<uint4*>(x + i) = a.raw;
        *reinterpret_cast<uint4*>(x + i + half) = b.raw;
        if (is_k && slot >= 0) {
            T* kc = k_cache + cache_row + (h - num_q_heads) * head_dim;
            *reinterpret_cast<uint4*>(kc + i) = a.raw;
            *reinterpret_cast<uint4*>(kc + i + half) = b.raw;
        }
    }
}

template <typename T, typename C>
void launch_rotary(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin,
                   int rot_dim) {
    const int tokens = static_cast<int>(q.size(0));
    const int hq = static_cast<int>(q.size(1)), hk = static_cast<int>(k.size(1));
    constexpr int V = Vec16<T>::VEC;
    const bool vec = (rot_dim / 2) % V == 0 && rows_aligned16(q) && rows_aligned16(k);
    const int items = (hq + hk) * rot_dim / 2 / (vec ? V : 1);
    const int threads = std::min(512, std::max(64, (items + 31) / 32 * 32));
    TURBO_DISPATCH_INDEX_TYPES(positions.scalar_type(), "rotary", [&] {
        auto kernel = vec ? rotary_vec_kernel<T, C, index_t> : rotary_kernel<T, C, index_t>;
        kernel<<<tokens, threads, 0, current_stream()>>>(
            reinterpret_cast<T*>(q.data_ptr()), q.stride(0), q.stride(1), hq, reinterpret_cast<T*>(k.data_ptr()),
            k.stride(0), k.stride(1), hk, positions.data_ptr<index_t>(),
            reinterpret_cast<const C*>(cos_sin.data_ptr()), rot_dim);
    });
}

template <typename T, typename C>
void launch_rotary_write_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                            const at::Tensor& cos_sin, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slots) {
    const int tokens = static_cast<int>(q.size(0)), head_dim = static_cast<int>(q.size(2));
    const int hq = static_cast<int>(q.size(1)), hk = static_cast<int>(k.size(1));
    const int items = (hq + 3 * hk) * head_dim / 2 / Vec16<T>::VEC;
    const int threads = std::min(512, std::max(64, (items + 31) / 32 * 32));
    TURBO_DISPATCH_INDEX_TYPES(positions.scalar_type(), "rotary_write_kv", [&] {
        rotary_write_kv_kernel<T, C, index_t><<<tokens, threads, 0, current_stream()>>>(
            reinterpret_cast<T*>(q.data_ptr()), q.stride(0), q.stride(1), hq, reinterpret_cast<T*>(k.data_ptr()),
            k.stride(0), k.stride(1), reinterpret_cast<const T*>(v.data_ptr()), v.stride(0), v.stride(1), hk,
            positions.data_ptr<index_t>(), reinterpret_cast<const C*>(cos_sin.data_ptr()), head_dim,
            reinterpret_cast<T*>(k_cache.data_ptr()), reinterpret_cast<T*>(v_cache.data_ptr()),
            slots.data_ptr<int64_t>());
    });
}

}  // namespace

void check_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                  const at::Tensor& cos_sin_cache) {
    TURBO_CHECK_CUDA_TENSOR(q);
    TURBO_CHECK_CUDA_TENSOR(k);
    TURBO_CHECK_CUDA_TENSOR(positions);
    TURBO_CHECK_CUDA_TENSOR(cos_sin_cache);
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q [T, Hq, D] and k [T, Hk, D]");
    TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "head rows of q and k must be contiguous");
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), "q and k must share T and D");
    TORCH_CHECK(positions.dim() == 1 && positions.size(0) == q.size(0), "positions must be [T]");
    TORCH_CHECK(positions.is_contiguous(), "positions must be contiguous");
    TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(), "cos_sin_cache must be [max_pos, rot_dim]");
    const int64_t rot_dim = cos_sin_cache.size(1);
    TORCH_CHECK(rot_dim % 2 == 0 && rot_dim <= q.size(2), "rot_dim must be even and <= head_dim");
    TORCH_CHECK(k.scalar_type() == q.scalar_type(), "q and k must share a dtype");
    TORCH_CHECK(cos_sin_cache.scalar_type() == at::ScalarType::Float || cos_sin_cache.scalar_type() == q.scalar_type(),
                "cos_sin_cache must be float32 or q's dtype");
}

void rotary(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin_cache) {
    check_rotary(q, k, positions, cos_sin_cache);
    const int rot_dim = static_cast<int>(cos_sin_cache.size(1));
    if (q.size(0) == 0) return;
    const c10::cuda::CUDAGuard guard(q.device());
    TURBO_DISPATCH_FLOAT_TYPES(q.scalar_type(), "rotary", [&] {
        if (cos_sin_cache.scalar_type() == at::ScalarType::Float) {
            launch_rotary<scalar_t, float>(q, k, positions, cos_sin_cache, rot_dim);
        } else {
            launch_rotary<scalar_t, scalar_t>(q, k, positions, cos_sin_cache, rot_dim);
        }
    });
    TURBO_CHECK_LAUNCH();
}

void rotary_write_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     const at::Tensor& cos_sin_cache, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& slot_mapping) {
    check_rotary(q, k, positions, cos_sin_cache);
    check_write_kv(k, v, k_cache, v_cache, slot_mapping);
    constexpr int kVecBytes = 16;
    const bool fused = cos_sin_cache.size(1) == q.size(2) && (q.size(2) / 2 * q.element_size()) % kVecBytes == 0 &&
                       rows_aligned16(q) && rows_aligned16(k) && rows_aligned16(v) && rows_aligned16(k_cache) &&
                       rows_aligned16(v_cache) && slot_mapping.scalar_type() == at::ScalarType::Long;
    if (!fused) {  // partial rotary, odd strides or int32 slots: the two kernels
        rotary(q, k, positions, cos_sin_cache);
        write_kv(k, v, k_cache, v_cache, slot_mapping);
        return;
    }
    if (q.size(0) == 0) return;
    const c10::cuda::CUDAGuard guard(q.device());
    TURBO_DISPATCH_FLOAT_TYPES(q.scalar_type(), "rotary_write_kv", [&] {
        if (cos_sin_cache.scalar_type() == at::ScalarType::Float) {
            launch_rotary_write_kv<scalar_t, float>(q, k, v, positions, cos_sin_cache, k_cache, v_cache,
                                                    slot_mapping);
        } else {
            launch_rotary_write_kv<scalar_t, scalar_t>(q, k, v, positions, cos_sin_cache, k_cache, v_cache,
                                                       slot_mapping);
        }
    });
    TURBO_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace turbo
