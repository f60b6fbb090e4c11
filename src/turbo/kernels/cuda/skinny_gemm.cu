// Tensor-core skinny GEMM for decode steps of up to 128 rows: y [M, N] = x [M, K] w [N, K]^T (+ bias), bf16/fp16,
// fp32 accumulation. Such a step is bound by the weight read, and cuBLAS reads the weights at 2.6-2.8 TB/s of an
// H200's ~4.3 at 16-128 rows (benchmark/kernels/bench_decode_gemm.py); this kernel streams them the way the
// tensor-core decode attention streams the KV cache.
//
// mma.sync m16n8k16 with w as A (16 output features a tile) and x^T as B (8 rows of x a tile). No shared memory:
// the k index of a k-step is permuted the same way for both operands, so that lane (g, t) of a warp reads its
// fragments as 16-byte loads, w[feature][k0 + 8t .. +8] (features g and g + 8 of each m-tile) and
// x[row][k0 + 8t .. +8] (row g of each n-tile), and one 32-wide k chunk makes two k-steps. The weights go past L1
// (read once); x is small and is read by the CTA's four warps, which take different features over the same k.
//
// CTA = 4 warps x FT m-tiles (64 FT features; FT = 2 up to 64 rows, 1 past), grid (feature blocks, k splits). With one split the CTA writes y;
// otherwise each split writes fp32 partial sums to the workspace [splits, M, N] and a reduce kernel adds them up
// in a fixed order (the same bits every run) and adds the bias.
//
// Status: written and compiled for sm_90a in the eighth session, not yet run on a GPU and not called by the
// engine; tests/gpu/test_turbo_cuda_kernels.py (test_skinny_gemm*) and benchmark/kernels/bench_skinny_gemm.py are
// there to check and time it.
#include "turbo/kernels/cuda/common.cuh"
#include "turbo/kernels/cuda/cuda_kernels.h"

#include <algorithm>
#include <type_traits>

namespace turbo {
namespace cuda {
namespace {

constexpr int kSkinnyWarps = 4;
constexpr int kSkinnyMinSplitK = 512;  // fewest k a split takes

// For NT n-tiles (8 rows of x each): FT m-tiles (16 features) a warp, and U 32-wide k chunks a warp has in flight,
// fewer of both as the accumulators and x pieces grow.
template <int NT>
struct SkinnyShape {
    static constexpr int FT = NT <= 8 ? 2 : 1;
    static constexpr int U = NT <= 2 ? 4 : (NT == 4 ? 2 : 1);
    static constexpr int kCtaRows = kSkinnyWarps * FT * 16;  // features per CTA
};

int skinny_cta_rows(int64_t rows) {
    return rows <= 64 ? SkinnyShape<8>::kCtaRows : SkinnyShape<16>::kCtaRows;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kSkinnyWarps * 32)
    skinny_gemm_kernel(T* __restrict__ y, int64_t y_stride, float* __restrict__ ws, const T* __restrict__ x,
                       int64_t x_stride, const T* __restrict__ w, const T* __restrict__ bias, int M, int N, int K,
                       int chunks_per_split) {
    constexpr int U = SkinnyShape<NT>::U, FT = SkinnyShape<NT>::FT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * SkinnyShape<NT>::kCtaRows + warp * FT * 16;  // this warp's first feature
    const int split = blockIdx.y;
    const int k_begin = split * chunks_per_split * 32;
    const int k_end = min(K, k_begin + chunks_per_split * 32);

    // Feature rows g and g + 8 of each m-tile; rows of x g of each n-tile (zero past N and M).
    const T* wr[FT][2];
    bool w_ok[FT][2];
#pragma unroll
    for (int f = 0; f < FT; ++f) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = row0 + 16 * f + 8 * h + g;
            w_ok[f][h] = n < N;
            wr[f][h] = w + static_cast<int64_t>(w_ok[f][h] ? n : 0) * K + 8 * t;
        }
    }
    const T* xr[NT];
    bool x_ok[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int m = 8 * j + g;
        x_ok[j] = m < M;
        xr[j] = x + static_cast<int64_t>(x_ok[j] ? m : 0) * x_stride + 8 * t;
    }

    float acc[FT][NT][4];
#pragma unroll
    for (int f = 0; f < FT; ++f) {
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[f][j][0] = acc[f][j][1] = acc[f][j][2] = acc[f][j][3] = 0.f;
    }

    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int k0 = k_begin; k0 < k_end; k0 += 32 * U) {
        // Every load is issued, from an address inside the operands, before any is used; what lies past N, M
        // or the split's k is zeroed afterwards.
        uint4 wv[U][FT][2], xv[U][NT];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = k0 + 32 * u < k_end ? k0 + 32 * u : k_begin;
#pragma unroll
            for (int f = 0; f < FT; ++f) {
#pragma unroll
                for (int h = 0; h < 2; ++h) wv[u][f][h] = load_stream(wr[f][h] + k);
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) xv[u][j] = __ldg(reinterpret_cast<const uint4*>(xr[j] + k));
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool k_ok = k0 + 32 * u < k_end;
#pragma unroll
            for (int f = 0; f < FT; ++f) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if (!(k_ok && w_ok[f][h])) wv[u][f][h] = zero;
                }
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                if (!(k_ok && x_ok[j])) xv[u][j] = zero;
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int f = 0; f < FT; ++f) {
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    // k-step 0: k0 + 8t + {0,1} (a0a1, b0) and + {2,3} (a4a5, b1); k-step 1: + {4,5} and + {6,7}.
                    mma_m16n8k16<T>(acc[f][j], wv[u][f][0].x, wv[u][f][1].x, wv[u][f][0].y, wv[u][f][1].y,
                                    xv[u][j].x, xv[u][j].y);
                    mma_m16n8k16<T>(acc[f][j], wv[u][f][0].z, wv[u][f][1].z, wv[u][f][0].w, wv[u][f][1].w,
                                    xv[u][j].z, xv[u][j].w);
                }
            }
        }
    }

    // acc[f][j]: features row0 + 16f + g (+ 8 for [2], [3]) of rows 8j + 2t (+ 1 for [1], [3]) of y.
#pragma unroll
    for (int f = 0; f < FT; ++f) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int n = row0 + 16 * f + g + 8 * (e >> 1), m = 8 * j + 2 * t + (e & 1);
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
    const int M = static_cast<int>(x.size(0)), N = static_cast<int>(w.size(0)), K = static_cast<int>(w.size(1));
    const int chunks = K / 32, per = (chunks + splits - 1) / splits;
    splits = (chunks + per - 1) / per;  // no empty split
    at::Tensor ws;
    if (splits > 1) ws = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    const T* bp = bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr;
    dim3 grid(ceil_div(N, SkinnyShape<NT>::kCtaRows), splits);
    skinny_gemm_kernel<T, NT><<<grid, kSkinnyWarps * 32, 0, current_stream()>>>(
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
           x.stride(1) == 1 && w.is_contiguous() && w.size(0) >= 1 && w.size(1) >= 32 && w.size(1) % 32 == 0 &&
           rows_aligned16(x) && rows_aligned16(w) && w.size(0) <= INT32_MAX && w.size(1) <= INT32_MAX &&
           x.size(0) * w.size(0) <= INT32_MAX;
}

int64_t skinny_gemm_splits(int64_t rows, int64_t n, int64_t k, int64_t num_sms) {
    const int64_t ctas = (n + skinny_cta_rows(rows) - 1) / skinny_cta_rows(rows);
    const int64_t want = (4 * num_sms + ctas - 1) / ctas;  // about four CTAs per SM
    // Each split is >= 512 k, and the fp32 partial sums (splits x rows x n x 4 bytes) stay within an eighth of
    // the weight's bytes (n x k x 2).
    const int64_t cap = std::min<int64_t>(k / kSkinnyMinSplitK, k / (16 * std::max<int64_t>(rows, 1)));
    return std::max<int64_t>(1, std::min<int64_t>(want, cap));
}

void skinny_gemm(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t splits) {
    TORCH_CHECK(skinny_gemm_supported(x, w), "skinny_gemm: bf16/fp16 x [M <= ", kSkinnyMaxRows,
                ", K] and w [N, K] contiguous, K a multiple of 32, 16-byte aligned rows");
    TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == w.size(0) && y.stride(1) == 1 &&
                    y.scalar_type() == x.scalar_type() && y.is_cuda(),
                "skinny_gemm: y must be [M, N] with contiguous rows");
    TORCH_CHECK(!bias.defined() || (bias.is_contiguous() && bias.numel() == w.size(0) &&
                                    bias.scalar_type() == w.scalar_type()),
                "skinny_gemm: bias must be [N] of w's dtype");
    TORCH_CHECK(splits >= 1 && splits <= 65535, "skinny_gemm: splits must be in [1, 65535]");
    const c10::cuda::CUDAGuard guard(x.device());
    const int s = static_cast<int>(std::min<int64_t>(splits, w.size(1) / 32));
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
