// Shared pieces of the paged prefill kernels (prefill_attention.cu): tile constants, the K/V tile gather, and the
// shared-memory-accumulator kernel (CUDA cores for fp32, WMMA for fp16/bf16 when TURBO_PREFILL_REGISTER_ACC=0):
// S, P and the running output O pass through shared memory, since the WMMA accumulator layout is opaque.
#pragma once

#include <mma.h>

#include <type_traits>

#include "turbo/kernels/cuda/common.cuh"

namespace turbo {
namespace cuda {
namespace prefill_detail {

constexpr int kPrefillWarps = 4;
constexpr int kBlockM = 16 * kPrefillWarps;  // query rows per CTA
constexpr int kBlockN = 64;                  // keys per tile
constexpr float kLog2eP = 1.4426950408889634f;
#ifndef TURBO_PREFILL_PIPELINE
#define TURBO_PREFILL_PIPELINE 1  // cp.async double buffering of the K/V tiles (register-accumulator path)
#endif
#ifndef TURBO_PREFILL_REGISTER_ACC
#define TURBO_PREFILL_REGISTER_ACC 1  // 0: the shared-memory accumulator path for fp16/bf16 too
#endif

// The keys a 64-query tile of one sequence attends to, [begin, end) with begin on a tile boundary (causal, and the
// sliding window when window > 0).
struct KeySpan {
    int begin, end;
};

__device__ __forceinline__ KeySpan prefill_key_span(int ctx, int q_len, int m0, int window) {
    const int q_pos0 = ctx - q_len;
    const int last_pos = q_pos0 + min(q_len, m0 + kBlockM) - 1;  // last query position of the tile
    KeySpan s;
    s.end = min(ctx, last_pos + 1);
    s.begin = window > 0 ? max(0, q_pos0 + m0 - window + 1) / kBlockN * kBlockN : 0;
    return s;
}

// ... and where its kv head's rows sit in the paged cache.
struct PrefillKvRange {
    int begin, end;
    const int* table;    // the sequence's block table
    int64_t row_stride;  // elements from one token's row of the cache to the next
    int64_t head_off;    // the kv head's first element in a row
};

template <int HEAD_DIM>
__device__ __forceinline__ PrefillKvRange prefill_kv_range(int ctx, int q_len, int m0, int window, int kvh,
                                                           int num_kv_heads, const int* block_tables,
                                                           int64_t bt_stride, int b) {
    const KeySpan span = prefill_key_span(ctx, q_len, m0, window);
    PrefillKvRange r;
    r.begin = span.begin;
    r.end = span.end;
    r.table = block_tables + b * bt_stride;
    r.row_stride = static_cast<int64_t>(num_kv_heads) * HEAD_DIM;
    r.head_off = static_cast<int64_t>(kvh) * HEAD_DIM;
    return r;
}

// A launch's work list (prefill_plan_kernel in prefill_attention.cu): one item per (sequence, 64-query tile), as
// (sequence, first query row of the tile), the items with the most key tiles first; the grid has an entry per
// possible item (num_tokens / 64 + num_seqs), and the entries past the real ones are (-1, 0). Without it, a grid of
// (heads, max tiles, seqs) gave a batch of one long prompt and many short ones mostly empty CTAs.
constexpr int kPlanThreads = 1024;
constexpr int kPlanBins = kPlanThreads;  // key-tile counts; larger ones share the first bin

template <typename T, int HEAD_DIM>
struct PrefillSmem {
    static constexpr bool kWmma = !std::is_same<T, float>::value;
    static constexpr int PAD = kWmma ? 8 : 1;         // 16 bytes for WMMA rows; 1 float: no bank conflicts
    static constexpr int LDK = HEAD_DIM + PAD;        // Q, K, V rows (elements of T)
    static constexpr int LDS = kBlockN + 4;           // S rows (float)
    static constexpr int LDP = kBlockN + PAD;         // P rows (T)
    static constexpr int LDO = HEAD_DIM + 4;          // O rows (float)
    static constexpr size_t align(size_t x) { return (x + 127) / 128 * 128; }
    static constexpr size_t q_off = 0;
    static constexpr size_t k_off = align(q_off + sizeof(T) * kBlockM * LDK);
    static constexpr size_t v_off = align(k_off + sizeof(T) * kBlockN * LDK);
    static constexpr size_t s_off = align(v_off + sizeof(T) * kBlockN * LDK);
    static constexpr size_t p_off = align(s_off + sizeof(float) * kBlockM * LDS);
    static constexpr size_t o_off = align(p_off + sizeof(T) * kBlockM * LDP);
    static constexpr size_t a_off = align(o_off + sizeof(float) * kBlockM * LDO);
    static constexpr size_t bytes = align(a_off + sizeof(float) * kBlockM);
};

// Gathers `rows` rows of HEAD_DIM elements into smem (row stride LD); rows with tok outside [0, valid) are zeros.
template <typename T, int HEAD_DIM, int LD>
__device__ __forceinline__ void load_kv_tile(T* dst, const T* __restrict__ cache, const int* __restrict__ table,
                                             int n0, int valid, int block_size, int64_t row_stride,
                                             int64_t head_off) {
    if constexpr (!std::is_same<T, float>::value) {
        constexpr int U = 8;  // elements per uint4
        constexpr int PER_ROW = HEAD_DIM / U;
        for (int idx = threadIdx.x; idx < kBlockN * PER_ROW; idx += blockDim.x) {
            const int r = idx / PER_ROW, c = (idx - r * PER_ROW) * U;
            const int tok = n0 + r;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (tok < valid) {
                const int page = __ldg(table + tok / block_size);
                val = __ldg(reinterpret_cast<const uint4*>(
                    cache + (static_cast<int64_t>(page) * block_size + tok % block_size) * row_stride + head_off + c));
            }
            *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
        }
    } else {
        for (int idx = threadIdx.x; idx < kBlockN * HEAD_DIM; idx += blockDim.x) {
            const int r = idx / HEAD_DIM, c = idx - r * HEAD_DIM;
            const int tok = n0 + r;
            float val = 0.f;
            if (tok < valid) {
                const int page = __ldg(table + tok / block_size);
                val = __ldg(cache + (static_cast<int64_t>(page) * block_size + tok % block_size) * row_stride +
                            head_off + c);
            }
            dst[r * LD + c] = val;
        }
    }
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kPrefillWarps * 32)
    paged_prefill_kernel(T* __restrict__ out, int64_t out_stride_t, int64_t out_stride_h, const T* __restrict__ q,
                         int64_t q_stride_t, int64_t q_stride_h, const T* __restrict__ k_cache,
                         const T* __restrict__ v_cache, const int* __restrict__ block_tables, int64_t bt_stride,
                         const int2* __restrict__ items, const int* __restrict__ cu_seqlens_q,
                         const int* __restrict__ context_lens, int num_kv_heads, int group, int block_size,
                         int window, float scale) {
    using L = PrefillSmem<T, HEAD_DIM>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem + L::q_off);
    T* Ks = reinterpret_cast<T*>(smem + L::k_off);
    T* Vs = reinterpret_cast<T*>(smem + L::v_off);
    float* Ss = reinterpret_cast<float*>(smem + L::s_off);
    T* Ps = reinterpret_cast<T*>(smem + L::p_off);
    float* Os = reinterpret_cast<float*>(smem + L::o_off);
    float* As = reinterpret_cast<float*>(smem + L::a_off);

    const int2 item = items[blockIdx.y];
    if (item.x < 0) return;
    const int h = blockIdx.x, b = item.x, m0 = item.y;
    const int q_start = cu_seqlens_q[b];
    const int q_len = cu_seqlens_q[b + 1] - q_start;
    const int ctx = context_lens[b];
    const int q_pos0 = ctx - q_len;  // position of the chunk's first token
    const int kvh = h / group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // Q tile (rows past q_len are zeros) and O = 0.
    for (int idx = threadIdx.x; idx < kBlockM * HEAD_DIM; idx += blockDim.x) {
        const int r = idx / HEAD_DIM, c = idx - r * HEAD_DIM;
        Qs[r * L::LDK + c] =
            m0 + r < q_len ? q[(q_start + m0 + r) * q_stride_t + h * q_stride_h + c] : from_float<T>(0.f);
    }
    for (int idx = threadIdx.x; idx < kBlockM * L::LDO; idx += blockDim.x) Os[idx] = 0.f;

    const int r_local = lane >> 1;                 // row of this lane within the warp's 16 rows
    const int half = lane & 1;                     // which half of the tile's columns
    const int row = warp * 16 + r_local;           // row within the CTA tile
    const bool row_valid = m0 + row < q_len;
    const int q_pos = q_pos0 + m0 + row;
    float m_row = -INFINITY, l_row = 0.f;
    const float scale2 = scale * kLog2eP;

    const PrefillKvRange kv =
        prefill_kv_range<HEAD_DIM>(ctx, q_len, m0, window, kvh, num_kv_heads, block_tables, bt_stride, b);
    const int kv_begin = kv.begin, kv_end = kv.end;
    const int* table = kv.table;
    const int64_t row_stride = kv.row_stride, head_off = kv.head_off;
    float* Sw = Ss + warp * 16 * L::LDS;
    T* Pw = Ps + warp * 16 * L::LDP;
    float* Ow = Os + warp * 16 * L::LDO;
    const T* Qw = Qs + warp * 16 * L::LDK;

    for (int n0 = kv_begin; n0 < kv_end; n0 += kBlockN) {
        __syncthreads();  // the previous tile is consumed (and Q/O are initialised on the first pass)
        load_kv_tile<T, HEAD_DIM, L::LDK>(Ks, k_cache, table, n0, kv_end, block_size, row_stride, head_off);
        load_kv_tile<T, HEAD_DIM, L::LDK>(Vs, v_cache, table, n0, kv_end, block_size, row_stride, head_off);
        __syncthreads();

        // S = Q K^T for the warp's 16 rows.
        if constexpr (L::kWmma) {
            using namespace nvcuda;
#pragma unroll
            for (int j = 0; j < kBlockN / 16; ++j) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
                wmma::fill_fragment(s_frag, 0.f);
#pragma unroll
                for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
                    wmma::load_matrix_sync(a, Qw + kk * 16, L::LDK);
                    wmma::load_matrix_sync(bk, Ks + j * 16 * L::LDK + kk * 16, L::LDK);
                    wmma::mma_sync(s_frag, a, bk, s_frag);
                }
                wmma::store_matrix_sync(Sw + j * 16, s_frag, L::LDS, wmma::mem_row_major);
            }
        } else {
            for (int idx = lane; idx < 16 * kBlockN; idx += 32) {
                const int r = idx / kBlockN, c = idx - r * kBlockN;
                float d = 0.f;
#pragma unroll 8
                for (int x = 0; x < HEAD_DIM; ++x) {
                    d = fmaf(to_float<T>(Qw[r * L::LDK + x]), to_float<T>(Ks[c * L::LDK + x]), d);
                }
                Sw[r * L::LDS + c] = d;
            }
        }
        __syncwarp();

        // Online softmax: two lanes per row, 32 columns each.
        {
            float s[kBlockN / 2];
            float mx = -INFINITY;
#pragma unroll
            for (int i = 0; i < kBlockN / 2; ++i) {
                const int c = half * (kBlockN / 2) + i;
                const int k_pos = n0 + c;
                bool ok = row_valid && k_pos <= q_pos && k_pos < ctx;
                if (window > 0) ok = ok && k_pos > q_pos - window;
                s[i] = ok ? Sw[r_local * L::LDS + c] * scale2 : -INFINITY;
                mx = fmaxf(mx, s[i]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            const float m_new = fmaxf(m_row, mx);
            const float m_safe = m_new == -INFINITY ? 0.f : m_new;
            const float alpha = exp2f(m_row - m_safe);
            float psum = 0.f;
#pragma unroll
            for (int i = 0; i < kBlockN / 2; ++i) {
                const float p = exp2f(s[i] - m_safe);
                psum += p;
                Pw[r_local * L::LDP + half * (kBlockN / 2) + i] = from_float<T>(p);
            }
            psum += __shfl_xor_sync(0xffffffffu, psum, 1);
            l_row = l_row * alpha + psum;
            m_row = m_new;
            if (half == 0) As[row] = alpha;
        }
        __syncwarp();

        // O = O * alpha + P V.
        if constexpr (L::kWmma) {
            using namespace nvcuda;
            for (int idx = lane; idx < 16 * HEAD_DIM; idx += 32) {
                const int r = idx / HEAD_DIM, c = idx - r * HEAD_DIM;
                Ow[r * L::LDO + c] *= As[warp * 16 + r];
            }
            __syncwarp();
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa[kBlockN / 16];
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) wmma::load_matrix_sync(pa[kk], Pw + kk * 16, L::LDP);
#pragma unroll
            for (int j = 0; j < HEAD_DIM / 16; ++j) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
                wmma::load_matrix_sync(o_frag, Ow + j * 16, L::LDO, wmma::mem_row_major);
#pragma unroll
                for (int kk = 0; kk < kBlockN / 16; ++kk) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
                    wmma::load_matrix_sync(vb, Vs + kk * 16 * L::LDK + j * 16, L::LDK);
                    wmma::mma_sync(o_frag, pa[kk], vb, o_frag);
                }
                wmma::store_matrix_sync(Ow + j * 16, o_frag, L::LDO, wmma::mem_row_major);
            }
        } else {
            for (int idx = lane; idx < 16 * HEAD_DIM; idx += 32) {
                const int r = idx / HEAD_DIM, c = idx - r * HEAD_DIM;
                float o = Ow[r * L::LDO + c] * As[warp * 16 + r];
                for (int x = 0; x < kBlockN; ++x) {
                    o = fmaf(to_float<T>(Pw[r * L::LDP + x]), to_float<T>(Vs[x * L::LDK + c]), o);
                }
                Ow[r * L::LDO + c] = o;
            }
        }
        __syncwarp();
    }

    // out = O / l (l is held by both lanes of a row; publish it through As).
    __syncthreads();  // also orders the O initialisation when the tile had no keys
    if (half == 0) As[row] = l_row;
    __syncwarp();
    for (int idx = lane; idx < 16 * HEAD_DIM; idx += 32) {
        const int r = idx / HEAD_DIM, c = idx - r * HEAD_DIM;
        const int rr = warp * 16 + r;
        if (m0 + rr >= q_len) continue;
        const float l = As[rr];
        out[(q_start + m0 + rr) * out_stride_t + h * out_stride_h + c] =
            from_float<T>(l > 0.f ? Ow[r * L::LDO + c] / l : 0.f);
    }
}

}  // namespace prefill_detail
}  // namespace cuda
}  // namespace turbo
