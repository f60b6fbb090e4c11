// Paged prefill attention (chunked prefill): causal attention of each sequence's new tokens over its whole
// context in the paged cache. FlashAttention-2 shaped: CTA (query head, 64-query tile, seq), 4 warps of 16 query
// rows each, K/V tiles of 64 tokens gathered from the pages into shared memory (cp.async, double-buffered).
// fp16/bf16: S = Q K^T and O += P V on tensor cores (WMMA 16x16x16, fp32 accumulation) with S, P and O in
// registers; fp32: the shared-memory kernel of prefill_attention_smem.cuh on CUDA cores (exact fp32 products).
// Online softmax in the log2 domain, fp32 statistics. A one-CTA planning kernel first lists the launch's (sequence,
// query tile) items, longest key range first, so the grid has no empty tiles of short prompts and the long tiles
// start first.
#include "turbo/kernels/cuda/cuda_kernels.h"
#include "turbo/kernels/cuda/prefill_attention_smem.cuh"

namespace turbo {
namespace cuda {
namespace {

using namespace prefill_detail;

// fp16/bf16 path with S, P and O in registers (FlashAttention-2 style). It relies on the register layout of the
// WMMA 16x16x16 fragments on sm_80+ (two m16n8k16 HMMAs): element i of an fp32 accumulator and of a 16-bit
// row-major matrix_a fragment both sit at row g + 8 * ((i >> 1) & 1), column 2 * t + (i & 1) + 8 * (i >> 2)
// (g = lane / 4, t = lane % 4), so S's accumulator becomes P's A operand element for element, and O's rows can
// be rescaled in registers. The tests check this against the reference on every shape.
//
// Shared memory: STAGES K tiles, then STAGES V tiles. With two stages the Q tile goes into the second K buffer (the
// first prefetch overwrites it, after the warps hold Q in registers), which keeps a CTA at 70 KB: three fit an SM.
// The output tile is staged in the first K buffer for coalesced 16-byte stores.
template <typename T, int HEAD_DIM>
struct PrefillMmaSmem {
    static constexpr int LDK = HEAD_DIM + 8;
    static constexpr int STAGES = TURBO_PREFILL_PIPELINE ? 2 : 1;  // K/V tile buffers (cp.async double buffering)
    static_assert(kBlockM == kBlockN, "the Q and output tiles reuse K buffers");
    static constexpr size_t tile = sizeof(T) * kBlockN * LDK;
    static constexpr size_t bytes = 2 * STAGES * tile + (STAGES == 2 ? 0 : tile);
};

// Issues the asynchronous gather of one K and one V tile (16-bit types: 8 elements per copy).
template <typename T, int HEAD_DIM, int LD>
__device__ __forceinline__ void issue_kv_tile(T* ks, T* vs, const T* __restrict__ k_cache,
                                              const T* __restrict__ v_cache, const int* __restrict__ table, int n0,
                                              int valid, int block_size, int64_t row_stride, int64_t head_off) {
    constexpr int PER_ROW = HEAD_DIM / 8;
    for (int idx = threadIdx.x; idx < kBlockN * PER_ROW; idx += blockDim.x) {
        const int r = idx / PER_ROW, c = (idx - r * PER_ROW) * 8;
        const int tok = n0 + r;
        int64_t off = 0;
        int bytes = 0;
        if (tok < valid) {
            const int page = __ldg(table + tok / block_size);
            off = (static_cast<int64_t>(page) * block_size + tok % block_size) * row_stride + head_off + c;
            bytes = 16;
        }
        cp_async16(ks + r * LD + c, k_cache + off, bytes);
        cp_async16(vs + r * LD + c, v_cache + off, bytes);
    }
}

#ifndef TURBO_PREFILL_MIN_CTAS
#define TURBO_PREFILL_MIN_CTAS 1  // CTAs per SM the register budget is built for (smem allows 3 with two stages)
#endif

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kPrefillWarps * 32, TURBO_PREFILL_MIN_CTAS)
    paged_prefill_mma_kernel(T* __restrict__ out, int64_t out_stride_t, int64_t out_stride_h,
                             const T* __restrict__ q, int64_t q_stride_t, int64_t q_stride_h,
                             const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                             const int* __restrict__ block_tables, int64_t bt_stride, const int2* __restrict__ items,
                             const int* __restrict__ cu_seqlens_q, const int* __restrict__ context_lens,
                             int num_kv_heads, int group, int block_size, int window, float scale) {
    using namespace nvcuda;
    using L = PrefillMmaSmem<T, HEAD_DIM>;
    constexpr int LDK = L::LDK;
    extern __shared__ __align__(128) unsigned char smem[];
    T* Kbuf = reinterpret_cast<T*>(smem);  // STAGES K tiles, then STAGES V tiles
    T* Vbuf = Kbuf + L::STAGES * kBlockN * LDK;
    T* Qs = L::STAGES == 2 ? Kbuf + kBlockN * LDK : Vbuf + kBlockN * LDK;

    const int2 item = items[blockIdx.y];
    if (item.x < 0) return;
    const int h = blockIdx.x, b = item.x, m0 = item.y;
    const int q_start = cu_seqlens_q[b];
    const int q_len = cu_seqlens_q[b + 1] - q_start;
    const int ctx = context_lens[b];
    const int q_pos0 = ctx - q_len;
    const int kvh = h / group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;

    const PrefillKvRange kv =
        prefill_kv_range<HEAD_DIM>(ctx, q_len, m0, window, kvh, num_kv_heads, block_tables, bt_stride, b);
    const int kv_begin = kv.begin, kv_end = kv.end;
    const int* table = kv.table;
    const int64_t row_stride = kv.row_stride, head_off = kv.head_off;

    // The Q tile and the first K/V tile go in flight together, so the CTA waits for memory once before its
    // first tile instead of twice (this matters for short prompts, whose CTAs see one to a few K/V tiles).
    const T* q_tile = q + (q_start + m0) * q_stride_t + h * q_stride_h;
    const bool q_vec = TURBO_PREFILL_PIPELINE && reinterpret_cast<uintptr_t>(q) % 16 == 0 && q_stride_t % 8 == 0 &&
                       q_stride_h % 8 == 0;
    for (int idx = threadIdx.x; idx < kBlockM * (HEAD_DIM / 8); idx += blockDim.x) {
        const int r = idx / (HEAD_DIM / 8), c = (idx - r * (HEAD_DIM / 8)) * 8;
        const bool ok = m0 + r < q_len;
        if (q_vec) {
            cp_async16(Qs + r * LDK + c, ok ? q_tile + r * q_stride_t + c : q, ok ? 16 : 0);
            continue;
        }
        T vals[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) vals[i] = ok ? q_tile[r * q_stride_t + c + i] : from_float<T>(0.f);
#pragma unroll
        for (int i = 0; i < 8; ++i) Qs[r * LDK + c + i] = vals[i];
    }
#if TURBO_PREFILL_PIPELINE
    if (kv_begin < kv_end) {
        issue_kv_tile<T, HEAD_DIM, LDK>(Kbuf, Vbuf, k_cache, v_cache, table, kv_begin, kv_end, block_size,
                                        row_stride, head_off);
    }
    cp_async_commit();
    cp_async_wait<0>();  // Q (and K/V tile 0: the loop's first wait finds it landed)
#endif
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa[HEAD_DIM / 16];
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) wmma::load_matrix_sync(qa[kk], Qs + warp * 16 * LDK + kk * 16, LDK);
    if constexpr (L::STAGES == 2) __syncthreads();  // Q is in registers: the first prefetch may overwrite it
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[HEAD_DIM / 16];
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 16; ++n) wmma::fill_fragment(o[n], 0.f);

    const int row0 = m0 + warp * 16 + g;  // this lane's two rows: row0 and row0 + 8 (within the sequence's chunk)
    const bool ok_row[2] = {row0 < q_len, row0 + 8 < q_len};
    const int qp[2] = {q_pos0 + row0, q_pos0 + row0 + 8};
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};  // l: this lane's partial sums
    const float scale2 = scale * kLog2eP;

    for (int n0 = kv_begin, it = 0; n0 < kv_end; n0 += kBlockN, ++it) {
#if TURBO_PREFILL_PIPELINE
        const int buf = it & 1;
        const T* Ks = Kbuf + buf * kBlockN * LDK;
        const T* Vs = Vbuf + buf * kBlockN * LDK;
        if (n0 + kBlockN < kv_end) {  // prefetch the next tile into the other buffer (freed by the last barrier)
            issue_kv_tile<T, HEAD_DIM, LDK>(Kbuf + (buf ^ 1) * kBlockN * LDK, Vbuf + (buf ^ 1) * kBlockN * LDK,
                                            k_cache, v_cache, table, n0 + kBlockN, kv_end, block_size, row_stride,
                                            head_off);
        }
        cp_async_commit();
        cp_async_wait<1>();  // everything but the prefetch just issued has landed
        __syncthreads();
#else
        T* Ks = Kbuf;
        T* Vs = Vbuf;
        (void)it;
        __syncthreads();
        load_kv_tile<T, HEAD_DIM, LDK>(Ks, k_cache, table, n0, kv_end, block_size, row_stride, head_off);
        load_kv_tile<T, HEAD_DIM, LDK>(Vs, v_cache, table, n0, kv_end, block_size, row_stride, head_off);
        __syncthreads();
#endif

        wmma::fragment<wmma::accumulator, 16, 16, 16, float> s[kBlockN / 16];
#pragma unroll
        for (int j = 0; j < kBlockN / 16; ++j) {
            wmma::fill_fragment(s[j], 0.f);
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
                wmma::load_matrix_sync(bk, Ks + j * 16 * LDK + kk * 16, LDK);
                wmma::mma_sync(s[j], qa[kk], bk, s[j]);
            }
        }
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < kBlockN / 16; ++j) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int hi = (i >> 1) & 1;
                const int k_pos = n0 + j * 16 + 2 * t4 + (i & 1) + 8 * (i >> 2);
                bool ok = ok_row[hi] && k_pos <= qp[hi] && k_pos < ctx;
                if (window > 0) ok = ok && k_pos > qp[hi] - window;
                const float v = ok ? s[j].x[i] * scale2 : -INFINITY;
                s[j].x[i] = v;
                mx[hi] = fmaxf(mx[hi], v);
            }
        }
        float alpha[2], ms[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m_r[r], mx[r]);
            ms[r] = m_new == -INFINITY ? 0.f : m_new;
            alpha[r] = exp2f(m_r[r] - ms[r]);
            m_r[r] = m_new;
            l_r[r] *= alpha[r];
        }
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa[kBlockN / 16];
#pragma unroll
        for (int j = 0; j < kBlockN / 16; ++j) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int hi = (i >> 1) & 1;
                const float p = exp2f(s[j].x[i] - ms[hi]);
                l_r[hi] += p;
                pa[j].x[i] = from_float<T>(p);
            }
        }
#pragma unroll
        for (int n = 0; n < HEAD_DIM / 16; ++n) {
#pragma unroll
            for (int i = 0; i < 8; ++i) o[n].x[i] *= alpha[(i >> 1) & 1];
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
                wmma::load_matrix_sync(vb, Vs + kk * 16 * LDK + n * 16, LDK);
                wmma::mma_sync(o[n], pa[kk], vb, o[n]);
            }
        }
#if TURBO_PREFILL_PIPELINE
        __syncthreads();  // every warp is done with this buffer before the next iteration prefetches into it
#endif
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 1);
        l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 2);
    }
    // O / l through shared memory (the first K buffer, free once every warp is past the last tile), then out in
    // 16-byte row pieces.
    __syncthreads();
    T* Os = Kbuf;
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 16; ++n) {
#pragma unroll
        for (int i = 0; i < 8; i += 2) {
            const int hi = (i >> 1) & 1;
            const float inv = l_r[hi] > 0.f ? 1.f / l_r[hi] : 0.f;
            const int col = n * 16 + 2 * t4 + 8 * (i >> 2);
            T* dst = Os + (warp * 16 + g + 8 * hi) * LDK + col;
            dst[0] = from_float<T>(o[n].x[i] * inv);
            dst[1] = from_float<T>(o[n].x[i + 1] * inv);
        }
    }
    __syncthreads();
    T* out_tile = out + (q_start + m0) * out_stride_t + h * out_stride_h;
    const bool out_vec = reinterpret_cast<uintptr_t>(out) % 16 == 0 && out_stride_t % 8 == 0 && out_stride_h % 8 == 0;
    for (int idx = threadIdx.x; idx < kBlockM * (HEAD_DIM / 8); idx += blockDim.x) {
        const int r = idx / (HEAD_DIM / 8), c = (idx - r * (HEAD_DIM / 8)) * 8;
        if (m0 + r >= q_len) continue;
        if (out_vec) {
            *reinterpret_cast<uint4*>(out_tile + r * out_stride_t + c) = *reinterpret_cast<const uint4*>(Os + r * LDK + c);
            continue;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) out_tile[r * out_stride_t + c + e] = Os[r * LDK + c + e];
    }
}

// Lists a launch's (sequence, query tile) items, most key tiles first (a counting sort by key-tile count, one CTA
// of kPlanThreads), and marks the rest of the grid's entries (-1, 0). See kPlanThreads in prefill_attention_smem.cuh.
__device__ __forceinline__ int plan_bin(int ctx, int q_len, int m0, int window) {
    const KeySpan span = prefill_key_span(ctx, q_len, m0, window);
    const int key_tiles = (span.end - span.begin + kBlockN - 1) / kBlockN;
    return kPlanBins - 1 - min(max(key_tiles, 0), kPlanBins - 1);
}

__global__ void __launch_bounds__(kPlanThreads)
    prefill_plan_kernel(int2* __restrict__ items, int capacity, const int* __restrict__ cu_seqlens_q,
                        const int* __restrict__ context_lens, int num_seqs, int window) {
    __shared__ int bins[kPlanBins];
    __shared__ int warp_sums[kPlanThreads / 32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    bins[tid] = 0;
    __syncthreads();
    for (int b = tid; b < num_seqs; b += kPlanThreads) {
        const int q_len = cu_seqlens_q[b + 1] - cu_seqlens_q[b], ctx = context_lens[b];
        for (int m0 = 0; m0 < q_len; m0 += kBlockM) atomicAdd(&bins[plan_bin(ctx, q_len, m0, window)], 1);
    }
    __syncthreads();
    // Exclusive scan of the bins: each bin's first slot.
    const int count = bins[tid];
    int incl = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int w = warp_sums[lane];
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, w, d);
            if (lane >= d) w += v;
        }
        warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const int total = warp_sums[kPlanThreads / 32 - 1];
    bins[tid] = incl - count + (warp > 0 ? warp_sums[warp - 1] : 0);
    __syncthreads();
    for (int b = tid; b < num_seqs; b += kPlanThreads) {
        const int q_len = cu_seqlens_q[b + 1] - cu_seqlens_q[b], ctx = context_lens[b];
        for (int m0 = 0; m0 < q_len; m0 += kBlockM) {
            const int pos = atomicAdd(&bins[plan_bin(ctx, q_len, m0, window)], 1);
            if (pos < capacity) items[pos] = make_int2(b, m0);
        }
    }
    for (int i = total + tid; i < capacity; i += kPlanThreads) items[i] = make_int2(-1, 0);
}

template <typename T, int HEAD_DIM>
void launch_prefill(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                    int64_t max_query_len, float scale, int window) {
    constexpr bool kRegs = TURBO_PREFILL_REGISTER_ACC && !std::is_same<T, float>::value;
    auto kernel = paged_prefill_kernel<T, HEAD_DIM>;
    size_t smem_bytes = PrefillSmem<T, HEAD_DIM>::bytes;
    if constexpr (kRegs) {
        kernel = paged_prefill_mma_kernel<T, HEAD_DIM>;
        smem_bytes = PrefillMmaSmem<T, HEAD_DIM>::bytes;
    }
    TURBO_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
    const int num_heads = static_cast<int>(q.size(1)), num_kv_heads = static_cast<int>(k_cache.size(2));
    const int num_seqs = static_cast<int>(block_tables.size(0));
    // Sum over sequences of ceil(q_len / 64) <= num_tokens / 64 + num_seqs.
    const int64_t capacity = q.size(0) / kBlockM + num_seqs;
    TORCH_CHECK(capacity <= 65535, "paged_attention_prefill: too many query tiles (", capacity, ")");
    at::Tensor items = at::empty({capacity, 2}, q.options().dtype(at::kInt));
    auto* item_ptr = reinterpret_cast<int2*>(items.data_ptr<int>());
    prefill_plan_kernel<<<1, kPlanThreads, 0, current_stream()>>>(item_ptr, static_cast<int>(capacity),
                                                                  cu_seqlens_q.data_ptr<int>(),
                                                                  context_lens.data_ptr<int>(), num_seqs, window);
    TURBO_CHECK_LAUNCH();
    dim3 grid(num_heads, static_cast<unsigned>(capacity));
    kernel<<<grid, kPrefillWarps * 32, smem_bytes, current_stream()>>>(
        reinterpret_cast<T*>(out.data_ptr()), out.stride(0), out.stride(1),
        reinterpret_cast<const T*>(q.data_ptr()), q.stride(0), q.stride(1),
        reinterpret_cast<const T*>(k_cache.data_ptr()), reinterpret_cast<const T*>(v_cache.data_ptr()),
        block_tables.data_ptr<int>(), block_tables.stride(0), item_ptr, cu_seqlens_q.data_ptr<int>(),
        context_lens.data_ptr<int>(), num_kv_heads, num_heads / num_kv_heads, static_cast<int>(k_cache.size(1)),
        window, scale);
    TURBO_CHECK_LAUNCH();
}

}  // namespace

void paged_attention_prefill(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens, int64_t max_query_len,
                             double scale, int64_t window) {
    for (const at::Tensor* t :
         std::initializer_list<const at::Tensor*>{&out, &q, &k_cache, &v_cache, &block_tables, &cu_seqlens_q,
                                                  &context_lens})
        TURBO_CHECK_CUDA_TENSOR(*t);
    check_paged_attention_args(out, q, k_cache, v_cache);
    const int64_t head_dim = q.size(2);
    TURBO_CHECK_DTYPE(block_tables, at::kInt);
    TURBO_CHECK_DTYPE(cu_seqlens_q, at::kInt);
    TURBO_CHECK_DTYPE(context_lens, at::kInt);
    const int64_t num_seqs = block_tables.size(0);
    TORCH_CHECK(block_tables.dim() == 2 && block_tables.stride(1) == 1, "block_tables must be [num_seqs, max_blocks]");
    TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == num_seqs + 1 && cu_seqlens_q.is_contiguous(),
                "cu_seqlens_q must be [num_seqs + 1]");
    TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == num_seqs && context_lens.is_contiguous(),
                "context_lens must be [num_seqs]");
    TORCH_CHECK(num_seqs <= 65535 && q.size(1) <= 65535, "too many sequences or heads");
    if (q.size(0) == 0 || num_seqs == 0 || max_query_len <= 0) return;
    const c10::cuda::CUDAGuard guard(q.device());
    TURBO_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_attention_prefill", [&] {
        if (head_dim == 64) {
            launch_prefill<scalar_t, 64>(out, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                         max_query_len, static_cast<float>(scale), static_cast<int>(window));
        } else {
            launch_prefill<scalar_t, 128>(out, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                          max_query_len, static_cast<float>(scale), static_cast<int>(window));
        }
    });
}

}  // namespace cuda
}  // namespace turbo
