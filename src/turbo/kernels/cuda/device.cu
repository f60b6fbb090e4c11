// Device queries the host-side dispatch needs (kept in a .cu so host code includes no CUDA headers).
#include <ATen/cuda/CUDAContext.h>

#include <mutex>
#include <unordered_map>

#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo {
namespace cuda {

int64_t device_num_sms() {
    static std::mutex mu;
    static std::unordered_map<int, int64_t> cache;
    const int device = at::cuda::current_device();
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(device);
    if (it != cache.end()) return it->second;
    const int64_t n = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    cache[device] = n;
    return n;
}

}  // namespace cuda
}  // namespace turbo
