// Placeholder so a TURBO_CUDA build has a CUDA translation unit; the kernels come in a later issue.
#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo::kernels::cuda {
int cuda_kernels_available() { return 0; }
}  // namespace turbo::kernels::cuda
