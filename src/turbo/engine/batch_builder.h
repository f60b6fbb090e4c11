// Turns a scheduled batch into the model's flattened input tensors (ForwardBatch) on the model's device.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "turbo/engine/scheduler.h"
#include "turbo/models/llama.h"

namespace turbo {

// Builds the step's inputs on the host (in pinned memory when `pinned`, so that copies to a GPU do not block the
// loop thread). sample_seq receives, in row order of the logits, the batch index of each sampling sequence.
ForwardBatch build_forward_batch(const ScheduledBatch& batch, int block_size, bool pinned,
                                 std::vector<int>& sample_seq);

// The batch's tensors copied to `device` asynchronously (the batch itself when device is the CPU).
ForwardBatch to_device(const ForwardBatch& host, at::Device device);

}  // namespace turbo
