// Paged decode attention (one query token per sequence): flash-decoding split-K + merge, GQA-aware.
//
// Two kernels share the split ranges, the workspace layout and the merge:
//   - paged_decode_mma_kernel (bf16/fp16 caches with power-of-two blocks, the default): the query heads of a KV
//     head as the rows/columns of mma.sync m16n8k16 tensor-core tiles; see its comment below.
//   - paged_decode_split_kernel (fp32, other block sizes, or TURBO_DECODE_MMA=0): CUDA-core dot products. A
//     "token group" of TPT = head_dim / VEC lanes holds one K/V row of one token in 16-byte pieces (VEC elements
//     per lane); a warp holds 32 / TPT token groups. Each token group runs its own online softmax (in the log2
//     domain) over its tokens for all GROUP query heads of the KV head, so K/V are read once per group of heads;
//     the token groups are merged through shared memory at the end.
// CTA (split, kv head [x head chunk], seq), 4 warps. With one split the CTA writes the output; otherwise it writes
// (acc, m, l) to the workspace and a merge kernel combines the splits. A split of a sequence covers
// max(ctx / splits, 128) tokens of its own context, so ragged batches keep the CTAs busy; the splits past a short
// context exit at once, and a sequence that needs one split writes its output directly (the merge skips it).
// A step may also pass a device int, min_split_tokens (decode_min_split_tokens of its total context): contexts
// up to about that long then stay in one split, however many splits the grid has, and longer ones split into
// pieces about that long, so a CUDA graph's split count (fixed for the longest context it may see) costs only
// the empty CTAs when the step's batch is already large enough to fill the GPU.
// Nothing here syncs with the host or allocates: CUDA-graph friendly for a fixed num_splits.
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

namespace turbo {
namespace cuda {
namespace {

constexpr int kDecodeWarps = 4;
#ifndef TURBO_DECODE_CTAS_PER_SM
#define TURBO_DECODE_CTAS_PER_SM 4  // split CTAs per SM that decode_num_splits aims for
#endif
#ifndef TURBO_DECODE_CHUNK
#define TURBO_DECODE_CHUNK 4  // tokens per token group per step (loads in flight) for groups of <= 4 heads
#endif
constexpr float kLog2e = 1.4426950408889634f;
// Fewest tokens a split takes: a CUDA graph fixes num_splits for the longest context it may see, so a short
// context leaves its last splits empty (they exit at once) instead of spreading a few tokens over every split.
constexpr int kMinSplitTokens = 128;
// Most tokens a split aims at: in a ragged batch (a few long contexts among many short ones) one CTA per sequence
// leaves the long ones running alone at the end of the kernel. TURBO_DECODE_SPLIT_TOKENS overrides it (for
// comparisons: on uniform contexts at batch 64 fewer splits were faster, see NOTES_turbo_cuda.md).
constexpr int kMaxSplitTokens = 512;
// Most CTAs per SM a launch may have: splits past a short context still cost a launch slot each.
constexpr int kMaxCtasPerSm = 64;

// How a launch splits each sequence's context: the grid's split count, the sliding window (0: none) and, where
// the step supplies one (CUDA graphs do, from the step's context lengths), a device int `min_tokens`: the fewest
// tokens a split should take so that the batch's CTAs balance without splitting what need not be split.
struct DecodeSplit {
    int num_splits;
    int window;
    const int* min_tokens;  // nullptr: kMinSplitTokens only
};

// Tokens [begin, end) of one split of a sequence, and how many of its splits hold tokens (at least one: the first
// split of an empty context writes its zeros).
struct SplitRange {
    int begin, end, used;
};

// With a hint (*sp.min_tokens), a context of n hint-sized pieces takes round(n) splits (at least one), so a
// uniform batch whose contexts are each about one hint long stays whole.
__device__ __forceinline__ SplitRange split_range(int ctx, const DecodeSplit& sp, int split) {
    const int hint = sp.min_tokens ? __ldg(sp.min_tokens) : 0;
    const int start = sp.window > 0 ? max(0, ctx - sp.window) : 0;
    const int len = max(ctx - start, 0);
    int per = max((len + sp.num_splits - 1) / sp.num_splits, kMinSplitTokens);
    if (hint > per) {
        const int pieces = max(1, (len + hint / 2) / hint);
        per = max(per, (len + pieces - 1) / pieces);
    }
    return {start + min(len, split * per), start + min(len, (split + 1) * per), max(1, (len + per - 1) / per)};
}

template <typename T, int HEAD_DIM>
struct DecodeShape {
    static constexpr int VEC = 16 / sizeof(T);                   // elements per lane per row
    static constexpr int TPT = HEAD_DIM / VEC;                   // lanes per token
    static constexpr int TPW = 32 / TPT;                         // token groups per warp
    static constexpr int NGROUPS = kDecodeWarps * TPW;           // token groups per CTA
    static_assert(TPT >= 1 && TPT <= 32 && 32 % TPT == 0, "head_dim / VEC must divide 32");
};

// Combines the partial softmax states of a CTA's NG token groups (or warps) for its nh query heads, then writes
// the sequence's output (one split) or the split's (acc, m, l) to the workspace. Called by every thread after the
// groups' states are in shared memory.
template <typename T, int HEAD_DIM, int NG, int ROWS>
__device__ __forceinline__ void store_cta_output(const float (*s_acc)[ROWS][HEAD_DIM], const float (*s_m)[ROWS],
                                                 const float (*s_l)[ROWS], int nh, int h0, int seq, int split,
                                                 int used, T* __restrict__ out, int64_t out_stride_s,
                                                 int64_t out_stride_h, float* __restrict__ ws_acc,
                                                 float* __restrict__ ws_m, float* __restrict__ ws_l, int num_heads,
                                                 int num_splits) {
    for (int idx = threadIdx.x; idx < nh * HEAD_DIM; idx += blockDim.x) {
        const int h = idx / HEAD_DIM, d = idx - h * HEAD_DIM;
        float mx = -INFINITY;
#pragma unroll
        for (int g = 0; g < NG; ++g) mx = fmaxf(mx, s_m[g][h]);
        const float m_safe = mx == -INFINITY ? 0.f : mx;
        float lsum = 0.f, a = 0.f;
#pragma unroll
        for (int g = 0; g < NG; ++g) {
            const float w = exp2f(s_m[g][h] - m_safe);
            lsum = fmaf(s_l[g][h], w, lsum);
            a = fmaf(s_acc[g][h][d], w, a);
        }
        const int head = h0 + h;
        if (used == 1) {
            out[seq * out_stride_s + head * out_stride_h + d] = from_float<T>(lsum > 0.f ? a / lsum : 0.f);
        } else {
            const int64_t row = (static_cast<int64_t>(seq) * num_heads + head) * num_splits + split;
            ws_acc[row * HEAD_DIM + d] = a;
            if (d == 0) {
                ws_m[row] = mx;
                ws_l[row] = lsum;
            }
        }
    }
}

template <typename T, int HEAD_DIM, int GROUP, int CHUNK>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    paged_decode_split_kernel(T* __restrict__ out, int64_t out_stride_s, int64_t out_stride_h,
                              const T* __restrict__ q, int64_t q_stride_s, int64_t q_stride_h,
                              const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                              const int* __restrict__ block_tables, int64_t bt_stride,
                              const int* __restrict__ context_lens, float* __restrict__ ws_acc,
                              float* __restrict__ ws_m, float* __restrict__ ws_l, int num_heads, int num_kv_heads,
                              int group, int head_chunks, int block_size, DecodeSplit sp, float scale) {
    using S = DecodeShape<T, HEAD_DIM>;
    constexpr int VEC = S::VEC, TPT = S::TPT, NGROUPS = S::NGROUPS;
    __shared__ float s_acc[NGROUPS][GROUP][HEAD_DIM];
    __shared__ float s_m[NGROUPS][GROUP];
    __shared__ float s_l[NGROUPS][GROUP];

    const int split = blockIdx.x;
    const int kvh = blockIdx.y / head_chunks;
    const int chunk = blockIdx.y - kvh * head_chunks;
    const int seq = blockIdx.z;
    const int h0 = kvh * group + chunk * GROUP;                  // first query head of this CTA
    const int nh = min(GROUP, group - chunk * GROUP);            // query heads of this CTA
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % TPT;                                  // lane within the token group
    const int gid = warp * S::TPW + lane / TPT;                  // token group in the CTA
    const int d0 = sub * VEC;

    const SplitRange range = split_range(context_lens[seq], sp, split);
    if (split >= range.used) return;  // uniform over the CTA
    const int tb = range.begin, te = range.end;

    // q of every head of the CTA, pre-scaled into the log2 domain.
    float qf[GROUP][VEC];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            qf[h][i] = h < nh ? to_float<T>(q[seq * q_stride_s + (h0 + h) * q_stride_h + d0 + i]) * scale * kLog2e
                              : 0.f;
        }
    }

    float m[GROUP], l[GROUP], acc[GROUP][VEC];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[h][i] = 0.f;
    }

    const int* table = block_tables + seq * bt_stride;
    const int64_t row_stride = static_cast<int64_t>(num_kv_heads) * HEAD_DIM;  // one token slot
    const int64_t head_off = static_cast<int64_t>(kvh) * HEAD_DIM + d0;

    for (int base = tb; base < te; base += NGROUPS * CHUNK) {  // uniform over the CTA (shuffles below)
        Vec16<T> kr[CHUNK], vr[CHUNK];
        bool valid[CHUNK];
#pragma unroll
        for (int c = 0; c < CHUNK; ++c) {
            const int tok = base + c * NGROUPS + gid;
            valid[c] = tok < te;
            if (valid[c]) {
                const int page = __ldg(table + tok / block_size);
                const int64_t slot = static_cast<int64_t>(page) * block_size + tok % block_size;
                const int64_t off = slot * row_stride + head_off;
                kr[c].raw = __ldg(reinterpret_cast<const uint4*>(k_cache + off));
                vr[c].raw = __ldg(reinterpret_cast<const uint4*>(v_cache + off));
            } else {
                kr[c].raw = make_uint4(0, 0, 0, 0);
                vr[c].raw = make_uint4(0, 0, 0, 0);
            }
        }
        float s[CHUNK][GROUP];
#pragma unroll
        for (int c = 0; c < CHUNK; ++c) {
            float kf[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) kf[i] = to_float<T>(kr[c].v[i]);
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
                float d = 0.f;
#pragma unroll
                for (int i = 0; i < VEC; ++i) d = fmaf(qf[h][i], kf[i], d);
                s[c][h] = d;
            }
        }
#pragma unroll
        for (int o = TPT / 2; o > 0; o >>= 1) {
#pragma unroll
            for (int c = 0; c < CHUNK; ++c) {
#pragma unroll
                for (int h = 0; h < GROUP; ++h) s[c][h] += __shfl_xor_sync(0xffffffffu, s[c][h], o);
            }
        }
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
            float mx = m[h];
#pragma unroll
            for (int c = 0; c < CHUNK; ++c) {
                if (!valid[c]) s[c][h] = -INFINITY;
                mx = fmaxf(mx, s[c][h]);
            }
            const float m_safe = mx == -INFINITY ? 0.f : mx;
            const float alpha = exp2f(m[h] - m_safe);
            float p[CHUNK];
            float psum = 0.f;
#pragma unroll
            for (int c = 0; c < CHUNK; ++c) {
                p[c] = exp2f(s[c][h] - m_safe);
                psum += p[c];
            }
            l[h] = l[h] * alpha + psum;
            m[h] = mx;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                float a = acc[h][i] * alpha;
#pragma unroll
                for (int c = 0; c < CHUNK; ++c) a = fmaf(p[c], to_float<T>(vr[c].v[i]), a);
                acc[h][i] = a;
            }
        }
    }

    // Merge the token groups of the CTA.
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        if (sub == 0) {
            s_m[gid][h] = m[h];
            s_l[gid][h] = l[h];
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) s_acc[gid][h][d0 + i] = acc[h][i];
    }
    __syncthreads();
    store_cta_output<T, HEAD_DIM, NGROUPS, GROUP>(s_acc, s_m, s_l, nh, h0, seq, split, range.used, out, out_stride_s,
                                                  out_stride_h, ws_acc, ws_m, ws_l, num_heads, sp.num_splits);
}

// ---------------------------------------------------------------- tensor-core variant (bf16 / fp16)
//
// CTA (split, kv head [x head chunk], seq), 4 warps, up to 8 query heads of one KV head. A warp takes 16-token
// tiles of the split in turn and runs its own online softmax with mma.sync m16n8k16:
//   - S = Q K^T with the heads as the A rows (rows 8..15 are zero): two n-tiles of 8 tokens;
//   - O^T += V^T P^T with the head dims as the A rows and the heads as the 8 columns: S's accumulators are
//     P^T's B fragment as they stand (lane (g, t) holds head g, tokens 2t, 2t + 1 and 2t + 8, 2t + 9), so P never
//     leaves the registers, and no accumulator row is padding.
// K and V go from global memory straight into fragments, as 16-byte loads, with no shared memory: the head dims of
// a k-step are permuted the same way for Q and K (lane t of a quad holds dims 32i + 8t .. +8 of its token), and the
// dims of V^T's m-tiles so that lane g holds dims 64r + 8g .. +8 of its four tokens; a byte permute (prmt) pairs
// two tokens' halves into one A register. The warps' states are merged through shared memory at the end.

// Two floats as one register of two T (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ void unpack16(const uint4& x, uint32_t* w) { w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w; }

constexpr int kMmaHeads = 8;  // query heads a CTA of the tensor-core kernel takes (the mma's n)
constexpr int kMmaTile = 16;  // tokens a warp takes at a time (the mma's k)
// Resident CTAs per SM the tensor-core kernel is built for: 4 caps it at 128 registers (a 40-byte spill) where
// it would take 158 and fit 3. Measured on an H200 (bench_turbo_cuda_attention.py, block 64, batch 64 to 1,024,
// contexts 128 to 4,096): 1-16% faster, median 3.7%, the most at short contexts.
constexpr int kMmaCtasPerSm = 4;

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kDecodeWarps * 32, kMmaCtasPerSm)
    paged_decode_mma_kernel(T* __restrict__ out, int64_t out_stride_s, int64_t out_stride_h,
                            const T* __restrict__ q, int64_t q_stride_s, int64_t q_stride_h,
                            const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            const int* __restrict__ block_tables, int64_t bt_stride,
                            const int* __restrict__ context_lens, float* __restrict__ ws_acc,
                            float* __restrict__ ws_m, float* __restrict__ ws_l, int num_heads, int num_kv_heads,
                            int group, int head_chunks, int block_shift, DecodeSplit sp, float scale) {
    constexpr int KQ = HEAD_DIM / 32;  // 16-byte K loads per lane per token
    constexpr int KW = HEAD_DIM / 8;   // their 32-bit words: two per k-step
    constexpr int VR = HEAD_DIM / 64;  // 16-byte V loads per lane per token
    constexpr int MT = HEAD_DIM / 16;  // m-tiles of O^T
    static_assert(VR >= 1 && HEAD_DIM % 64 == 0, "head_dim must be a multiple of 64");
    __shared__ float s_acc[kDecodeWarps][kMmaHeads][HEAD_DIM];
    __shared__ float s_m[kDecodeWarps][kMmaHeads];
    __shared__ float s_l[kDecodeWarps][kMmaHeads];

    const int split = blockIdx.x;
    const int kvh = blockIdx.y / head_chunks;
    const int chunk = blockIdx.y - kvh * head_chunks;
    const int seq = blockIdx.z;
    const int h0 = kvh * group + chunk * kMmaHeads;
    const int nh = min(kMmaHeads, group - chunk * kMmaHeads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;  // fragment coordinates: group of four lanes, lane in the group

    const int* table = block_tables + seq * bt_stride;
    // Q and the block table's first line go out with the context length (the three loads do not wait on each
    // other); a split past the context then wasted one Q load, but a short context's CTA waits for memory
    // once less before its first K/V tile.
    uint32_t qa[KW];
#pragma unroll
    for (int i = 0; i < KQ; ++i) {
        uint4 x = make_uint4(0, 0, 0, 0);
        if (g < nh) {
            x = __ldg(reinterpret_cast<const uint4*>(q + seq * q_stride_s + (h0 + g) * q_stride_h + 32 * i + 8 * t));
        }
        unpack16(x, qa + 4 * i);
    }
    if (threadIdx.x == 0) asm volatile("prefetch.global.L1 [%0];" ::"l"(table));
    const SplitRange range = split_range(context_lens[seq], sp, split);
    if (split >= range.used) return;  // uniform over the CTA
    const int tb = range.begin, te = range.end;

    const float qk_scale = scale * kLog2e;
    // O^T: o[mt][0..1] = dim d(mt, g) of heads 2t, 2t + 1; o[mt][2..3] = dim d(mt, g + 8), with d(mt, r) the dim
    // of element mt (r < 8) or MT + mt (r >= 8) of lane r % 8's V words.
    float o[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m = -INFINITY, l = 0.f;  // head g's running max and (this lane's columns') sum

    const int64_t row_stride = static_cast<int64_t>(num_kv_heads) * HEAD_DIM;
    const int64_t head_off = static_cast<int64_t>(kvh) * HEAD_DIM;
    const int block_mask = (1 << block_shift) - 1;
    auto token_offset = [&](int tok) {
        const int64_t page = __ldg(table + (tok >> block_shift));
        return ((page << block_shift) + (tok & block_mask)) * row_stride + head_off;
    };

    for (int base = tb + warp * kMmaTile; base < te; base += kDecodeWarps * kMmaTile) {
        // K rows of tokens base + g (n-tile 0) and base + 8 + g (n-tile 1); V rows of base + 2t + {0, 1, 8, 9}.
        // Tokens past the split are zeros, never read (the cache past a context may hold anything).
        uint32_t kr[2][KW], vr[4][4 * VR];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int tok = base + 8 * j + g;
            const T* src = k_cache + (tok < te ? token_offset(tok) : 0) + 8 * t;
#pragma unroll
            for (int i = 0; i < KQ; ++i) {
                unpack16(tok < te ? __ldg(reinterpret_cast<const uint4*>(src + 32 * i)) : make_uint4(0, 0, 0, 0),
                         kr[j] + 4 * i);
            }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int tok = base + 2 * t + (e & 1) + 8 * (e >> 1);
            const T* src = v_cache + (tok < te ? token_offset(tok) : 0) + 8 * g;
#pragma unroll
            for (int r = 0; r < VR; ++r) {
                unpack16(tok < te ? __ldg(reinterpret_cast<const uint4*>(src + 64 * r)) : make_uint4(0, 0, 0, 0),
                         vr[e] + 4 * r);
            }
        }

        // S = Q K^T: s[j][0..1] = head g, tokens base + 8j + 2t + {0, 1} (s[j][2..3]: the zero rows).
        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
                mma_m16n8k16<T>(s[j], qa[2 * ks], 0u, qa[2 * ks + 1], 0u, kr[j][2 * ks], kr[j][2 * ks + 1]);
            }
        }

        // Online softmax over the tile (log2 domain); the four lanes of group g hold head g's 16 columns.
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[j][e] = base + 8 * j + 2 * t + e < te ? s[j][e] * qk_scale : -INFINITY;
                mx = fmaxf(mx, s[j][e]);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m, mx);  // finite: token `base` is in every tile
        const float alpha = exp2f(m - m_new);
        m = m_new;
        const float p00 = exp2f(s[0][0] - m_new), p01 = exp2f(s[0][1] - m_new);
        const float p10 = exp2f(s[1][0] - m_new), p11 = exp2f(s[1][1] - m_new);
        l = l * alpha + (p00 + p01 + p10 + p11);

        // O^T's columns are heads 2t and 2t + 1: their rescale factors live in groups 2t and 2t + 1.
        const float alpha_lo = __shfl_sync(0xffffffffu, alpha, 8 * t);
        const float alpha_hi = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
        const uint32_t pb0 = pack2<T>(p00, p01), pb1 = pack2<T>(p10, p11);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            o[i][0] *= alpha_lo, o[i][1] *= alpha_hi, o[i][2] *= alpha_lo, o[i][3] *= alpha_hi;
            // A = V^T: rows d(i, g) and d(i, g + 8), k = the tile's tokens 2t, 2t + 1 (and + 8).
            const int wl = 4 * (i / 8) + (i % 8) / 2, wh = 4 * ((MT + i) / 8) + ((MT + i) % 8) / 2;
            const uint32_t sel = (i & 1) ? 0x7632u : 0x5410u;
            mma_m16n8k16<T>(o[i], __byte_perm(vr[0][wl], vr[1][wl], sel), __byte_perm(vr[0][wh], vr[1][wh], sel),
                            __byte_perm(vr[2][wl], vr[3][wl], sel), __byte_perm(vr[2][wh], vr[3][wh], sel), pb0,
                            pb1);
        }
    }

    // Head g's sum over the group's columns; then the warps' states to shared memory.
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (g < nh && t == 0) s_m[warp][g] = m, s_l[warp][g] = l;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int e_lo = i, e_hi = MT + i;  // element of lane g's V words
        const int d_lo = 64 * (e_lo / 8) + 8 * g + e_lo % 8, d_hi = 64 * (e_hi / 8) + 8 * g + e_hi % 8;
        if (2 * t < nh) s_acc[warp][2 * t][d_lo] = o[i][0], s_acc[warp][2 * t][d_hi] = o[i][2];
        if (2 * t + 1 < nh) s_acc[warp][2 * t + 1][d_lo] = o[i][1], s_acc[warp][2 * t + 1][d_hi] = o[i][3];
    }
    __syncthreads();
    store_cta_output<T, HEAD_DIM, kDecodeWarps, kMmaHeads>(s_acc, s_m, s_l, nh, h0, seq, split, range.used, out,
                                                           out_stride_s, out_stride_h, ws_acc, ws_m, ws_l,
                                                           num_heads, sp.num_splits);
}

template <typename T, int HEAD_DIM>
__global__ void paged_decode_merge_kernel(T* __restrict__ out, int64_t out_stride_s, int64_t out_stride_h,
                                          const float* __restrict__ ws_acc, const float* __restrict__ ws_m,
                                          const float* __restrict__ ws_l, const int* __restrict__ context_lens,
                                          int num_heads, DecodeSplit sp) {
    const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
    const int used = split_range(context_lens[seq], sp, 0).used;
    const int num_splits = sp.num_splits;
    if (used == 1) return;  // the split kernel wrote this sequence's output
    const int64_t row0 = (static_cast<int64_t>(seq) * num_heads + head) * num_splits;
    float mx = -INFINITY;
    for (int s = 0; s < used; ++s) mx = fmaxf(mx, ws_m[row0 + s]);
    const float m_safe = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f, a = 0.f;
    for (int s = 0; s < used; ++s) {
        const float w = exp2f(ws_m[row0 + s] - m_safe);
        lsum = fmaf(ws_l[row0 + s], w, lsum);
        a = fmaf(ws_acc[(row0 + s) * HEAD_DIM + d], w, a);
    }
    out[seq * out_stride_s + head * out_stride_h + d] = from_float<T>(lsum > 0.f ? a / lsum : 0.f);
}

// The workspace's parts: acc [rows, HEAD_DIM], then m [rows], then l [rows], rows = seqs * heads * splits.
struct DecodeWorkspace {
    float *acc, *m, *l;
    DecodeWorkspace(float* ws, int64_t rows, int64_t head_dim)
        : acc(ws), m(ws ? ws + rows * head_dim : nullptr), l(ws ? m + rows : nullptr) {}
};

// Launches a split kernel (both take the same parameters; `block` is the block size for the CUDA-core kernel and
// its log2 for the tensor-core one) over CTAs of heads_per_cta query heads, then the merge of the splits.
template <typename T, int HEAD_DIM, typename Kernel>
void launch_split_and_merge(Kernel kernel, int heads_per_cta, int block, at::Tensor& out, const at::Tensor& q,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, float scale, DecodeSplit sp, float* ws_ptr) {
    const int num_splits = sp.num_splits;
    const int num_seqs = static_cast<int>(q.size(0)), num_heads = static_cast<int>(q.size(1));
    const int num_kv_heads = static_cast<int>(k_cache.size(2));
    const int group = num_heads / num_kv_heads;
    const int head_chunks = (group + heads_per_cta - 1) / heads_per_cta;
    const DecodeWorkspace ws(ws_ptr, static_cast<int64_t>(num_seqs) * num_heads * num_splits, HEAD_DIM);
    T* o = reinterpret_cast<T*>(out.data_ptr());
    dim3 grid(num_splits, num_kv_heads * head_chunks, num_seqs);
    kernel<<<grid, kDecodeWarps * 32, 0, current_stream()>>>(
        o, out.stride(0), out.stride(1), reinterpret_cast<const T*>(q.data_ptr()), q.stride(0), q.stride(1),
        reinterpret_cast<const T*>(k_cache.data_ptr()), reinterpret_cast<const T*>(v_cache.data_ptr()),
        block_tables.data_ptr<int>(), block_tables.stride(0), context_lens.data_ptr<int>(), ws.acc, ws.m, ws.l,
        num_heads, num_kv_heads, group, head_chunks, block, sp, scale);
    TURBO_CHECK_LAUNCH();
    if (num_splits == 1) return;
    paged_decode_merge_kernel<T, HEAD_DIM><<<dim3(num_heads, num_seqs), HEAD_DIM, 0, current_stream()>>>(
        o, out.stride(0), out.stride(1), ws.acc, ws.m, ws.l, context_lens.data_ptr<int>(), num_heads, sp);
    TURBO_CHECK_LAUNCH();
}

template <typename T, int HEAD_DIM, int GROUP>
void launch_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, float scale, DecodeSplit sp,
                   float* ws) {
    constexpr int CHUNK = GROUP >= 8 ? 2 : TURBO_DECODE_CHUNK;
    launch_split_and_merge<T, HEAD_DIM>(paged_decode_split_kernel<T, HEAD_DIM, GROUP, CHUNK>, GROUP,
                                        static_cast<int>(k_cache.size(1)), out, q, k_cache, v_cache, block_tables,
                                        context_lens, scale, sp, ws);
}

template <typename T, int HEAD_DIM>
void launch_decode_mma(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& context_lens, float scale, DecodeSplit sp,
                       float* ws) {
    launch_split_and_merge<T, HEAD_DIM>(paged_decode_mma_kernel<T, HEAD_DIM>, kMmaHeads,
                                        __builtin_ctz(static_cast<unsigned>(k_cache.size(1))), out, q, k_cache,
                                        v_cache, block_tables, context_lens, scale, sp, ws);
}

// The tensor-core kernel takes bf16/fp16 caches with power-of-two blocks and q rows it can read in 16-byte pieces
// (the fused QKV output's views are); TURBO_DECODE_MMA=0 forces the CUDA-core kernel (for comparisons).
bool use_mma_kernel(const at::Tensor& q, int64_t block_size) {
    static const bool enabled = [] {
        const char* env = std::getenv("TURBO_DECODE_MMA");
        return env == nullptr || std::string(env) != "0";
    }();
    return enabled && q.scalar_type() != at::kFloat && rows_aligned16(q) && block_size > 0 &&
           (block_size & (block_size - 1)) == 0;
}

template <typename T, int HEAD_DIM>
void dispatch_group(int group, at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& context_lens,
                    float scale, DecodeSplit sp, float* ws) {
    if constexpr (!std::is_same<T, float>::value) {
        if (use_mma_kernel(q, k_cache.size(1))) {
            launch_decode_mma<T, HEAD_DIM>(out, q, k_cache, v_cache, block_tables, context_lens, scale, sp, ws);
            return;
        }
    }
    if (group <= 1) {
        launch_decode<T, HEAD_DIM, 1>(out, q, k_cache, v_cache, block_tables, context_lens, scale, sp, ws);
    } else if (group <= 2) {
        launch_decode<T, HEAD_DIM, 2>(out, q, k_cache, v_cache, block_tables, context_lens, scale, sp, ws);
    } else {
        // Groups > 4 take several CTAs of 4 heads: adjacent in the grid, they read the same K/V mostly from L2.
        // (One CTA of 8 heads needs ~254 registers and ran at half the bandwidth on an H100.)
        launch_decode<T, HEAD_DIM, 4>(out, q, k_cache, v_cache, block_tables, context_lens, scale, sp, ws);
    }
}

}  // namespace

int64_t decode_workspace_size(int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t num_splits) {
    if (num_splits <= 1) return 0;
    return num_seqs * num_heads * num_splits * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

int64_t decode_num_splits(int64_t num_seqs, int64_t num_kv_heads, int64_t max_blocks_per_seq, int64_t block_size,
                          int64_t num_sms) {
    const int64_t ctas = std::max<int64_t>(1, num_seqs * num_kv_heads);
    const int64_t max_tokens = max_blocks_per_seq * block_size;
    const int64_t fill = (TURBO_DECODE_CTAS_PER_SM * num_sms + ctas - 1) / ctas;  // fill the SMs
    static const int64_t split_tokens = [] {
        const char* env = std::getenv("TURBO_DECODE_SPLIT_TOKENS");
        return env ? std::max<int64_t>(kMinSplitTokens, std::atoll(env)) : int64_t{kMaxSplitTokens};
    }();
    const int64_t balance = std::min((max_tokens + split_tokens - 1) / split_tokens,  // bound a split's work
                                     std::max<int64_t>(1, kMaxCtasPerSm * num_sms / ctas));  // and the grid
    const int64_t by_len = std::max<int64_t>(1, max_tokens / kMinSplitTokens);  // >= 128 tokens a split
    return std::max<int64_t>(1, std::min<int64_t>({std::max(fill, balance), by_len, 128}));
}

int64_t decode_min_split_tokens(int64_t total_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t num_sms) {
    // Waves of the resident CTA slots the batch's work is balanced over (TURBO_DECODE_BALANCE; 0 turns the hint
    // off, which leaves kMinSplitTokens and the grid's split count to decide, as without a hint).
    static const double waves = [] {
        const char* env = std::getenv("TURBO_DECODE_BALANCE");
        return env ? std::atof(env) : 2.0;
    }();
    if (waves <= 0.0 || total_tokens <= 0 || num_kv_heads <= 0) return 0;
    const int64_t group = std::max<int64_t>(1, num_heads / num_kv_heads);
    const int64_t cta_tokens = total_tokens * num_kv_heads * ((group + kMmaHeads - 1) / kMmaHeads);
    const double slots = static_cast<double>(kMmaCtasPerSm) * std::max<int64_t>(1, num_sms) * waves;
    return std::min<int64_t>(std::numeric_limits<int32_t>::max(),
                             static_cast<int64_t>(std::ceil(static_cast<double>(cta_tokens) / slots)));
}

void paged_attention_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, int64_t num_splits, at::Tensor& workspace,
                            int64_t window, const at::Tensor& min_split_tokens) {
    for (const at::Tensor* t :
         std::initializer_list<const at::Tensor*>{&out, &q, &k_cache, &v_cache, &block_tables, &context_lens})
        TURBO_CHECK_CUDA_TENSOR(*t);
    check_paged_attention_args(out, q, k_cache, v_cache);
    const int64_t head_dim = q.size(2), num_heads = q.size(1), num_kv_heads = k_cache.size(2);
    TURBO_CHECK_DTYPE(block_tables, at::kInt);
    TURBO_CHECK_DTYPE(context_lens, at::kInt);
    TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && block_tables.stride(1) == 1,
                "block_tables must be [num_seqs, max_blocks] with contiguous rows");
    TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == q.size(0) && context_lens.is_contiguous(),
                "context_lens must be [num_seqs]");
    TORCH_CHECK(num_splits >= 1 && num_splits <= 65535, "num_splits must be in [1, 65535]");
    TORCH_CHECK(q.size(0) <= 65535, "at most 65535 sequences");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0,
                "caches must be 16-byte aligned");
    const int* hint = nullptr;
    if (min_split_tokens.defined()) {
        TURBO_CHECK_CUDA_TENSOR(min_split_tokens);
        TURBO_CHECK_DTYPE(min_split_tokens, at::kInt);
        TORCH_CHECK(min_split_tokens.numel() == 1, "min_split_tokens must hold one int32");
        hint = min_split_tokens.data_ptr<int>();
    }
    const DecodeSplit sp{static_cast<int>(num_splits), static_cast<int>(window), hint};
    float* ws = nullptr;
    if (num_splits > 1) {
        TURBO_CHECK_CUDA_TENSOR(workspace);
        TORCH_CHECK(workspace.is_contiguous(), "workspace must be contiguous");
        const int64_t need = decode_workspace_size(q.size(0), num_heads, head_dim, num_splits);
        TORCH_CHECK(workspace.numel() * workspace.element_size() >= need, "workspace too small: need ", need,
                    " bytes");
        TORCH_CHECK(reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 16 == 0, "workspace must be 16-byte aligned");
        ws = reinterpret_cast<float*>(workspace.data_ptr());
    }
    if (q.size(0) == 0) return;
    const c10::cuda::CUDAGuard guard(q.device());
    const int group = static_cast<int>(num_heads / num_kv_heads);
    TURBO_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_attention_decode", [&] {
        if (head_dim == 64) {
            dispatch_group<scalar_t, 64>(group, out, q, k_cache, v_cache, block_tables, context_lens,
                                         static_cast<float>(scale), sp, ws);
        } else {
            dispatch_group<scalar_t, 128>(group, out, q, k_cache, v_cache, block_tables, context_lens,
                                          static_cast<float>(scale), sp, ws);
        }
    });
}

}  // namespace cuda
}  // namespace turbo
