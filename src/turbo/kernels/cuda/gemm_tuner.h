// GEMMs whose cuBLASLt algorithm is picked by timing (gemm_tuner.cc). No CUDA headers here.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "turbo/kernels/kernels.h"

namespace turbo::cuda {

// TURBO_GEMM_TUNE=1 (read at each model's construction): models route their dense layers through a GemmTuner.
bool gemm_tuning_on();
std::unique_ptr<kernels::GemmTuner> make_gemm_tuner();

// For tests: y = x w^T from cuBLASLt's candidate `index` (0 = its first pick); throws if there is none.
at::Tensor run_gemm_candidate(const at::Tensor& x, const at::Tensor& w, int index);
// For benchmarks: ms of one pass of y = x w^T over `weights` (one shape) for the default path (kernels::linear),
// then for each of cuBLASLt's first `max_candidates` heuristic candidates, in the heuristic's order.
std::vector<double> time_gemm_candidates(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                         int max_candidates);

}  // namespace turbo::cuda
