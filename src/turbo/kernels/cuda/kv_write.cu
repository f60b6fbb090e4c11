// Scatter of the new tokens' K and V into the paged cache: one CTA per token, 16-byte copies when aligned.
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo {
namespace cuda {
namespace {

// Copies the [heads, head_dim] rows of token blockIdx.x; U is the copy unit (uint4 or the element type),
// `dim` counts U units per head row and strides are in U units.
template <typename U, typename index_t>
__global__ void write_kv_kernel(const U* __restrict__ k, int64_t k_stride_t, int64_t k_stride_h,
                                const U* __restrict__ v, int64_t v_stride_t, int64_t v_stride_h,
                                U* __restrict__ k_cache, U* __restrict__ v_cache, const index_t* __restrict__ slots,
                                int heads, int dim) {
    const int64_t slot = static_cast<int64_t>(slots[blockIdx.x]);
    if (slot < 0) return;  // padding token
    const int64_t row = static_cast<int64_t>(heads) * dim;
    U* kc = k_cache + slot * row;  // [num_blocks, block_size] flattened: slot * (heads * dim)
    U* vc = v_cache + slot * row;
    const U* kt = k + blockIdx.x * k_stride_t;
    const U* vt = v + blockIdx.x * v_stride_t;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
        const int h = i / dim, d = i - h * dim;
        kc[i] = kt[h * k_stride_h + d];
        vc[i] = vt[h * v_stride_h + d];
    }
}

template <typename U, typename index_t>
void launch(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
            const at::Tensor& slots, int units) {
    const int tokens = static_cast<int>(k.size(0)), heads = static_cast<int>(k.size(1));
    const int dim = static_cast<int>(k.size(2)) / units;
    const int threads = std::min(256, std::max(32, (heads * dim + 31) / 32 * 32));
    write_kv_kernel<U, index_t><<<tokens, threads, 0, current_stream()>>>(
        reinterpret_cast<const U*>(k.data_ptr()), k.stride(0) / units, k.stride(1) / units,
        reinterpret_cast<const U*>(v.data_ptr()), v.stride(0) / units, v.stride(1) / units,
        reinterpret_cast<U*>(k_cache.data_ptr()), reinterpret_cast<U*>(v_cache.data_ptr()),
        slots.data_ptr<index_t>(), heads, dim);
}

bool aligned16(const at::Tensor& t) {  // rows [T, H, D] (D contiguous)
    const int64_t e = t.element_size();
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * e) % 16 == 0 &&
           (t.stride(1) * e) % 16 == 0 && (t.size(2) * e) % 16 == 0;
}

bool ptr_aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

void check_write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &k_cache, &v_cache, &slot_mapping})
        TURBO_CHECK_CUDA_TENSOR(*t);
    TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k and v must be [T, Hk, D]");
    TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "head rows of k and v must be contiguous");
    TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "caches must be [blocks, bs, Hk, D]");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
    TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "cache heads/dim must match k");
    TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                    v_cache.scalar_type() == k_cache.scalar_type(),
                "k, v and the caches must share a dtype");
    TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) && slot_mapping.is_contiguous(),
                "slot_mapping must be [T]");
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
    check_write_kv(k, v, k_cache, v_cache, slot_mapping);
    if (k.size(0) == 0) return;
    const c10::cuda::CUDAGuard guard(k.device());
    const bool vec = aligned16(k) && aligned16(v) && ptr_aligned16(k_cache) && ptr_aligned16(v_cache);
    TURBO_DISPATCH_INDEX_TYPES(slot_mapping.scalar_type(), "write_kv", [&] {
        if (vec) {
            launch<uint4, index_t>(k, v, k_cache, v_cache, slot_mapping, static_cast<int>(16 / k.element_size()));
        } else {
            TURBO_DISPATCH_FLOAT_TYPES(k.scalar_type(), "write_kv", [&] {
                launch<scalar_t, index_t>(k, v, k_cache, v_cache, slot_mapping, 1);
            });
        }
    });
    TURBO_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace turbo
