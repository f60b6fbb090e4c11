// GEMMs whose cuBLASLt algorithm is picked by timing (kernels::GemmTuner, TURBO_GEMM_TUNE=1). Host code over
// cuBLASLt and ATen; no kernels of its own.
//
// cuBLAS picks one algorithm per call from its heuristic. For the decode shapes of a large batch (hundreds of
// rows against 4096 x 6144 .. 4096 x 28672 weights) that pick is not always the fastest one cuBLASLt offers: the
// tile and split choices decide how evenly the tiles fill the SMs. The tuner asks cuBLASLt's heuristic for its
// first candidates, times each of them and the default path (kernels::linear) on the real shape, and keeps the
// fastest, once per row bucket and weight shape. Timing rotates over every registered weight of the shape, up to
// kRotateBytes, as a forward does, so that no candidate is timed on a weight L2 already holds.
//
// Tuning needs a stream that is not being captured (it times with events and synchronises). A shape first seen
// during a CUDA-graph capture takes the default path; DecodeGraphs runs each bucket eagerly before capturing it,
// so the decode shapes are tuned by then.
#include "turbo/kernels/cuda/gemm_tuner.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <cublasLt.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace turbo::cuda {
namespace {

constexpr int kMaxCandidates = 16;                  // cuBLASLt heuristic results timed per shape
constexpr int64_t kRotateBytes = int64_t{256} << 20;  // weights per timed pass: well past L2 (50-60 MB)
constexpr int kTimedPasses = 3;
// Larger inputs (prefill steps) take the default path: cuBLAS runs them near its peak rate, and timing them
// during a run would cost a prefill step's time per candidate.
constexpr int64_t kMaxTunedRows = 1024;

void check(cublasStatus_t s, const char* what) {
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, "turbo: ", what, " failed: ", cublasLtGetStatusString(s));
}

cudaDataType_t lt_type(at::ScalarType t) { return t == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F; }

// Row buckets: the algorithm tuned at a bucket's first row count serves every count in it. DecodeGraphs
// captures its buckets largest first, so a bucket is tuned at (or near) its largest count.
int64_t row_bucket(int64_t m) {
  auto up = [](int64_t v, int64_t q) { return (v + q - 1) / q * q; };
  if (m <= 16) return m;
  if (m <= 256) return up(m, 16);
  return up(m, 32);
}

// y [M, N] = x [M, K] w [N, K]^T in cuBLASLt's column-major terms: y^T (N x M) = w^T^T (N x K) x^T (K x M).
struct LtProblem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  LtProblem(int64_t M, int64_t N, int64_t K, at::ScalarType dt) {
    const cudaDataType_t t = lt_type(dt);
    check(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    const cublasOperation_t trans = CUBLAS_OP_T, none = CUBLAS_OP_N;
    check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)), "TRANSA");
    check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &none, sizeof(none)), "TRANSB");
    check(cublasLtMatrixLayoutCreate(&a, t, K, N, K), "layout of w");
    check(cublasLtMatrixLayoutCreate(&b, t, K, M, K), "layout of x");
    check(cublasLtMatrixLayoutCreate(&c, t, N, M, N), "layout of y");
  }
  ~LtProblem() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
  LtProblem(const LtProblem&) = delete;
  LtProblem& operator=(const LtProblem&) = delete;

  cublasStatus_t run(const cublasLtMatmulAlgo_t& algo, at::Tensor& y, const at::Tensor& x, const at::Tensor& w) const {
    const float alpha = 1.f, beta = 0.f;
    return cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), op, &alpha, w.data_ptr(), a, x.data_ptr(), b, &beta,
                          y.data_ptr(), c, y.data_ptr(), c, &algo, at::cuda::getCUDABlasLtWorkspace(),
                          at::cuda::getCUDABlasLtWorkspaceSize(), at::cuda::getCurrentCUDAStream());
  }

  std::vector<cublasLtMatmulAlgo_t> candidates(int max_count) const {
    cublasLtMatmulPreference_t pref = nullptr;
    check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    const size_t ws = at::cuda::getCUDABlasLtWorkspaceSize();
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    std::vector<cublasLtMatmulHeuristicResult_t> found(max_count);
    int n = 0;
    const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), op, a, b, c, c,
                                                            pref, max_count, found.data(), &n);
    cublasLtMatmulPreferenceDestroy(pref);
    std::vector<cublasLtMatmulAlgo_t> algos;
    if (s != CUBLAS_STATUS_SUCCESS) return algos;
    for (int i = 0; i < n; ++i)
      if (found[i].state == CUBLAS_STATUS_SUCCESS) algos.push_back(found[i].algo);
    return algos;
  }
};

// Shapes this path takes: 2-D, contiguous, half precision, 256-byte aligned (cuBLASLt's heuristic assumes its
// default alignment), no bias.
bool supported(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const auto dt = x.scalar_type();
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 256 == 0; };
  return !bias.defined() && x.is_cuda() && (dt == at::kBFloat16 || dt == at::kHalf) && w.scalar_type() == dt &&
         x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.is_contiguous() && w.is_contiguous() &&
         x.size(0) > 0 && w.size(0) % 8 == 0 && w.size(1) % 8 == 0 && aligned(x) && aligned(w);
}

// Mean ms of one pass of `run` over `weights`, after one untimed pass.
template <typename Run>
double time_pass(const Run& run, const std::vector<at::Tensor>& weights) {
  for (const at::Tensor& w : weights)
    if (!run(w)) return std::numeric_limits<double>::infinity();
  at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
  const auto stream = at::cuda::getCurrentCUDAStream();
  start.record(stream);
  for (int p = 0; p < kTimedPasses; ++p)
    for (const at::Tensor& w : weights) run(w);
  stop.record(stream);
  stop.synchronize();
  return start.elapsed_time(stop) / kTimedPasses;
}

bool capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

class LtGemmTuner final : public kernels::GemmTuner {
 public:
  explicit LtGemmTuner(bool verbose = false) : verbose_(verbose) {}

  void add_weight(const at::Tensor& w) override {
    std::lock_guard<std::mutex> lock(mu_);
    weights_[shape_of(w)].push_back(w);
  }

  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) override {
    if (!supported(x, w, bias) || x.size(0) > kMaxTunedRows) return kernels::linear(x, w, bias);
    const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
    const Key key{x.get_device(), static_cast<int>(x.scalar_type()), N, K, row_bucket(M)};
    std::unique_lock<std::mutex> lock(mu_);
    auto it = choices_.find(key);
    if (it == choices_.end()) {
      if (capturing()) return kernels::linear(x, w, bias);
      it = choices_.emplace(key, tune(x, w)).first;
    }
    const Choice choice = it->second;
    lock.unlock();
    if (!choice.lt) return kernels::linear(x, w, bias);
    at::Tensor y = at::empty({M, N}, x.options());
    const LtProblem problem(M, N, K, x.scalar_type());
    if (problem.run(choice.algo, y, x, w) != CUBLAS_STATUS_SUCCESS) return kernels::linear(x, w, bias);
    return y;
  }

  std::vector<double> time_candidates(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                      int max_candidates) const {
    TORCH_CHECK(!weights.empty(), "time_candidates: no weights");
    for (const at::Tensor& w : weights)
      TORCH_CHECK(supported(x, w, {}) && w.sizes() == weights[0].sizes(), "time_candidates: unsupported shapes");
    const int64_t M = x.size(0), N = weights[0].size(0), K = weights[0].size(1);
    at::Tensor y = at::empty({M, N}, x.options());
    std::vector<double> ms{time_pass([&](const at::Tensor& w) { return kernels::linear(x, w, {}).defined(); }, weights)};
    const LtProblem problem(M, N, K, x.scalar_type());
    for (const cublasLtMatmulAlgo_t& algo : problem.candidates(max_candidates))
      ms.push_back(time_pass([&](const at::Tensor& w) { return problem.run(algo, y, x, w) == CUBLAS_STATUS_SUCCESS; },
                             weights));
    return ms;
  }

 private:
  using Shape = std::tuple<int, int, int64_t, int64_t>;        // device, dtype, N, K
  using Key = std::tuple<int, int, int64_t, int64_t, int64_t>;  // ... and the row bucket
  struct Choice {
    bool lt = false;  // false: kernels::linear
    cublasLtMatmulAlgo_t algo{};
  };

  static Shape shape_of(const at::Tensor& w) {
    return {w.get_device(), static_cast<int>(w.scalar_type()), w.size(0), w.size(1)};
  }

  // The registered weights of w's shape, up to kRotateBytes (w itself if none is registered).
  std::vector<at::Tensor> rotation(const at::Tensor& w) const {
    auto it = weights_.find(shape_of(w));
    if (it == weights_.end()) return {w};
    std::vector<at::Tensor> out;
    int64_t bytes = 0;
    for (const at::Tensor& t : it->second) {
      if (bytes >= kRotateBytes) break;
      out.push_back(t);
      bytes += t.nbytes();
    }
    return out;
  }

  // Times the default path and cuBLASLt's candidates on x's shape; a candidate must also agree with the default
  // path's result.
  Choice tune(const at::Tensor& x, const at::Tensor& w) const {
    const std::vector<at::Tensor> weights = rotation(w);
    const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
    at::Tensor y = at::empty({M, N}, x.options());
    const at::Tensor ref = kernels::linear(x, w, {}).to(at::kFloat);
    const double tol = 1e-2 * (ref.abs().max().item<double>() + 1e-6);
    Choice best;
    const double default_ms =
        time_pass([&](const at::Tensor& t) { return kernels::linear(x, t, {}).defined(); }, weights);
    double best_ms = default_ms;
    int best_index = -1, index = -1;
    const LtProblem problem(M, N, K, x.scalar_type());
    for (const cublasLtMatmulAlgo_t& algo : problem.candidates(kMaxCandidates)) {
      ++index;
      if (problem.run(algo, y, x, w) != CUBLAS_STATUS_SUCCESS) continue;
      if ((y.to(at::kFloat) - ref).abs().max().item<double>() > tol) continue;
      const double ms = time_pass(
          [&](const at::Tensor& t) { return problem.run(algo, y, x, t) == CUBLAS_STATUS_SUCCESS; }, weights);
      if (ms < best_ms) {
        best_ms = ms;
        best_index = index;
        best.lt = true;
        best.algo = algo;
      }
    }
    if (verbose_)
      std::fprintf(stderr, "[turbo] GEMM %lld x %lld x %lld over %zu weights: default %.1f us, picked %d: %.1f us\n",
                   static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K), weights.size(),
                   1e3 * default_ms / weights.size(), best_index, 1e3 * best_ms / weights.size());
    return best;
  }

  bool verbose_;  // TURBO_GEMM_TUNE=2: one line per tuned shape on stderr
  mutable std::mutex mu_;
  std::map<Shape, std::vector<at::Tensor>> weights_;
  std::map<Key, Choice> choices_;
};

}  // namespace

bool gemm_tuning_on() {
  const char* env = std::getenv("TURBO_GEMM_TUNE");
  return env != nullptr && std::atoi(env) != 0;
}

std::unique_ptr<kernels::GemmTuner> make_gemm_tuner() {
  const char* env = std::getenv("TURBO_GEMM_TUNE");
  return std::make_unique<LtGemmTuner>(env != nullptr && std::atoi(env) >= 2);
}

at::Tensor run_gemm_candidate(const at::Tensor& x, const at::Tensor& w, int index) {
  TORCH_CHECK(supported(x, w, {}), "run_gemm_candidate: unsupported shapes");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const LtProblem problem(M, N, K, x.scalar_type());
  const std::vector<cublasLtMatmulAlgo_t> algos = problem.candidates(kMaxCandidates);
  TORCH_CHECK(index >= 0 && index < static_cast<int>(algos.size()), "run_gemm_candidate: ", algos.size(),
              " candidates, no index ", index);
  at::Tensor y = at::empty({M, N}, x.options());
  check(problem.run(algos[index], y, x, w), "cublasLtMatmul");
  return y;
}

std::vector<double> time_gemm_candidates(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                         int max_candidates) {
  return LtGemmTuner().time_candidates(x, weights, max_candidates);
}

}  // namespace turbo::cuda
