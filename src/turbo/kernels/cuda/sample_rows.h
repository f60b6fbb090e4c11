// Host side of CUDA sampling: the engine's per-request rows -> the sample kernel's per-row tensors.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "turbo/kernels/kernels.h"

namespace turbo::cuda {

// logits [n, V] float32 on a CUDA device. Greedy rows without penalties -> argmax on the device; other rows ->
// the sample kernel; repetition penalties and logprobs with ATen on the device. One device->host copy of the
// results at the end (the step's only sync).
void sample_rows(const at::Tensor& logits, const std::vector<kernels::SampleRow>& rows, std::vector<int32_t>& tokens,
                 std::vector<TokenLogprob>& logprobs);

}  // namespace turbo::cuda
