// On-device sampling: greedy / temperature + top-k + top-p + min-p, drawn by the Gumbel-max trick with a
// counter-based RNG (Philox4x32-10 keyed by the request's seed, counter = (token / 4, step)), so a request's draw
// depends only on its logits, seed and step, never on the batch. One CTA of 1024 threads per row, no sort:
// top-k and top-p thresholds come from 4-level radix selects (8 bits a level) over order-preserving keys of the
// logits, by count for top-k and by fixed-point probability mass for top-p (integer atomics: deterministic).
// Also the penalties (elementwise) and ATen helpers for repetition penalty from ids and logprobs.
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo {
namespace cuda {
namespace {

constexpr int kSampleThreads = 1024;
constexpr double kMassScale = 1099511627776.0;  // 2^40: fixed point of exp(x - max) in [0, 1]

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const uint32_t lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
        const uint32_t lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

// Order-preserving map of a float to uint32 (NaN is treated as -inf by the callers).
__device__ __forceinline__ uint32_t float_key(float f) {
    const uint32_t b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float clean(float x) { return isnan(x) ? -INFINITY : x; }

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

// Block argmax (first index on ties); every thread gets the winner.
__device__ __forceinline__ int block_argmax(float v, int i, float* sv, int* si) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sv[lane] : -INFINITY;
    i = lane < (blockDim.x >> 5) ? si[lane] : INT_MAX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
    return i;
}

struct SampleSmem {
    unsigned long long hist[256];
    float sv[32];
    int si[32];
    uint32_t prefix;
    unsigned long long remaining;
};

// Picks the bin (from the top) where the running sum of hist reaches `remaining`; thread 0 only.
__device__ __forceinline__ int pick_bin(SampleSmem& sm, unsigned long long remaining, unsigned long long* left) {
    unsigned long long cum = 0;
    int lowest = -1;
    for (int b = 255; b >= 0; --b) {
        const unsigned long long hb = sm.hist[b];
        if (hb == 0) continue;
        lowest = b;
        if (cum + hb >= remaining) {
            *left = remaining - cum;
            return b;
        }
        cum += hb;
    }
    *left = 0;  // target above the total (rounding): keep everything down to the lowest non-empty bin
    return lowest < 0 ? 0 : lowest;
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const float* __restrict__ logits, int64_t stride, int vocab, const float* __restrict__ temperature,
                  const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p,
                  const int64_t* __restrict__ seeds, const int64_t* __restrict__ steps, int64_t* __restrict__ out) {
    __shared__ SampleSmem sm;
    const int row = blockIdx.x;
    const float* x = logits + row * stride;
    const int tid = threadIdx.x;

    // Max and argmax of the raw logits.
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float v = clean(x[i]);
        if (better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    const int arg = block_argmax(bv, bi, sm.sv, sm.si);
    const float temp = temperature[row];
    const int k = top_k[row];
    if (!(temp > 0.f) || k == 1) {
        if (tid == 0) out[row] = arg < vocab ? arg : 0;
        return;
    }
    const float inv_max = clean(x[arg < vocab ? arg : 0]) / temp;  // max of x / T
    uint32_t thr = 0;                                              // keep keys >= thr

    // top-k: the k-th largest key, by a radix select on counts.
    if (k > 0 && k < vocab) {
        uint32_t prefix = 0, mask = 0;
        unsigned long long remaining = static_cast<unsigned long long>(k);
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += blockDim.x) sm.hist[b] = 0;
            __syncthreads();
            for (int i = tid; i < vocab; i += blockDim.x) {
                const uint32_t key = float_key(clean(x[i]));
                if ((key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 255u], 1ull);
            }
            __syncthreads();
            if (tid == 0) {
                unsigned long long left;
                const int b = pick_bin(sm, remaining, &left);
                sm.prefix = prefix | (static_cast<uint32_t>(b) << shift);
                sm.remaining = left;
            }
            __syncthreads();
            prefix = sm.prefix;
            remaining = sm.remaining;
            mask |= 255u << shift;
            __syncthreads();
        }
        thr = prefix;
    }

    // top-p over the top-k set: the smallest top set whose mass reaches p (radix select on fixed-point mass).
    const float p = top_p[row];
    if (p < 1.f) {
        for (int b = tid; b < 256; b += blockDim.x) sm.hist[b] = 0;
        __syncthreads();
        unsigned long long local = 0;
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float v = clean(x[i]);
            if (float_key(v) >= thr) local += static_cast<unsigned long long>(expf(v / temp - inv_max) * kMassScale);
        }
        atomicAdd(&sm.hist[0], local);
        __syncthreads();
        const unsigned long long total = sm.hist[0];
        __syncthreads();
        unsigned long long remaining = static_cast<unsigned long long>(static_cast<double>(p > 0.f ? p : 0.f) * total);
        uint32_t prefix = 0, mask = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += blockDim.x) sm.hist[b] = 0;
            __syncthreads();
            for (int i = tid; i < vocab; i += blockDim.x) {
                const float v = clean(x[i]);
                const uint32_t key = float_key(v);
                if (key >= thr && (key & mask) == prefix) {
                    const auto q = static_cast<unsigned long long>(expf(v / temp - inv_max) * kMassScale);
                    if (q) atomicAdd(&sm.hist[(key >> shift) & 255u], q);
                }
            }
            __syncthreads();
            if (tid == 0) {
                unsigned long long left;
                const int b = pick_bin(sm, remaining, &left);
                sm.prefix = prefix | (static_cast<uint32_t>(b) << shift);
                sm.remaining = left;
            }
            __syncthreads();
            prefix = sm.prefix;
            remaining = sm.remaining;
            mask |= 255u << shift;
            __syncthreads();
        }
        thr = max(thr, prefix);
    }

    // min-p and the Gumbel-max draw over the kept tokens: argmax(x / T - log(E)), E = -log(u) ~ Exp(1).
    const float mp = min_p[row];
    const uint64_t seed = static_cast<uint64_t>(seeds[row]), step = static_cast<uint64_t>(steps[row]);
    const uint2 key2 = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    bv = -INFINITY;
    bi = INT_MAX;
    const int groups = (vocab + 3) / 4;
    for (int g = tid; g < groups; g += blockDim.x) {
        const uint4 r = philox4x32_10(
            make_uint4(static_cast<uint32_t>(g), static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                       0x5EED5EEDu),
            key2);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = g * 4 + j;
            if (i >= vocab) continue;
            const uint32_t rj = j == 0 ? r.x : (j == 1 ? r.y : (j == 2 ? r.z : r.w));
            const float v = clean(x[i]);
            if (v == -INFINITY || float_key(v) < thr) continue;
            const float xt = v / temp;
            if (mp > 0.f && expf(xt - inv_max) < mp) continue;
            const float u = (static_cast<float>(rj >> 8) + 0.5f) * (1.0f / 16777216.0f);
            const float score = xt - logf(-logf(u));
            if (better(score, i, bv, bi)) {
                bv = score;
                bi = i;
            }
        }
    }
    const int pick = block_argmax(bv, bi, sm.sv, sm.si);
    if (tid == 0) out[row] = pick < vocab ? pick : (arg < vocab ? arg : 0);
}

__global__ void apply_penalties_kernel(float* __restrict__ logits, int64_t stride, const int* __restrict__ counts,
                                       int64_t count_stride, int vocab, const float* __restrict__ repetition,
                                       const float* __restrict__ frequency, const float* __restrict__ presence) {
    const int row = blockIdx.y;
    const float rp = repetition[row], fr = frequency[row], pr = presence[row];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vocab; i += gridDim.x * blockDim.x) {
        const int c = counts[row * count_stride + i];
        if (c <= 0) continue;
        float v = logits[row * stride + i];
        v = v > 0.f ? v / rp : v * rp;
        logits[row * stride + i] = v - fr * static_cast<float>(c) - pr;
    }
}

void check_vec(const at::Tensor& t, int64_t n, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), name, " must be a contiguous [B] tensor");
    TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
}

}  // namespace

void sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
            const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& steps,
            at::Tensor& out_tokens) {
    TURBO_CHECK_CUDA_TENSOR(logits);
    TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [B, V] with contiguous rows");
    TURBO_CHECK_DTYPE(logits, at::kFloat);
    const int64_t rows = logits.size(0);
    check_vec(temperature, rows, at::kFloat, "temperature");
    check_vec(top_k, rows, at::kInt, "top_k");
    check_vec(top_p, rows, at::kFloat, "top_p");
    check_vec(min_p, rows, at::kFloat, "min_p");
    check_vec(seeds, rows, at::kLong, "seeds");
    check_vec(steps, rows, at::kLong, "steps");
    check_vec(out_tokens, rows, at::kLong, "out_tokens");
    TORCH_CHECK(logits.size(1) > 0 && logits.size(1) < INT_MAX, "bad vocab size");
    if (rows == 0) return;
    const c10::cuda::CUDAGuard guard(logits.device());
    sample_kernel<<<static_cast<unsigned>(rows), kSampleThreads, 0, current_stream()>>>(
        logits.data_ptr<float>(), logits.stride(0), static_cast<int>(logits.size(1)), temperature.data_ptr<float>(),
        top_k.data_ptr<int>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(), seeds.data_ptr<int64_t>(),
        steps.data_ptr<int64_t>(), out_tokens.data_ptr<int64_t>());
    TURBO_CHECK_LAUNCH();
}

void apply_penalties(at::Tensor& logits, const at::Tensor& token_counts, const at::Tensor& repetition,
                     const at::Tensor& frequency, const at::Tensor& presence) {
    TURBO_CHECK_CUDA_TENSOR(logits);
    TURBO_CHECK_CUDA_TENSOR(token_counts);
    TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [B, V] with contiguous rows");
    TURBO_CHECK_DTYPE(logits, at::kFloat);
    TURBO_CHECK_DTYPE(token_counts, at::kInt);
    TORCH_CHECK(token_counts.sizes() == logits.sizes() && token_counts.stride(1) == 1, "token_counts must be [B, V]");
    const int64_t rows = logits.size(0);
    check_vec(repetition, rows, at::kFloat, "repetition");
    check_vec(frequency, rows, at::kFloat, "frequency");
    check_vec(presence, rows, at::kFloat, "presence");
    if (rows == 0) return;
    TORCH_CHECK(rows <= 65535, "apply_penalties: at most 65535 rows");
    const c10::cuda::CUDAGuard guard(logits.device());
    const int vocab = static_cast<int>(logits.size(1));
    dim3 grid(std::min(ceil_div(vocab, 256), 128), static_cast<unsigned>(rows));
    apply_penalties_kernel<<<grid, 256, 0, current_stream()>>>(
        logits.data_ptr<float>(), logits.stride(0), token_counts.data_ptr<int>(), token_counts.stride(0), vocab,
        repetition.data_ptr<float>(), frequency.data_ptr<float>(), presence.data_ptr<float>());
    TURBO_CHECK_LAUNCH();
}

void repetition_penalty(at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& penalty) {
    TORCH_CHECK(token_ids.dim() == 2 && token_ids.size(0) == logits.size(0), "token_ids must be [B, L]");
    auto ids = token_ids.to(at::kLong);
    auto counts = at::zeros(logits.sizes(), logits.options().dtype(at::kInt));
    counts.scatter_add_(1, ids.clamp_min(0), (ids >= 0).to(at::kInt));
    auto zeros = at::zeros({logits.size(0)}, logits.options());
    apply_penalties(logits, counts, penalty.to(at::kFloat).contiguous(), zeros, zeros);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs(const at::Tensor& logits, const at::Tensor& tokens,
                                                        int64_t top_n) {
    auto lp = at::log_softmax(logits.to(at::kFloat), -1);
    auto chosen = lp.gather(1, tokens.to(at::kLong).view({-1, 1})).view({-1});
    if (top_n <= 0) {
        return {chosen, at::empty({logits.size(0), 0}, lp.options()),
                at::empty({logits.size(0), 0}, lp.options().dtype(at::kLong))};
    }
    auto top = at::topk(lp, top_n, -1);
    return {chosen, std::get<0>(top), std::get<1>(top)};
}

}  // namespace cuda
}  // namespace turbo
