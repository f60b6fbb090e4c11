// Tensor-core skinny GEMM for decode steps of up to 128 rows: y [M, N] = x [M, K] w [N, K]^T (+ bias), bf16/fp16,
// fp32 accumulation. Such a step is bound by the weight read, and cuBLAS reads the weights at 1.8-3.4 TB/s of an
// H200's ~3.8 at 2-128 rows (benchmark/kernels/bench_skinny_gemm.py); this kernel streams them.
//
// A CTA (4 warps, 8 past 64 rows) computes 128 output features over one k split. The weight and x go through a ring of STAGES
// shared-memory stages of 64 k each (cp.async, so nothing in flight holds registers): 128 weight rows and 8 NT
// rows of x a stage, 128 bytes a row, its eight 16-byte pieces swizzled (piece c of row r at c ^ (r & 7)) so that
// the fragment reads below are conflict-free.
//
// mma.sync m16n8k16 with w as A (16 features a tile, 2 tiles a warp) and x^T as B (8 rows of x a tile). The k index
// of a 32-wide half stage is permuted the same way for both operands, so that lane (g, t) reads each fragment as
// one 16-byte piece, k0 + 8t .. +8 of its row: elements 0-3 make the first k-step, 4-7 the second.
//
// One split: the CTA writes y. Several: each writes fp32 partial sums to the workspace [splits, M, N] and a reduce
// kernel adds them up in a fixed order (the same bits every run) and adds the bias. skinny_gemm_splits picks the
// split count that balances the CTAs over the SMs against the partial sums' traffic.
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace turbo {
namespace cuda {
namespace {

constexpr int kSkinnyWarps = 4;
constexpr int kSkinnyFt = 2;                            // m-tiles (16 features) a warp
constexpr int kSkinnyFeatures = kSkinnyWarps * kSkinnyFt * 16;  // features a CTA
constexpr int kSkinnyKc = 64;                           // k a stage: one 128-byte row
constexpr int kSkinnyMinSplitK = 512;                   // fewest k a split takes

template <int NT>
struct SkinnyShape {
    static constexpr int kRowGroups = NT > 8 ? 2 : 1;  // past 64 rows, a second set of 4 warps takes rows 64..
    static constexpr int kThreads = kSkinnyWarps * 32 * kRowGroups;
    static constexpr int kXRows = 8 * NT;
    static constexpr int kStages = NT >= 16 ? 3 : 4;
    static constexpr int kStageBytes = (kSkinnyFeatures + kXRows) * kSkinnyKc * 2;
    static constexpr int kSmemBytes = kStages * kStageBytes;
};

__device__ __forceinline__ uint4 lds128(const char* p) { return *reinterpret_cast<const uint4*>(p); }

template <typename T, int NT>
__global__ void __launch_bounds__(SkinnyShape<NT>::kThreads, 1)
    skinny_gemm_kernel(T* __restrict__ y, int64_t y_stride, float* __restrict__ ws, const T* __restrict__ x,
                       int64_t x_stride, const T* __restrict__ w, const T* __restrict__ bias, int M, int N, int K,
                       int stages_per_split) {
    using Shape = SkinnyShape<NT>;
    constexpr int S = Shape::kStages, kRows = kSkinnyFeatures + Shape::kXRows, NTW = NT / Shape::kRowGroups;
    extern __shared__ __align__(128) char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = (tid >> 5) % kSkinnyWarps;
    const int tile0 = (tid >> 5) / kSkinnyWarps * NTW;  // this warp's first n-tile (8 rows of x)
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * kSkinnyFeatures;
    const int split = blockIdx.y;
    const int k_begin = split * stages_per_split * kSkinnyKc;
    const int k_end = min(K, k_begin + stages_per_split * kSkinnyKc);
    const int num_stages = (k_end - k_begin + kSkinnyKc - 1) / kSkinnyKc;

    // Stage s's copies: rows 0..127 are weight rows n0.., rows 128.. are x's rows; zeros past N, M and k_end.
    auto load_stage = [&](int s) {
        char* base = smem + (s % S) * Shape::kStageBytes;
        const int k0 = k_begin + s * kSkinnyKc;
#pragma unroll
        for (int i = tid; i < kRows * 8; i += Shape::kThreads) {
            const int r = i >> 3, c = i & 7, k = k0 + 8 * c;
            const T* src;
            bool ok;
            if (r < kSkinnyFeatures) {
                ok = n0 + r < N && k < k_end;
                src = ok ? w + static_cast<int64_t>(n0 + r) * K + k : w;
            } else {
                const int m = r - kSkinnyFeatures;
                ok = m < M && k < k_end;
                src = ok ? x + static_cast<int64_t>(m) * x_stride + k : x;
            }
            cp_async16(base + r * 128 + ((c ^ (r & 7)) << 4), src, ok ? 16 : 0);
        }
    };

    float acc[kSkinnyFt][NTW][4];
#pragma unroll
    for (int f = 0; f < kSkinnyFt; ++f) {
#pragma unroll
        for (int j = 0; j < NTW; ++j) acc[f][j][0] = acc[f][j][1] = acc[f][j][2] = acc[f][j][3] = 0.f;
    }

#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < num_stages) load_stage(s);
        cp_async_commit();
    }
    for (int it = 0; it < num_stages; ++it) {
        cp_async_wait<S - 2>();
        __syncthreads();  // stage it is in for every thread; every warp is done with stage it - 1's slot
        if (it + S - 1 < num_stages) load_stage(it + S - 1);
        cp_async_commit();

        const char* wbase = smem + (it % S) * Shape::kStageBytes;
        const char* xbase = wbase + kSkinnyFeatures * 128;
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            const int piece = ((4 * p + t) ^ g) << 4;  // every row read here is = g (mod 8)
            uint4 wv[kSkinnyFt][2];
#pragma unroll
            for (int f = 0; f < kSkinnyFt; ++f) {
#pragma unroll
                for (int h = 0; h < 2; ++h) wv[f][h] = lds128(wbase + (warp * 32 + 16 * f + 8 * h + g) * 128 + piece);
            }
#pragma unroll
            for (int j = 0; j < NTW; ++j) {
                const uint4 xv = lds128(xbase + (8 * (tile0 + j) + g) * 128 + piece);
#pragma unroll
                for (int f = 0; f < kSkinnyFt; ++f) {
                    mma_m16n8k16<T>(acc[f][j], wv[f][0].x, wv[f][1].x, wv[f][0].y, wv[f][1].y, xv.x, xv.y);
                    mma_m16n8k16<T>(acc[f][j], wv[f][0].z, wv[f][1].z, wv[f][0].w, wv[f][1].w, xv.z, xv.w);
                }
            }
        }
    }
    cp_async_wait<0>();

    // acc[f][j]: features n0 + 32 warp + 16f + g (+ 8 for [2], [3]) of rows 8 (tile0 + j) + 2t (+ 1 for [1], [3]).
#pragma unroll
    for (int f = 0; f < kSkinnyFt; ++f) {
#pragma unroll
        for (int j = 0; j < NTW; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int n = n0 + warp * 32 + 16 * f + g + 8 * (e >> 1), m = 8 * (tile0 + j) + 2 * t + (e & 1);
                if (n >= N || m >= M) continue;
                if (ws == nullptr) {
                    const float b = bias ? to_float<T>(bias[n]) : 0.f;
                    y[m * y_stride + n] = from_float<T>(acc[f][j][e] + b);
                } else {
                    ws[(static_cast<int64_t>(split) * M + m) * N + n] = acc[f][j][e];
                }
            }
        }
    }
}

template <typename T>
__global__ void skinny_gemm_reduce_kernel(T* __restrict__ y, int64_t y_stride, const float* __restrict__ ws,
                                          const T* __restrict__ bias, int M, int N, int splits) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= static_cast<int64_t>(M) * N) return;
    const int m = static_cast<int>(i / N), n = static_cast<int>(i - static_cast<int64_t>(m) * N);
    float s = bias ? to_float<T>(bias[n]) : 0.f;
    for (int k = 0; k < splits; ++k) s += ws[static_cast<int64_t>(k) * M * N + i];
    y[m * y_stride + n] = from_float<T>(s);
}

template <typename T, int NT>
void launch(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int splits) {
    using Shape = SkinnyShape<NT>;
    TURBO_CUDA_CHECK(cudaFuncSetAttribute(skinny_gemm_kernel<T, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Shape::kSmemBytes));
    const int M = static_cast<int>(x.size(0)), N = static_cast<int>(w.size(0)), K = static_cast<int>(w.size(1));
    const int stages = (K + kSkinnyKc - 1) / kSkinnyKc, per = (stages + splits - 1) / splits;
    splits = (stages + per - 1) / per;  // no empty split
    at::Tensor ws;
    if (splits > 1) ws = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    const T* bp = bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr;
    dim3 grid(ceil_div(N, kSkinnyFeatures), splits);
    skinny_gemm_kernel<T, NT><<<grid, Shape::kThreads, Shape::kSmemBytes, current_stream()>>>(
        yp, y.stride(0), splits > 1 ? ws.data_ptr<float>() : nullptr, reinterpret_cast<const T*>(x.data_ptr()),
        x.stride(0), reinterpret_cast<const T*>(w.data_ptr()), bp, M, N, K, per);
    TURBO_CHECK_LAUNCH();
    if (splits > 1) {
        const int64_t n = static_cast<int64_t>(M) * N;
        skinny_gemm_reduce_kernel<T><<<ceil_div(n, 256), 256, 0, current_stream()>>>(yp, y.stride(0),
                                                                                     ws.data_ptr<float>(), bp, M, N,
                                                                                     splits);
        TURBO_CHECK_LAUNCH();
    }
}

}  // namespace

bool skinny_gemm_supported(const at::Tensor& x, const at::Tensor& w) {
    const bool half = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
    return half && x.is_cuda() && w.is_cuda() && x.dim() == 2 && w.dim() == 2 && x.size(0) >= 1 &&
           x.size(0) <= kSkinnyMaxRows && x.size(1) == w.size(1) && x.scalar_type() == w.scalar_type() &&
           x.stride(1) == 1 && w.is_contiguous() && w.size(0) >= 1 && w.size(1) >= 8 && w.size(1) % 8 == 0 &&
           rows_aligned16(x) && rows_aligned16(w) && w.size(0) <= INT32_MAX && w.size(1) <= INT32_MAX &&
           x.size(0) * w.size(0) <= INT32_MAX;
}

int64_t skinny_gemm_splits(int64_t rows, int64_t n, int64_t k, int64_t num_sms) {
    // Cost, in bytes moved: the weight over the balance of the CTAs on the SMs (a CTA per SM is penalised, two or
    // more hide each other's latency), plus the partial sums written and read back. Splits take >= 512 k each.
    const int64_t blocks = (n + kSkinnyFeatures - 1) / kSkinnyFeatures;
    const int64_t cap = std::max<int64_t>(1, k / kSkinnyMinSplitK);
    const double w_bytes = 2.0 * n * k;
    int64_t best = 1;
    double best_cost = std::numeric_limits<double>::infinity();
    for (int64_t s = 1; s <= cap; ++s) {
        const int64_t ctas = blocks * s, waves = (ctas + num_sms - 1) / num_sms;
        const double balance = static_cast<double>(ctas) / static_cast<double>(waves * num_sms) *
                               std::min(1.0, static_cast<double>(ctas) / static_cast<double>(2 * num_sms));
        const double cost = w_bytes / balance + (s > 1 ? (8.0 * s + 2.0) * rows * n : 0.0);
        if (cost < best_cost * (1 - 1e-9)) {
            best_cost = cost;
            best = s;
        }
    }
    return best;
}

void skinny_gemm(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t splits) {
    TORCH_CHECK(skinny_gemm_supported(x, w), "skinny_gemm: bf16/fp16 x [M <= ", kSkinnyMaxRows,
                ", K] and w [N, K] contiguous, K a multiple of 8, 16-byte aligned rows");
    TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == w.size(0) && y.stride(1) == 1 &&
                    y.scalar_type() == x.scalar_type() && y.is_cuda(),
                "skinny_gemm: y must be [M, N] with contiguous rows");
    TORCH_CHECK(!bias.defined() || (bias.is_contiguous() && bias.numel() == w.size(0) &&
                                    bias.scalar_type() == w.scalar_type()),
                "skinny_gemm: bias must be [N] of w's dtype");
    TORCH_CHECK(splits >= 1 && splits <= 65535, "skinny_gemm: splits must be in [1, 65535]");
    const c10::cuda::CUDAGuard guard(x.device());
    const int s = static_cast<int>(std::min<int64_t>(splits, (w.size(1) + kSkinnyKc - 1) / kSkinnyKc));
    TURBO_DISPATCH_FLOAT_TYPES(x.scalar_type(), "skinny_gemm", [&] {
        if constexpr (std::is_same<scalar_t, float>::value) {
            TORCH_CHECK(false, "skinny_gemm: float32 is not taken");
        } else {
            const int64_t m = x.size(0);
            if (m <= 8) {
                launch<scalar_t, 1>(y, x, w, bias, s);
            } else if (m <= 16) {
                launch<scalar_t, 2>(y, x, w, bias, s);
            } else if (m <= 32) {
                launch<scalar_t, 4>(y, x, w, bias, s);
            } else if (m <= 64) {
                launch<scalar_t, 8>(y, x, w, bias, s);
            } else {
                launch<scalar_t, 16>(y, x, w, bias, s);
            }
        }
    });
}

}  // namespace cuda
}  // namespace turbo
