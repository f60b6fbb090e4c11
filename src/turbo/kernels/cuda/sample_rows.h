// Host side of CUDA sampling: the engine's per-request rows -> the sample kernel's per-row tensors.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "turbo/kernels/kernels.h"

namespace turbo::cuda {

// logits [n, V] on a CUDA device, any float dtype. All-greedy batches without penalties or logprobs -> argmax in
// that dtype; otherwise a float32 copy: greedy rows -> argmax, other rows -> the sample kernel, repetition
// penalties and logprobs with ATen on the device. One device->host copy of the results at the end (the step's
// only sync).
void sample_rows(const at::Tensor& logits, const std::vector<kernels::SampleRow>& rows, std::vector<int32_t>& tokens,
                 std::vector<TokenLogprob>& logprobs);

}  // namespace turbo::cuda
