// Turns a scheduled batch into the model's flattened input tensors (ForwardBatch) on the model's device.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "turbo/engine/scheduler.h"
#include "turbo/models/llama.h"

namespace turbo {

// Builds the step's inputs on the host (pinned when the model is on a GPU) and copies them to `device`
// asynchronously. sample_seq receives, in row order of the logits, the batch index of each sampling sequence.
ForwardBatch build_forward_batch(const ScheduledBatch& batch, int block_size, at::Device device,
                                 std::vector<int>& sample_seq);

}  // namespace turbo
